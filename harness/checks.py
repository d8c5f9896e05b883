"""Judging a finished run: step expectations, group constraints and invariants.

Pure functions over what the run observed; no I/O.

Invariants checked on every scenario unless it opts out:

* durable: every chat answered 200 is a prefix of its session's final
  trajectory (request messages + the answer). A 200 whose turn was dropped
  is a phantom commit.
* no_success_after_delete: once a DELETE of a session has completed with
  2xx, no later request on that session gets 2xx (no auto-create, no
  resurrection, no queued turn committing into a deleted session).
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

from refserver.rules import comparable

from .results import Finding, Observation, answer_of
from .scenario import ChatStep, Expect, Scenario, parse_status

if TYPE_CHECKING:
    from .runner import RunContext


def check_run(scenario: Scenario, context: RunContext) -> list[Finding]:
    findings: list[Finding] = []
    for step in scenario.steps:
        observation = context.observations.get(step.id)
        if step.expect is None or observation is None or observation.status is None:
            continue
        findings.extend(check_step(step.id, step.expect, observation, context))
    findings.extend(_check_groups(scenario, context))
    if scenario.expect.durable:
        findings.extend(_check_durable(scenario, context))
    if scenario.expect.no_success_after_delete:
        findings.extend(_check_no_success_after_delete(context))
    return findings


def check_step(
    step_id: str, expect: Expect, observation: Observation, context: RunContext
) -> list[Finding]:
    findings: list[Finding] = []
    repro = curl_line(observation)

    def fail(expected: str, actual: str) -> None:
        findings.append(Finding(step_id, expected, actual, repro))

    matcher = expect.status_matcher
    if matcher is not None and not matcher.matches(observation.status):
        fail(f"status {matcher.describe()}", describe_answer(observation))
    if expect.error_types and observation.error_type not in expect.error_types:
        fail(
            f"error.type {' or '.join(sorted(expect.error_types))}",
            f"error.type {observation.error_type}"
            if observation.error_type
            else f"no error.type ({describe_answer(observation)})",
        )
    if expect.within_ms is not None and observation.latency_ms > expect.within_ms:
        fail(f"an answer within {expect.within_ms:g} ms", f"{observation.latency_ms:.1f} ms")
    findings.extend(_check_trajectory(step_id, expect, observation, context, repro))
    return findings


def _check_trajectory(
    step_id: str, expect: Expect, observation: Observation, context: RunContext, repro: str | None
) -> list[Finding]:
    wants_state = (
        expect.num_assistant is not None
        or expect.length is not None
        or expect.in_flight is not None
        or expect.contains
        or expect.excludes
    )
    if not wants_state:
        return []
    body = observation.body if isinstance(observation.body, dict) else {}
    findings: list[Finding] = []
    messages = body.get("messages") if isinstance(body.get("messages"), list) else None
    for field, wanted in (
        ("num_assistant", expect.num_assistant),
        ("in_flight", expect.in_flight),
    ):
        if wanted is not None and body.get(field) != wanted:
            findings.append(
                Finding(step_id, f"{field} = {wanted}", f"{field} = {body.get(field)!r}", repro)
            )
    if expect.length is not None and (messages is None or len(messages) != expect.length):
        shown = "no messages" if messages is None else f"{len(messages)} messages"
        findings.append(Finding(step_id, f"{expect.length} messages", shown, repro))
    committed = {comparable(m) for m in messages or [] if isinstance(m, dict)}
    for chat in expect.contains:
        answer = answer_of(context.observations.get(chat))
        if answer is None:
            findings.append(
                Finding(step_id, f"{chat}'s answer in the trajectory", f"{chat} got no answer")
            )
        elif comparable(answer) not in committed:
            findings.append(
                Finding(step_id, f"{chat}'s answer in the trajectory", "it is missing", repro)
            )
    for chat in expect.excludes:
        sent = context.sent_messages.get(chat)
        if sent and comparable(sent[-1]) in committed:
            findings.append(
                Finding(step_id, f"{chat}'s message not in the trajectory", "it is there", repro)
            )
    return findings


def _check_groups(scenario: Scenario, context: RunContext) -> list[Finding]:
    findings: list[Finding] = []
    for group in scenario.expect.groups:
        kind, steps = group.kind_and_steps
        matcher = parse_status(group.status)
        observed = {s: context.observations.get(s) for s in steps}
        hits = [s for s, o in observed.items() if o is not None and matcher.matches(o.status)]
        ok = {
            "exactly_one": len(hits) == 1,
            "at_most_one": len(hits) <= 1,
            "at_least_one": len(hits) >= 1,
        }[kind]
        if not ok:
            cells = ", ".join(f"{s}={o.cell if o else '-'}" for s, o in observed.items())
            findings.append(
                Finding(
                    None,
                    f"{kind.replace('_', ' ')} of {', '.join(steps)} gets {matcher.describe()}",
                    f"{len(hits)} did ({cells})",
                )
            )
    return findings


def _check_durable(scenario: Scenario, context: RunContext) -> list[Finding]:
    findings: list[Finding] = []
    for step in scenario.steps:
        if not isinstance(step, ChatStep):
            continue
        observation = context.observations.get(step.id)
        answer = answer_of(observation)
        if observation is None or observation.status != 200 or answer is None:
            continue
        session_id = context.session_of_step[step.id]
        final = context.final_trajectories.get(session_id)
        if final is None:
            continue  # the session was deleted; there is nothing left to be durable in
        turn = [*context.sent_messages[step.id], answer]
        prefix = [comparable(m) for m in final[: len(turn)] if isinstance(m, dict)]
        if prefix != [comparable(m) for m in turn]:
            findings.append(
                Finding(
                    step.id,
                    f"{step.id} answered 200, so its turn is in the final trajectory",
                    f"it is not (final trajectory has {len(final)} messages): a phantom commit",
                    curl_line(observation),
                )
            )
    return findings


def _check_no_success_after_delete(context: RunContext) -> list[Finding]:
    deleted_at: dict[str, float] = {}
    for step_id, observation in context.observations.items():
        session_id = context.session_of_step.get(step_id)
        if observation.op == "delete" and _is_2xx(observation) and session_id is not None:
            deleted_at[session_id] = min(
                observation.ended, deleted_at.get(session_id, observation.ended)
            )
    findings: list[Finding] = []
    for step_id, observation in context.observations.items():
        session_id = context.session_of_step.get(step_id)
        if session_id is None or session_id not in deleted_at:
            continue
        if observation.started > deleted_at[session_id] and _is_2xx(observation):
            findings.append(
                Finding(
                    step_id,
                    f"no 2xx for {step_id}: it started after its session's DELETE completed",
                    describe_answer(observation),
                    curl_line(observation),
                )
            )
    return findings


def _is_2xx(observation: Observation) -> bool:
    return observation.status is not None and observation.status // 100 == 2


def describe_answer(observation: Observation) -> str:
    if observation.status is None:
        return observation.transport_error or "no answer"
    error_type = observation.error_type
    return f"{observation.status} {error_type}" if error_type else str(observation.status)


def curl_line(observation: Observation) -> str | None:
    request = observation.request
    if request is None:
        return None
    parts = ["curl", "-sS", "-X", request.method, request.url]
    if request.json_body is not None:
        parts += ["-H", "content-type: application/json", "-d", json.dumps(request.json_body)]
    elif request.raw_body is not None:
        parts += ["--data-binary", request.raw_body.decode(errors="replace")]
    elif request.raw_size:
        return shlex.join(parts) + f"  # with a {request.raw_size}-byte body"
    return shlex.join(parts)
