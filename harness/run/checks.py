"""Judging a finished run: step expectations, group constraints and invariants.

Pure functions over what the run observed; no I/O.

Invariants checked on every scenario unless it opts out:

* durable: every chat answered 200 is a prefix of its session's final
  trajectory (request messages + the answer); on a tree, a turn of the final
  tree. A 200 whose turn was dropped (in no branch) is a phantom commit.
* no_success_after_delete: once a DELETE of a session has completed with
  2xx, no later request on that session gets 2xx (no auto-create, no
  resurrection, no queued turn committing into a deleted session).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import Any, Literal

from harness.model.profile import (
    BUFFERED,
    IMPLICIT_CREATION,
    PASSED_THROUGH,
    REFERENCE_PROFILE,
    REFUSED_RETRY,
    ROLLED_BACK,
    STREAMING_UNSUPPORTED,
    Profile,
    TrajectoryState,
    read_trajectory,
)
from harness.model.scenario import ChatStep, Expect, Scenario, StatusMatcher, parse_status
from harness.results import Finding, Kind, Observation, StreamEnd, answer_of
from refserver.anthropic import SESSION_TYPES_AS_ANTHROPIC
from refserver.rules import comparable, first_divergence

from .context import RunContext


def check_run(
    scenario: Scenario,
    context: RunContext,
    profile: Profile = REFERENCE_PROFILE,
    *,
    timing_bounds: bool = False,
) -> list[Finding]:
    findings: list[Finding] = []
    for step in scenario.steps:
        observation = context.observations.get(step.id)
        if observation is None or observation.status is None:
            continue
        if step.expect is not None:
            expect = step.expect
            if not timing_bounds:
                expect = expect.model_copy(update={"within_ms": None})
            findings.extend(check_step(scenario, step.id, expect, observation, context, profile))
        if isinstance(step, ChatStep):
            findings.extend(_check_chat_body(scenario, step.id, observation))
    findings.extend(_check_groups(scenario, context, profile))
    findings.extend(_check_no_commit_after_stream_error(scenario, context))
    if scenario.expect.durable:
        findings.extend(_check_durable(scenario, context, profile))
    if scenario.expect.no_success_after_delete:
        findings.extend(_check_no_success_after_delete(context, profile))
    return findings


def check_step(
    scenario: Scenario,
    step_id: str,
    expect: Expect,
    observation: Observation,
    context: RunContext,
    profile: Profile = REFERENCE_PROFILE,
) -> list[Finding]:
    findings: list[Finding] = []
    repro = curl_line(observation)
    guards = scenario.property_of(step_id)

    def safety(expected: str, actual: str) -> None:
        if expect.convention:  # the scenario says this step only checks a convention
            convention(expected, actual, expect.convention)
            return
        findings.append(Finding(step_id, expected, actual, repro, Kind.SAFETY, guards))

    def convention(expected: str, actual: str, label: str) -> None:
        findings.append(Finding(step_id, expected, actual, repro, Kind.CONVENTION, label))

    matcher = expect.status_matcher
    if matcher is not None and not matcher.matches(observation.status):
        wanted_success = matcher.outcome
        excused = _excused_refusal(scenario, step_id, observation, profile)
        implicit = implicit_creation_excuse(step_id, observation, context, profile, matcher)
        if wanted_success is not None and observation.succeeded != wanted_success:
            if implicit is not None:
                convention(f"status {matcher.describe()}", describe_answer(observation), implicit)
            elif wanted_success and excused is not None:
                convention(f"status {matcher.describe()}", describe_answer(observation), excused)
            elif not wanted_success and declared_rollback(step_id, context, profile):
                convention(
                    f"status {matcher.describe()}",
                    describe_answer(observation),
                    ROLLED_BACK_DECLARED,
                )
            else:
                safety(f"status {matcher.describe()}", describe_answer(observation))
        else:
            convention(
                f"status {matcher.describe()}",
                describe_answer(observation),
                _status_label(step_id, observation, matcher.describe(), profile),
            )
    answered_2xx = (observation.status or 0) // 100 == 2
    # A 2xx carries no error: when a refusal was expected, the status finding
    # above says all there is (no "error shape" label for a success body); nor
    # does a refused stream, whose refusal says why.
    if (
        expect.error_types
        and not answered_2xx
        and observation.error_type not in accepted_error_types(expect, profile)
        and not refused_stream(scenario, step_id, observation, profile)
    ):
        wanted = " or ".join(sorted(expect.error_types))
        if observation.error_type is None:
            convention(
                f"error.type {wanted}",
                f"no error.type ({describe_answer(observation)}; body {_shape(observation)})",
                _declared("error shape: not OpenAI-shaped", profile.error_shape != "openai"),
            )
        else:
            convention(
                f"error.type {wanted}",
                f"error.type {observation.error_type}",
                f"error.type {observation.error_type} for {wanted}",
            )
    if expect.stream is not None and observation.status == 200 and observation.stream:
        not_relayed = context.not_relayed.get(step_id)
        accepted = accepted_error_types(expect, profile)
        if not_relayed is None:
            _check_stream_end(expect, accepted, observation, safety, convention)
        else:
            # The race on this stream was never set up; it ran to its end.
            _check_stream_end(
                expect,
                accepted,
                observation,
                lambda e, a: convention(e, a, not_relayed),
                convention,
            )
    if expect.within_ms is not None and observation.latency_ms > expect.within_ms:
        # Only when the user asked for budgets; labelled by what it measures.
        findings.append(
            Finding(
                step_id,
                f"an answer within {expect.within_ms:g} ms (--latency-budgets)",
                f"{observation.latency_ms:.1f} ms",
                repro,
                Kind.SAFETY,
                f"{observation.op.upper()} over its latency budget",
            )
        )
    findings.extend(_check_trajectory(scenario, step_id, expect, observation, context, profile))
    return findings


def passed_through(scenario: Scenario, step_id: str, observation: Observation | None) -> bool:
    """A chat whose first upstream call failed retryably, answered with a 429 or
    5xx: the server handed the failure to the agent instead of retrying it."""
    step = scenario.step(step_id)
    status = observation.status if observation is not None else None
    return (
        isinstance(step, ChatStep)
        and step.starts_with_retryable_failure
        and status is not None
        and (status == 429 or status >= 500)
    )


def implicit_creation_excuse(
    step_id: str,
    observation: Observation,
    context: RunContext,
    profile: Profile,
    expected: StatusMatcher | None,
) -> str | None:
    """On a server that creates sessions implicitly, the label for a status on the
    wrong side that follows from that design; None where it does not.

    Before any turn of a session succeeded, the session may not exist yet: a
    request may be refused with 404. A request on an id that was never deleted
    may create it, so where "not found" was expected it may succeed. After a
    DELETE of the session completed, nothing is excused: a success there is a
    resurrection."""
    if profile.creation != "implicit" or expected is None:
        return None
    session_id = context.session_of_step.get(step_id)
    if session_id is None:
        return None
    before = [
        other
        for name, other in context.observations.items()
        if context.session_of_step.get(name) == session_id
        and other.ended <= observation.started
        and _is_2xx(other)
    ]
    if any(other.op == "delete" for other in before):
        return None
    succeeded = (observation.status or 0) // 100 == 2
    created = any(other.op == "chat" for other in before)
    if succeeded and expected.matches(404):
        return _declared(IMPLICIT_CREATION, True)  # "not found" was expected: it was made
    if observation.status == 404 and not created:
        return _declared(IMPLICIT_CREATION, True)  # not made yet: no turn succeeded
    return None


def _implicit_creation_showed(scenario: Scenario, context: RunContext, profile: Profile) -> bool:
    """Some step's status was on the other side than expected because the server
    creates sessions implicitly: counts that assumed explicit creation follow."""
    for step in scenario.steps:
        observation = context.observations.get(step.id)
        matcher = step.expect.status_matcher if step.expect else None
        if observation is None or observation.status is None or matcher is None:
            continue
        wrong_side = matcher.outcome is not None and _is_2xx(observation) != matcher.outcome
        if wrong_side and implicit_creation_excuse(step.id, observation, context, profile, matcher):
            return True
    return False


def refused_stream(
    scenario: Scenario, step_id: str, observation: Observation | None, profile: Profile
) -> bool:
    """A chat sent with ``stream: true`` and refused as a request the server does
    not take (400, 422, 501), by a server that declares it does not stream or
    whose error names the stream: a server that does not stream."""
    step = scenario.step(step_id)
    if not isinstance(step, ChatStep) or not step.stream or observation is None:
        return False
    if observation.status not in (400, 422, 501):
        return False
    return profile.streaming == "unsupported" or "stream" in json.dumps(observation.body).lower()


def streaming_label(profile: Profile, seen: Literal["buffered", "unsupported"]) -> str:
    return _declared(
        BUFFERED if seen == "buffered" else STREAMING_UNSUPPORTED, profile.streaming == seen
    )


def _excused_refusal(
    scenario: Scenario, step_id: str, observation: Observation, profile: Profile
) -> str | None:
    """The convention label of a refusal where success was expected, if the
    refusal is a design choice that leaves the state unchanged; else None."""
    if passed_through(scenario, step_id, observation):
        return passed_through_label(profile)
    if refused_stream(scenario, step_id, observation, profile):
        return streaming_label(profile, "unsupported")
    step = scenario.step(step_id)
    status = observation.status or 0
    if isinstance(step, ChatStep) and step.retry is not None and 400 <= status < 500:
        return _declared(REFUSED_RETRY, profile.retry == "refuse")
    return None


def last_turn_start(messages: list[dict[str, Any]]) -> int:
    """Where the last turn of a committed trajectory begins: after the assistant
    message that ends the turn before it."""
    answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return answers[-2] + 1 if len(answers) >= 2 else 0


def rolls_back_one_step(before: list[dict[str, Any]], sent: list[dict[str, Any]]) -> bool:
    """``sent`` keeps every committed turn but the last, and replaces that one."""
    if not before:
        return False
    divergence = first_divergence(before, sent)
    if divergence is None or divergence < last_turn_start(before):
        return False
    return bool(sent) and sent[-1].get("role") != "assistant"


def declared_rollback(step_id: str, context: RunContext, profile: Profile) -> bool:
    """A 2xx where a refusal was expected, on a server that declares one-step
    rollbacks, for a request that diverged only in the last turn."""
    if profile.rollback != "one-step" or step_id not in context.sent_messages:
        return False
    return rolls_back_one_step(context.seen_before.get(step_id, []), context.sent_messages[step_id])


def _status_label(step_id: str, observation: Observation, expected: str, profile: Profile) -> str:
    actual = observation.status or 0
    if observation.op == "request" and actual >= 500:
        return f"bad-input handling: {actual} on {step_id}"
    if observation.op == "create":
        return _declared(
            f"create answers {actual}, not {expected}", actual == profile.create.status
        )
    if actual == profile.rejected_status and expected == "409":
        return _declared(f"rejected requests answer {actual}, not 409", True)
    if expected == "404" and actual in profile.closed_status and actual != 404:
        return _declared(f"a closed session answers {actual}, not 404", True)
    return f"{expected} answered as {actual}"


def _declared(label: str, declared: bool) -> str:
    return f"{label} (declared in the profile)" if declared else label


def passed_through_label(profile: Profile) -> str:
    return _declared(PASSED_THROUGH, profile.upstream_failures == "pass-through")


ROLLED_BACK_DECLARED = _declared(ROLLED_BACK, True)

RESURRECTION = "resurrection: a request after the DELETE brought the session back"
"""Only a declared rollback is ever excused, so its label always says so."""


def _shape(observation: Observation) -> str:
    body = observation.body
    if isinstance(body, dict) and "error" in body:
        return f"error is a {type(body['error']).__name__}"
    return type(body).__name__


def accepted_error_types(expect: Expect, profile: Profile) -> frozenset[str]:
    """The error types that say what ``expect`` says, in the profile's API: on
    Anthropic's, its own names for them too (``not_found_error``)."""
    if profile.api != "anthropic-messages":
        return expect.error_types
    spelled = {SESSION_TYPES_AS_ANTHROPIC.get(kind) for kind in expect.error_types}
    return expect.error_types | frozenset(filter(None, spelled))


