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
import math
import shlex
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

from harness.model.messages import first_divergence, keys_of, message_key, role_of
from harness.model.profile import (
    ABORTS_COMMITTED,
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
from harness.upstream.script import Action
from wire.anthropic import SESSION_TYPES_AS_ANTHROPIC

from .context import RunContext


def check_run(
    scenario: Scenario,
    context: RunContext,
    profile: Profile = REFERENCE_PROFILE,
    *,
    timing_bounds: bool = False,
    placed: bool = True,
) -> list[Finding]:
    """Every finding of a run. ``placed=False``: the race was never placed (the
    run is UNTESTED), so what the scenario expected of it is not judged; the
    invariants that hold on any server, whatever was raced, still are."""
    if not placed:
        findings = _check_no_commit_after_stream_error(scenario, context)
        if scenario.expect.durable:
            findings.extend(_check_durable(scenario, context, profile))
        if scenario.expect.no_success_after_delete:
            findings.extend(_check_no_success_after_delete(context, profile))
        return findings
    findings = []
    for step in scenario.steps:
        observation = context.observations.get(step.id)
        if observation is None or observation.status is None:
            continue
        at_step: list[Finding] = []
        if step.expect is not None:
            expect = step.expect
            if not timing_bounds:
                expect = expect.model_copy(update={"within_ms": None})
            at_step.extend(check_step(scenario, step.id, expect, observation, context, profile))
        if isinstance(step, ChatStep):
            at_step.extend(_check_chat_body(scenario, step.id, observation))
            at_step.extend(_check_nothing_after_error_event(step.id, observation))
        findings.extend(_seen(at_step, observation.ended))
    findings.extend(_check_groups(scenario, context, profile))
    # What the final reads show is seen last.
    findings.extend(_seen(_check_no_commit_after_stream_error(scenario, context), math.inf))
    if scenario.expect.durable:
        findings.extend(_seen(_check_durable(scenario, context, profile), math.inf))
    if scenario.expect.no_success_after_delete:
        for finding in _check_no_success_after_delete(context, profile):
            observed = context.observations.get(finding.step or "")
            findings.extend(_seen([finding], observed.ended if observed else None))
    return findings


def _seen(findings: list[Finding], at: float | None) -> list[Finding]:
    return [replace(f, seen_at=at) if f.seen_at is None else f for f in findings]


def with_causes(
    findings: list[Finding], session_of: Mapping[str, str] | None = None
) -> list[Finding]:
    """The first unexpected observation on a session is the cause; every later
    safety finding or server fault on that session follows from it, says so, and
    is not counted as a cause of its own. Findings on no one session (a group,
    the run as a whole) follow the run's first cause.

    First means seen first: a background chat's answer is seen when it comes,
    the final trajectory last. Conventions are left alone: they fail nothing."""
    session_of = session_of or {}
    counted = [f for f in findings if f.kind is not Kind.CONVENTION]
    if len(counted) < 2:
        return findings

    def when(finding: Finding) -> float:
        return math.inf if finding.seen_at is None else finding.seen_at

    def session(finding: Finding) -> str | None:
        return session_of.get(finding.step) if finding.step else None

    first_of: dict[str | None, Finding] = {}
    for finding in sorted(counted, key=when):
        first_of.setdefault(session(finding), finding)
    overall = min(counted, key=when)
    causes = set(map(id, first_of.values())) - {id(first_of.get(None))} | {id(overall)}

    def short(cause: Finding) -> str:
        text = f"{cause.step}: {cause.actual}" if cause.step else cause.actual
        return text if len(text) <= 160 else text[:160] + "..."

    marked = []
    for finding in findings:
        if finding.kind is Kind.CONVENTION or id(finding) in causes:
            marked.append(finding)
            continue
        cause = first_of.get(session(finding)) if session(finding) is not None else overall
        marked.append(replace(finding, follows=short(cause or overall)))
    return marked


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
        excused = _excused_refusal(
            scenario, step_id, observation, profile, context.engine_calls.get(step_id)
        )
        implicit = implicit_creation_excuse(step_id, observation, context, profile, matcher)
        failed_stream = expect.stream in ("error", "cut") and not observation.succeeded
        if wanted_success is not None and observation.succeeded != wanted_success:
            if failed_stream:
                # A turn expected to fail inside its stream failed before the
                # stream began: the same outcome (nothing committed), spelled otherwise.
                convention(
                    f"status {matcher.describe()}, then {expect.stream} in the stream",
                    describe_answer(observation),
                    "a failed stream answered as an HTTP error, not in the stream",
                )
            elif implicit is not None:
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
                label = status_label(scenario, step_id, observation, wanted_success, context)
                if expect.convention:  # the scenario says this step only checks a convention
                    convention(
                        f"status {matcher.describe()}",
                        describe_answer(observation),
                        expect.convention,
                    )
                else:
                    findings.append(
                        Finding(
                            step_id,
                            f"status {matcher.describe()}",
                            describe_answer(observation),
                            repro,
                            Kind.SAFETY,
                            label,
                        )
                    )
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
        if passed_through(scenario, step_id, observation, context.engine_calls.get(step_id)):
            not_relayed = passed_through_label(profile)  # the failure, as the agent saw it
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


REFUSED = {
    "chat": "a turn the contract accepts was refused",
    "delete": "DELETE refused",
    "get": "GET refused",
    "create": "create refused",
    "request": "a valid request refused",
}
"""Labels of a refusal where the contract expects success, by what was refused."""


def status_label(
    scenario: Scenario,
    step_id: str,
    observation: Observation,
    wanted_success: bool,
    context: RunContext,
) -> str:
    """The label of a status on the wrong side, from what was observed at the step.

    A scenario's headline names the race it places: a success where a refusal was
    expected (the phantom, the resurrection, the turn not preempted), or the
    failure of the step the race is about (a retry, a scripted engine failure).
    A plain turn, a DELETE or a read refused is labelled as just that: the
    headline would name a race the refusal says nothing about."""
    step = scenario.step(step_id)
    if step.safety_property:
        return step.safety_property
    if not wanted_success:
        session_id = context.session_of_step.get(step_id)
        deleted_before = any(
            other.op == "delete"
            and _is_2xx(other)
            and other.ended <= observation.started
            and context.session_of_step.get(name) == session_id
            for name, other in context.observations.items()
        )
        return "success after DELETE" if deleted_before else scenario.guards
    if isinstance(step, ChatStep) and (step.retry is not None or not step.plain_script):
        return scenario.guards
    return REFUSED.get(observation.op, scenario.guards)


def passed_through(
    scenario: Scenario,
    step_id: str,
    observation: Observation | None,
    engine_calls: int | None = None,
) -> bool:
    """A chat whose first upstream call failed retryably (an abort, a reset, 429,
    503), whose failure the server handed to the agent instead of retrying: it
    called the engine (where the count is known: a server that refused without
    calling the engine passed nothing through) and answered a 429 or 5xx, or a
    stream that ended in an error event or a cut. The same rule, streamed or
    not. (An abort answered 200 as it came is ``abort_answered``.)"""
    step = scenario.step(step_id)
    if not isinstance(step, ChatStep) or not step.starts_with_retryable_failure:
        return False
    if observation is None or observation.status is None:
        return False
    if engine_calls == 0:
        return False
    status = observation.status
    if status == 429 or status >= 500:
        return True
    if status // 100 != 2:
        return False
    return observation.stream is not None and not observation.succeeded


def abort_answered(
    scenario: Scenario,
    step_id: str,
    observation: Observation | None,
    engine_calls: int | None = None,
) -> bool:
    """A chat whose first upstream call was aborted, answered 200 with that
    ``finish_reason: abort`` instead of a retry: on a server that declares
    ``aborted_completions: commit``, its convention; elsewhere a safety failure."""
    step = scenario.step(step_id)
    if not isinstance(step, ChatStep) or observation is None or observation.status != 200:
        return False
    if step.behaviours[0].action is not Action.ABORT or engine_calls == 0:
        return False
    return finish_reason_of(observation) == "abort"


ABORT_AS_SUCCESS = "aborted completion answered as a success, not retried"
"""An abort answered 200 (``finish_reason: abort``) where no profile declares it."""


def abort_label(profile: Profile) -> str:
    return _declared(ABORTS_COMMITTED, profile.aborted_completions == "commit")


def finish_reason_of(observation: Observation) -> str | None:
    """The ``finish_reason`` of a chat's answer, streamed or not."""
    if observation.stream is not None:
        return observation.stream.finish_reason
    body = observation.body
    choices = body.get("choices") if isinstance(body, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None


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
    scenario: Scenario,
    step_id: str,
    observation: Observation,
    profile: Profile,
    engine_calls: int | None = None,
) -> str | None:
    """The convention label of a refusal where success was expected, if the
    refusal is a design choice that leaves the state unchanged; else None."""
    if passed_through(scenario, step_id, observation, engine_calls):
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
    answers = [i for i, m in enumerate(messages) if role_of(m) == "assistant"]
    return answers[-2] + 1 if len(answers) >= 2 else 0


def rolls_back_one_step(before: list[dict[str, Any]], sent: list[dict[str, Any]]) -> bool:
    """``sent`` keeps every committed turn but the last, and replaces that one."""
    if not before:
        return False
    divergence = first_divergence(before, sent)
    if divergence is None or divergence < last_turn_start(before):
        return False
    return bool(sent) and role_of(sent[-1]) != "assistant"


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


def _check_nothing_after_error_event(step_id: str, observation: Observation) -> list[Finding]:
    """An error event ends a stream: a client that stops there (the OpenAI SDK raises
    it) never sees what follows, and one that reads on may take a ``[DONE]`` after
    it for a committed turn."""
    record = observation.stream
    if record is None or record.end is not StreamEnd.ERROR or not record.after_error:
        return []
    return [
        Finding(
            step_id,
            f"the stream ends at its error event ({record.error_type})",
            f"after it came {', '.join(record.after_error)}",
            curl_line(observation),
            label="a stream goes on after its error event",
        )
    ]


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
    own_property = scenario.step(step_id).safety_property
    state = context.reads.get(step_id) or read_trajectory(profile, observation.body)
    findings: list[Finding] = []
    # Counts written for a server that retries do not hold where a chat's
    # failure was passed through (its turn was, rightly, not committed): those
    # differences follow from the convention. What must never be there
    # (``excludes``) stays safety.
    follows = _counts_follow_from(scenario, context, profile)

    def convention(expected: str, actual: str, label: str) -> None:
        findings.append(Finding(step_id, expected, actual, repro, Kind.CONVENTION, label))

    def fail(expected: str, actual: str, label: str, *, count: bool = True) -> None:
        if count and follows is not None:
            convention(expected, actual, follows)
            return
        findings.append(
            Finding(step_id, expected, actual, repro, Kind.SAFETY, own_property or label)
        )

    # What is (or is not) in the trajectory first, then the counts: at one read
    # the specific finding is the cause the report leads with.
    messages = state.messages
    # On a tree, "in the trajectory" is in some branch: every turn counts.
    shown = [m for turn in state.turns or [] for m in turn] if state.turns is not None else messages
    committed = {message_key(m) for m in shown or []}
    if profile.trajectory.tree and state.turns is None:
        convention("every committed turn listed (model: tree)", "no readable list", UNREAD_TREE)
    rolled_back = _rolled_back(scenario, context, profile)
    for chat in expect.contains:
        answered = context.observations.get(chat)
        answer = answer_of(answered)
        excused = (
            _excused_refusal(scenario, chat, answered, profile, context.engine_calls.get(chat))
            if answered is not None and answer is None
            else None
        )
        if answer is None and excused is not None:
            # Refused by a convention (a refused retry, a failure passed through):
            # that its answer is not in the trajectory follows from it.
            convention(f"{chat}'s answer in the trajectory", f"{chat} got no answer", excused)
        elif answer is None:
            fail(f"{chat}'s answer in the trajectory", f"{chat} got no answer", REFUSED["chat"])
        elif state.turns is not None:
            if not state.has_turn([*context.sent_messages.get(chat, []), answer]):
                fail(f"{chat}'s turn in a branch of the tree", "it is in no branch", ANSWER_MISSING)
        elif message_key(answer) not in committed and chat in rolled_back:
            convention(
                f"{chat}'s answer in the trajectory",
                "it is missing: a later request rolled its turn back",
                ROLLED_BACK_DECLARED,
            )
        elif message_key(answer) not in committed:
            fail(f"{chat}'s answer in the trajectory", "it is missing", ANSWER_MISSING)
    for chat in expect.excludes:
        sent = context.sent_messages.get(chat)
        if sent and message_key(sent[-1]) in committed:
            if declared_rollback(chat, context, profile):
                convention(
                    f"{chat}'s message not in the trajectory",
                    "it is there: it rolled back the last turn",
                    ROLLED_BACK_DECLARED,
                )
                continue
            fail(
                f"{chat}'s message not in the trajectory",
                "it is there",
                _committed_label(scenario, context.observations.get(chat)),
                count=False,
            )
    # A log's read lists every call: the counts of a linear trajectory say nothing
    # there (what must be recorded, and only once, is judged on the final read).
    counted = profile.trajectory.num_assistant is not None and not profile.trajectory.log
    if expect.num_assistant is not None and counted and state.num_assistant != expect.num_assistant:
        fail(
            f"num_assistant = {expect.num_assistant}",
            f"num_assistant = {state.num_assistant!r}",
            COUNT_DIFFERS,
        )
    if (
        expect.in_flight is not None
        and state.in_flight is not None
        and state.in_flight != expect.in_flight
    ):
        fail(
            f"in_flight = {expect.in_flight}",
            f"in_flight = {state.in_flight}",
            "in_flight misreported",
        )
    if (
        expect.length is not None
        and not profile.trajectory.log
        and (messages is None or len(messages) != expect.length)
    ):
        fail(
            f"{expect.length} messages",
            "no readable trajectory" if messages is None else f"{len(messages)} messages",
            COUNT_DIFFERS,
        )
    return findings


def _counts_follow_from(scenario: Scenario, context: RunContext, profile: Profile) -> str | None:
    """The convention that counts written for the contract's behaviour no longer
    fit, where some step of the run showed one: an aborted completion kept (as
    declared), a failure passed through, a refused stream, a session created on
    first use. None: the counts are safety."""
    observed = context.observations.items()
    calls = context.engine_calls
    if profile.aborted_completions == "commit" and any(
        abort_answered(scenario, s, o, calls.get(s)) for s, o in observed
    ):
        return abort_label(profile)
    if any(passed_through(scenario, s, o, calls.get(s)) for s, o in observed):
        return passed_through_label(profile)
    if any(refused_stream(scenario, s, o, profile) for s, o in observed):
        return streaming_label(profile, "unsupported")
    if _implicit_creation_showed(scenario, context, profile):
        return _declared(IMPLICIT_CREATION, True)
    return None


def _check_groups(scenario: Scenario, context: RunContext, profile: Profile) -> list[Finding]:
    findings: list[Finding] = []
    # A group of streamed chats on a server that refuses to stream: none could
    # succeed, by design, not by a race.
    refused = any(refused_stream(scenario, s, o, profile) for s, o in context.observations.items())
    for group in scenario.expect.groups:
        kind, steps = group.kind_and_steps
        matcher = parse_status(group.status)
        observed = {s: context.observations.get(s) for s in steps}
        # A group of successes counts successes: which 2xx each answered (200 for
        # the contract's 204, say) is its step's convention, judged there.
        successes = bool(matcher.codes) and all(c // 100 == 2 for c in matcher.codes)
        # A 200 stream that ended with an error event was a refusal, not a success.
        hits = [
            s
            for s, o in observed.items()
            if o is not None
            and ((o.status or 0) // 100 == 2 if successes else matcher.matches(o.status))
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
                    # Seen once the last of its steps has answered.
                    seen_at=max((o.ended for o in observed.values() if o), default=None),
                )
            )
    return findings


def _check_durable(scenario: Scenario, context: RunContext, profile: Profile) -> list[Finding]:
    if profile.trajectory.log:
        return _check_log(scenario, context)
    findings: list[Finding] = []
    unreadable_reported: set[str] = set()
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
        unreadable = context.unreadable_finals.get(session_id)
        if final is None and unreadable is not None and session_id not in unreadable_reported:
            unreadable_reported.add(session_id)
            # Once per session: the first turn answered 200 that cannot be found.
            findings.append(
                Finding(
                    step.id,
                    f"{step.id} answered 200, so its turn is in the final trajectory",
                    f"the final read answered {describe_answer(unreadable)} with no "
                    f"trajectory the profile can read: {_excerpt(unreadable.body)}",
                    curl_line(unreadable),
                    label="trajectory unreadable after a turn answered 200",
                )
            )
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
        prefix = [message_key(m) for m in messages[: len(turn)]]
        if prefix[:-1] == [message_key(m) for m in turn[:-1]] and observation.stream:
            if prefix[-1:] != [message_key(answer)]:
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
        elif prefix != [message_key(m) for m in turn]:
            altered = _altered_at(turn, messages)
            if altered is not None:
                findings.append(
                    Finding(
                        step.id,
                        f"{step.id} answered 200, so its turn is in the final trajectory "
                        "as it was sent and answered",
                        f"message {altered} was committed as {_excerpt(messages[altered])}, "
                        f"not as sent: {_excerpt(turn[altered])}",
                        curl_line(observation),
                        label="committed turn altered",
                    )
                )
                continue
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


def _check_log(scenario: Scenario, context: RunContext) -> list[Finding]:
    """Where every call is a record: each chat answered 200 is in the final read
    exactly once, and no record is there for a turn that was never sent, or that
    was refused. Records that are only token ids are counted instead."""
    findings: list[Finding] = []
    chats = [s for s in scenario.steps if isinstance(s, ChatStep)]
    for session_id, final in context.final_trajectories.items():
        unreadable = context.unreadable_finals.get(session_id)
        mine = [s for s in chats if context.session_of_step.get(s.id) == session_id]
        answered = [s for s in mine if _answered_200(context.observations.get(s.id))]
        if final is None:
            if answered and unreadable is not None:
                findings.append(
                    Finding(
                        answered[0].id,
                        f"{answered[0].id} answered 200, so its call is a record of the read",
                        f"the final read answered {describe_answer(unreadable)} with no "
                        f"records the profile can read: {_excerpt(unreadable.body)}",
                        curl_line(unreadable),
                        label="trajectory unreadable after a turn answered 200",
                    )
                )
            continue
        # A turn whose fate its client never learned (no answer, a hang-up) may
        # be recorded or not; one refused, or failed, may not.
        possible = [s for s in mine if _may_be_recorded(context.observations.get(s.id))]
        if final.turns is None:
            count = final.record_count or 0
            if count < len(answered):
                findings.append(
                    _log_finding(
                        answered[-1].id,
                        context,
                        f"{len(answered)} turn(s) answered 200 on this session, so the read "
                        f"lists at least {len(answered)} record(s)",
                        f"it lists {count}: a turn answered 200 is missing",
                        ANSWER_MISSING,
                    )
                )
            elif count > len(possible):
                findings.append(
                    _log_finding(
                        mine[-1].id if mine else None,
                        context,
                        f"at most {len(possible)} record(s): one per turn that was not refused",
                        f"the read lists {count}",
                        RECORDED_TWICE,
                    )
                )
            continue
        turns = Counter(tuple(keys_of(turn)) for turn in final.turns)
        expected: dict[tuple[Any, ...], list[str]] = {}
        for step in answered:
            answer = answer_of(context.observations.get(step.id))
            assert answer is not None
            key = tuple(keys_of([*context.sent_messages[step.id], answer]))
            expected.setdefault(key, []).append(step.id)
        for key, steps in expected.items():
            recorded = turns.get(key, 0)
            if recorded < len(steps):
                missing = steps[recorded]
                findings.append(
                    _log_finding(
                        missing,
                        context,
                        f"{missing} answered 200, so its call is a record of the final read",
                        f"it is not (the read has {len(final.turns)} record(s)): a phantom commit"
                        if recorded == 0
                        else f"{len(steps)} turns answered it, {recorded} record(s) hold it",
                        ANSWER_MISSING,
                    )
                )

        # Counted by request: a call the server made twice is two records of one
        # request, whatever the engine answered each time.
        def request_key(step: ChatStep) -> tuple[Any, ...]:
            return tuple(keys_of(context.sent_messages.get(step.id)))

        by_request: Counter[tuple[Any, ...]] = Counter()
        for key, recorded in turns.items():
            by_request[key[:-1]] += recorded
        for request, recorded in by_request.items():
            senders = [s for s in mine if request_key(s) == request]
            allowed = sum(1 for s in senders if s in possible)
            if recorded <= allowed or not senders:
                continue  # a record of a request sessctl never sent is not its to judge
            twice = any(s in answered for s in senders)
            findings.append(
                _log_finding(
                    senders[-1].id,
                    context,
                    "each turn answered 200 is recorded once; a turn refused or failed, not at all",
                    f"{recorded} record(s) of the request {senders[-1].id} sent, where "
                    f"{allowed} call(s) could have made one",
                    RECORDED_TWICE if twice else RECORDED_REFUSED,
                )
            )
    return findings


RECORDED_TWICE = "a turn recorded more than once"
RECORDED_REFUSED = "a refused or failed turn recorded"


def _answered_200(observation: Observation | None) -> bool:
    if observation is None or observation.status is None or observation.status // 100 != 2:
        return False
    if observation.stream is not None and observation.stream.end is not StreamEnd.DONE:
        return False
    return answer_of(observation) is not None


def _may_be_recorded(observation: Observation | None) -> bool:
    """Might the server have recorded this call? Yes if it answered 200, or if its
    client never learned the outcome (no answer, a hang-up, a cut stream)."""
    if observation is None:
        return False
    if observation.status is None:
        return True
    if observation.status // 100 != 2:
        return False
    record = observation.stream
    return record is None or record.end in (StreamEnd.DONE, StreamEnd.HUNG_UP, StreamEnd.CUT)


def _log_finding(
    step: str | None, context: RunContext, expected: str, seen: str, label: str
) -> Finding:
    observation = context.observations.get(step or "")
    return Finding(
        step,
        expected,
        seen,
        curl_line(observation) if observation is not None else None,
        label=label,
    )


def _altered_at(turn: list[dict[str, Any]], committed: list[Any]) -> int | None:
    """Where the committed trajectory holds this turn's message changed (its text
    is there, something else about it is not), rather than another turn in its
    place (a phantom commit); None if it is not such a change."""
    divergence = first_divergence(turn, committed)
    if divergence is None or divergence >= len(committed):
        return None
    sent, stored = turn[divergence], committed[divergence]
    if not isinstance(stored, dict) or not isinstance(sent, dict):
        return divergence if isinstance(sent, dict) else None
    same_text = sent.get("content") and sent.get("content") == stored.get("content")
    return divergence if same_text else None


UNREAD_TREE = "profile: model tree, but the server's answer lists no turns as records"


def _committed_label(scenario: Scenario, observation: Observation | None) -> str:
    """The label of a turn in the trajectory that should not be, by how it ended."""
    if observation is None or observation.cancelled_by_scenario:
        return "commit after the client hung up"
    if observation.stream is not None and observation.stream.end is StreamEnd.HUNG_UP:
        return "commit after the client hung up"
    if observation.stream is not None and not observation.succeeded:
        return "commit after a stream error"
    if observation.status is None or observation.status // 100 != 2:
        return "a refused turn committed"
    return scenario.guards  # answered 200 where a refusal was expected: the race itself


COUNT_DIFFERS = "trajectory length differs from the turns answered"
ANSWER_MISSING = "phantom commit"
"""A turn answered 200 that a read does not show: what ``durable`` calls it too."""


def turn_committed(state: TrajectoryState, turn: list[dict[str, Any]]) -> bool:
    """Is ``turn`` (a request's messages, then its answer) committed: a prefix of
    the trajectory, or on a tree, in some branch?"""
    if state.turns is not None:
        return state.has_turn(turn)
    messages = state.messages or []
    wanted = [message_key(m) for m in turn]
    return [message_key(m) for m in messages[: len(turn)]] == wanted


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
        before = [message_key(m) for m in context.seen_before.get(step.id, [])]
        for other, sent in context.sent_messages.items():
            answer = answer_of(context.observations.get(other))
            if (
                other != step.id
                and answer is not None
                and [message_key(m) for m in [*sent, answer]] == before
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


def server_fault(observation: Observation, observations: dict[str, Observation]) -> Finding:
    """A request the server, up and reachable, gave no HTTP answer to: a finding of
    its own kind, naming the request sent just before it (a body that blocked the
    server's loop is the usual cause of the next request's silence)."""
    reason = observation.transport_error or "no answer"
    if reason.startswith("no answer within"):
        label = "server fault: no answer within the request timeout"
    elif reason.startswith(("RemoteProtocolError", "LocalProtocolError", "DecodingError")):
        label = "server fault: malformed HTTP answer"
    else:
        label = "server fault: connection reset or closed without an answer"
    before = [
        other
        for other in observations.values()
        if other.step != observation.step
        and other.request is not None
        and other.started <= observation.started
    ]
    actual = reason
    if observation.request is not None and observation.request.raw_size:
        actual += f" to a {observation.request.raw_size}-byte body"
    if before:
        previous = max(before, key=lambda other: other.started)
        assert previous.request is not None
        size = f", a {previous.request.raw_size}-byte body" if previous.request.raw_size else ""
        actual += (
            f"; the request before it was {previous.step} ({previous.request.method} "
            f"{previous.request.url}{size}), answered {describe_answer(previous)}"
        )
    return Finding(
        observation.step,
        "an HTTP answer from a server that is up",
        actual,
        curl_line(observation),
        Kind.FAULT,
        label,
    )


def _excerpt(body: Any, limit: int = 160) -> str:
    text = " ".join(json.dumps(body, default=repr).split())
    return text if len(text) <= limit else text[:limit] + "..."


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
    secrets: list[str] = []
    for name, value in request.headers:
        if name.lower() in ("content-type", "connection") and request.json_body is not None:
            continue
        header = f"{name}: {value}"
        parts += ["-H", header]
        if "$" in value:
            secrets.append(header)
    if request.json_body is not None:
        parts += ["-H", "content-type: application/json", "-d", json.dumps(request.json_body)]
    elif request.raw_body is not None:
        parts += ["--data-binary", request.raw_body.decode(errors="replace")]
    elif request.raw_size:
        return _expanding(shlex.join(parts), secrets) + f"  # with a {request.raw_size}-byte body"
    return _expanding(shlex.join(parts), secrets)


def _expanding(line: str, secrets: list[str]) -> str:
    """The line with each header that names a secret (``$AREAL_ADMIN_KEY``) in
    double quotes, so the shell puts the key in and the report never holds it."""
    for header in secrets:
        line = line.replace(shlex.quote(header), '"' + header + '"')
    return line