def _check_stream_end(
    expect: Expect,
    accepted: frozenset[str],
    observation: Observation,
    safety: Callable[[str, str], None],
    convention: Callable[[str, str, str], None],
) -> None:
    """How a stream ended. ``[DONE]`` against an error event is the difference
    between a committed turn and one that is not: safety. The exact error type,
    or an error that came as a bare cut, is how the server spells it."""
    assert observation.stream is not None
    assert expect.stream is not None
    record = observation.stream
    wanted = {"done": "[DONE]", "error": "an error event", "cut": "a cut stream"}[expect.stream]
    if expect.error_types and expect.stream == "error":
        wanted = f"an error event ({' or '.join(sorted(expect.error_types))})"
    seen = {
        StreamEnd.DONE: "[DONE]",
        StreamEnd.ERROR: f"an error event ({record.error_type})",
        StreamEnd.CUT: f"a stream cut after {record.chunks} chunk(s), without [DONE] or an error",
        StreamEnd.HUNG_UP: "the harness hung up",
        StreamEnd.NOT_STREAMED: "one JSON completion, not a stream",
    }[record.end]
    expected = f"the stream ends with {wanted}"
    if record.end is StreamEnd.HUNG_UP:
        return
    if record.end is StreamEnd.NOT_STREAMED:
        convention(expected, seen, "stream: true answered with one JSON completion")
    elif (record.end is StreamEnd.DONE) != (expect.stream == "done"):
        safety(expected, seen)
    elif record.end is StreamEnd.CUT and expect.stream == "error":
        convention(expected, seen, "a failed stream ends without an error event")
    elif record.end is StreamEnd.ERROR and expect.error_types and record.error_type not in accepted:
        convention(expected, seen, f"stream error {record.error_type} for {wanted}")


def _check_no_commit_after_stream_error(scenario: Scenario, context: RunContext) -> list[Finding]:
    """A stream that ended with an error event (or was cut) committed nothing: the
    answer its client assembled is not in the final trajectory after its request."""
    findings: list[Finding] = []
    for step in scenario.steps:
        observation = context.observations.get(step.id)
        record = observation.stream if observation is not None else None
        if record is None or record.end not in (StreamEnd.ERROR, StreamEnd.CUT):
            continue
        final = context.final_trajectories.get(context.session_of_step[step.id])
        if final is None or record.assembled is None:
            continue
        if turn_committed(final, [*context.sent_messages[step.id], record.assembled]):
            assert observation is not None
            findings.append(
                Finding(
                    step.id,
                    f"{step.id}'s stream ended with {record.mark}, so its turn is not committed",
                    "the answer it had assembled is in the final trajectory",
                    curl_line(observation),
                    label="commit after a stream error",
                )
            )
    return findings


def _check_chat_body(scenario: Scenario, step_id: str, observation: Observation) -> list[Finding]:
    """A 200 to a non-streaming chat must carry a JSON completion."""
    if observation.stream is not None:
        return []  # how a stream ended is judged by its ``stream`` expectation
    if observation.status != 200 or answer_of(observation) is not None:
        return []
    raw = observation.body.get("_raw", "") if isinstance(observation.body, dict) else ""
    what = "an event stream" if str(raw).lstrip().startswith("data:") else "no completion"
    return [
        Finding(
            step_id,
            "a JSON chat.completion (the request did not ask to stream)",
            what,
            curl_line(observation),
            Kind.CONVENTION,
            f"protocol: {what} where JSON was expected",
        )
    ]


def _check_trajectory(
    scenario: Scenario,
    step_id: str,
    expect: Expect,
    observation: Observation,
    context: RunContext,
    profile: Profile,
) -> list[Finding]:
    wants_state = (
        expect.num_assistant is not None
        or expect.length is not None
        or expect.in_flight is not None
        or expect.contains
        or expect.excludes
    )
    if not wants_state or observation.status != 200:
        return []
    repro = curl_line(observation)
    guards = scenario.property_of(step_id)
    state = context.reads.get(step_id) or read_trajectory(profile, observation.body)
    findings: list[Finding] = []
    # Counts written for a server that retries do not hold where a chat's
    # failure was passed through (its turn was, rightly, not committed): those
    # differences follow from the convention. What must never be there
    # (``excludes``) stays safety.
    follows = (
        passed_through_label(profile)
        if any(passed_through(scenario, s, o) for s, o in context.observations.items())
        else streaming_label(profile, "unsupported")
        if any(refused_stream(scenario, s, o, profile) for s, o in context.observations.items())
        else _declared(IMPLICIT_CREATION, True)
        if _implicit_creation_showed(scenario, context, profile)
        else None
    )

    def convention(expected: str, actual: str, label: str) -> None:
        findings.append(Finding(step_id, expected, actual, repro, Kind.CONVENTION, label))

    def fail(expected: str, actual: str, *, count: bool = True) -> None:
        if count and follows is not None:
            convention(expected, actual, follows)
            return
        findings.append(Finding(step_id, expected, actual, repro, Kind.SAFETY, guards))

    counted = profile.trajectory.num_assistant is not None  # else the server shows no count
    if expect.num_assistant is not None and counted and state.num_assistant != expect.num_assistant:
        fail(f"num_assistant = {expect.num_assistant}", f"num_assistant = {state.num_assistant!r}")
    if (
        expect.in_flight is not None
        and state.in_flight is not None
        and state.in_flight != expect.in_flight
    ):
        fail(f"in_flight = {expect.in_flight}", f"in_flight = {state.in_flight}")
    messages = state.messages
    if expect.length is not None and (messages is None or len(messages) != expect.length):
        fail(
            f"{expect.length} messages",
            "no readable trajectory" if messages is None else f"{len(messages)} messages",
        )
    # On a tree, "in the trajectory" is in some branch: every turn counts.
    shown = [m for turn in state.turns or [] for m in turn] if state.turns is not None else messages
    committed = {comparable(m) for m in shown or [] if isinstance(m, dict)}
    if profile.trajectory.tree and state.turns is None:
        convention("every committed turn listed (model: tree)", "no readable list", UNREAD_TREE)
    rolled_back = _rolled_back(scenario, context, profile)
    for chat in expect.contains:
        answer = answer_of(context.observations.get(chat))
        if answer is None:
            fail(f"{chat}'s answer in the trajectory", f"{chat} got no answer")
        elif state.turns is not None:
            if not state.has_turn([*context.sent_messages.get(chat, []), answer]):
                fail(f"{chat}'s turn in a branch of the tree", "it is in no branch")
        elif comparable(answer) not in committed and chat in rolled_back:
            convention(
                f"{chat}'s answer in the trajectory",
                "it is missing: a later request rolled its turn back",
                ROLLED_BACK_DECLARED,
            )
        elif comparable(answer) not in committed:
            fail(f"{chat}'s answer in the trajectory", "it is missing")
    for chat in expect.excludes:
        sent = context.sent_messages.get(chat)
        if sent and comparable(sent[-1]) in committed:
            if declared_rollback(chat, context, profile):
                convention(
                    f"{chat}'s message not in the trajectory",
                    "it is there: it rolled back the last turn",
                    ROLLED_BACK_DECLARED,
                )
                continue
            fail(f"{chat}'s message not in the trajectory", "it is there", count=False)
    return findings


def _check_groups(scenario: Scenario, context: RunContext, profile: Profile) -> list[Finding]:
    findings: list[Finding] = []
    # A group of streamed chats on a server that refuses to stream: none could
    # succeed, by design, not by a race.
    refused = any(refused_stream(scenario, s, o, profile) for s, o in context.observations.items())
    for group in scenario.expect.groups:
        kind, steps = group.kind_and_steps
        matcher = parse_status(group.status)
        observed = {s: context.observations.get(s) for s in steps}
        # A 200 stream that ended with an error event was a refusal, not a success.
        hits = [
            s
            for s, o in observed.items()
            if o is not None
            and matcher.matches(o.status)
            and (o.succeeded or matcher.outcome is not True)
        ]
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
                    kind=Kind.CONVENTION if refused else Kind.SAFETY,
                    label=streaming_label(profile, "unsupported")
                    if refused
                    else group.safety_property or scenario.guards,
                )
            )
    return findings


def _check_durable(scenario: Scenario, context: RunContext, profile: Profile) -> list[Finding]:
    findings: list[Finding] = []
    # A server that regenerates on an exact retry replaces the retried turn;
    # the retry's answer is then the one that must be durable.
    superseded = {
        step.retry
        for step in scenario.steps
        if isinstance(step, ChatStep)
        and step.retry is not None
        and (retry := context.observations.get(step.id)) is not None
        and retry.status == 200
    } | _rolled_back(scenario, context, profile)
    for step in scenario.steps:
        if not isinstance(step, ChatStep) or step.id in superseded:
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
        if profile.trajectory.tree and final.turns is None:
            continue  # unreadable: the read step says so; no guess from the active path
        if final.turns is not None:
            if not final.has_turn(turn):
                findings.append(
                    Finding(
                        step.id,
                        f"{step.id} answered 200, so its turn is in a branch of the final tree",
                        f"it is in no branch (the tree has {len(final.turns)} turns): "
                        "a phantom commit",
                        curl_line(observation),
                        label="phantom commit",
                    )
                )
            continue
        messages = final.messages or []
        prefix = [comparable(m) for m in messages[: len(turn)] if isinstance(m, dict)]
        if prefix[:-1] == [comparable(m) for m in turn[:-1]] and observation.stream:
            if prefix[-1:] != [comparable(answer)]:
                findings.append(
                    Finding(
                        step.id,
                        f"{step.id}'s stream ended with [DONE], so the committed answer is "
                        "the one its client assembled",
                        "the committed answer differs from the streamed one",
                        curl_line(observation),
                        label="committed answer differs from the streamed one",
                    )
                )
        elif prefix != [comparable(m) for m in turn]:
            findings.append(
                Finding(
                    step.id,
                    f"{step.id} answered 200, so its turn is in the final trajectory",
                    f"it is not (final trajectory has {len(messages)} messages): a phantom commit",
                    curl_line(observation),
                    label="phantom commit",
                )
            )
    return findings


UNREAD_TREE = "profile: model tree, but the server's answer lists no turns as records"


def turn_committed(state: TrajectoryState, turn: list[dict[str, Any]]) -> bool:
    """Is ``turn`` (a request's messages, then its answer) committed: a prefix of
    the trajectory, or on a tree, in some branch?"""
    if state.turns is not None:
        return state.has_turn(turn)
    messages = state.messages or []
    wanted = [comparable(m) for m in turn]
    return [comparable(m) for m in messages[: len(turn)] if isinstance(m, dict)] == wanted


def _rolled_back(scenario: Scenario, context: RunContext, profile: Profile) -> set[str]:
    """Chats whose committed turn a later, declared one-step rollback replaced."""
    if profile.rollback != "one-step":
        return set()
    replaced: set[str] = set()
    for step in scenario.steps:
        observation = context.observations.get(step.id)
        if not isinstance(step, ChatStep) or observation is None or observation.status != 200:
            continue
        if not declared_rollback(step.id, context, profile):
            continue
        # The turn it replaced is the one whose request and answer ``before`` ends with.
        before = [comparable(m) for m in context.seen_before.get(step.id, [])]
        for other, sent in context.sent_messages.items():
            answer = answer_of(context.observations.get(other))
            if (
                other != step.id
                and answer is not None
                and [comparable(m) for m in [*sent, answer]] == before
            ):
                replaced.add(other)
    return replaced


def _check_no_success_after_delete(context: RunContext, profile: Profile) -> list[Finding]:
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
        if observation.started > deleted_at[session_id] and observation.succeeded:
            findings.append(
                Finding(
                    step_id,
                    f"no 2xx for {step_id}: it started after its session's DELETE completed",
                    describe_answer(observation),
                    curl_line(observation),
                    label=RESURRECTION
                    if profile.creation == "implicit"
                    else "success after DELETE",
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
    if isinstance(request.json_body, dict) and request.json_body.get("stream") is True:
        parts.insert(2, "-N")  # print each event as it comes
    if request.json_body is not None:
        parts += ["-H", "content-type: application/json", "-d", json.dumps(request.json_body)]
    elif request.raw_body is not None:
        parts += ["--data-binary", request.raw_body.decode(errors="replace")]
    elif request.raw_size:
        return shlex.join(parts) + f"  # with a {request.raw_size}-byte body"
    return shlex.join(parts)
