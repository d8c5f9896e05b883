"""The observer never crashes: any JSON a server answers or commits is judged.

A server under test can send anything back: a role that is a list, a message
that is a number, records that are strings. Whatever it sends, the checks must
return findings (and the reports must be written), never raise: a crash loses
every result of the run. Hypothesis feeds the checks arbitrary JSON answers and
trajectories, on every scenario of the library and every built-in profile.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.chaos.history import Operation
from harness.chaos.linearizability import check_history
from harness.model.loader import load_scenarios
from harness.model.messages import message_key
from harness.model.profile import load_profile, read_trajectory
from harness.model.scenario import HTTP_OPS, ChatStep
from harness.report.exporters import to_json, write_junit
from harness.results import (
    Finding,
    Observation,
    RunResult,
    SentRequest,
    StreamEnd,
    StreamRecord,
    SuiteResult,
    Verdict,
)
from harness.run.checks import check_run, with_causes
from harness.run.context import RunContext
from harness.run.suite import summarise

SCENARIOS = load_scenarios([])
PROFILES = ["reference", "records-tool-400", "tree-turns", "anthropic-messages", "bearer-implicit"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)  # Python's json reads NaN
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
# Shaped enough to reach the deep paths: messages, choices, records.
messages = st.lists(
    st.fixed_dictionaries(
        {"role": json_values | st.sampled_from(["user", "assistant", "tool"])},
        optional={
            "content": json_values,
            "tool_calls": json_values,
            "tool_call_id": json_values,
            "name": json_values,
        },
    )
    | json_values,
    max_size=4,
)
answers = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "choices": st.lists(
                st.fixed_dictionaries({"message": json_values, "finish_reason": json_values}),
                max_size=2,
            )
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("message"), "content": json_values, "stop_reason": json_values}
    ),
    st.fixed_dictionaries({"error": json_values}),
)
reads = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"messages": messages | json_values},
        optional={"num_assistant": json_values, "in_flight": json_values},
    ),
    st.fixed_dictionaries(
        {
            "records": st.lists(
                st.fixed_dictionaries(
                    {
                        "request": st.fixed_dictionaries({"messages": messages}) | json_values,
                        "response": answers,
                    }
                )
                | json_values,
                max_size=3,
            )
            | json_values
        }
    ),
)
sent_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "tool"]), "content": st.text(min_size=1, max_size=5)}
    ),
    min_size=1,
    max_size=3,
)
statuses = st.none() | st.sampled_from([200, 201, 204, 400, 404, 409, 410, 422, 500, 502])
streams = st.none() | st.builds(
    StreamRecord,
    st.sampled_from(list(StreamEnd)),
    st.integers(0, 5),
    st.booleans(),
    st.none() | st.fixed_dictionaries({"role": json_values, "content": json_values}),
    st.none() | st.text(max_size=5),
    st.none(),
    st.none() | st.text(max_size=5),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenario_index=st.integers(0, len(SCENARIOS) - 1),
    profile_name=st.sampled_from(PROFILES),
    data=st.data(),
    placed=st.booleans(),
)
def test_any_answer_and_any_trajectory_is_judged(
    scenario_index: int, profile_name: str, data: st.DataObject, placed: bool, tmp_path_factory: Any
) -> None:
    profile = load_profile(profile_name)
    scenario = SCENARIOS[scenario_index].for_model(profile.trajectory.model)
    context = RunContext()
    clock = 0.0
    for step in scenario.steps:
        if step.op not in HTTP_OPS:
            continue
        clock += data.draw(st.floats(0, 1))
        context.session_of_step[step.id] = "s"
        if isinstance(step, ChatStep):
            # What the harness sent is well-formed; what it last saw committed is not.
            context.sent_messages[step.id] = data.draw(sent_messages)
            context.seen_before[step.id] = data.draw(messages)  # type: ignore[arg-type]
            context.engine_calls[step.id] = data.draw(st.integers(0, 3))
        if step.op == "get":
            context.reads[step.id] = read_trajectory(profile, data.draw(reads), data.draw(reads))
        status = data.draw(statuses)
        context.observations[step.id] = Observation(
            step.id,
            step.op,
            SentRequest.of("POST", "http://x/y", data.draw(json_values), None),
            status,
            clock,
            clock + data.draw(st.floats(0, 1)),
            body=data.draw(answers),
            transport_error=None if status is not None else "no answer within 1 s",
            stream=data.draw(streams) if isinstance(step, ChatStep) and step.stream else None,
        )
    final = read_trajectory(profile, data.draw(reads), data.draw(reads))
    context.final_trajectories["s"] = final if isinstance(final.messages, list) else None

    findings = with_causes(check_run(scenario, context, profile, placed=placed))

    assert all(isinstance(f, Finding) for f in findings)
    verdict = Verdict.FAIL if findings else Verdict.PASS
    run = RunResult(0, verdict, dict(context.observations), findings)
    suite = SuiteResult(["t"], [summarise(scenario, "t", [run])])
    to_json(suite, {})
    write_junit(tmp_path_factory.mktemp("junit") / "r.xml", suite, {})


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_any_json_value_has_a_message_key(value: Any) -> None:
    key = message_key(value)
    hash(key)
    assert message_key(value) == key or _has_nan(value)


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return False


@settings(max_examples=100, deadline=None)
@given(read=messages, answer=json_values, sent=sent_messages)
def test_the_history_checker_judges_any_read_and_answer(
    read: list[Any], answer: Any, sent: list[Any]
) -> None:
    operations = [
        Operation(id=0, client=0, op="create", session="s", invoke=0, complete=1, status=201),
        Operation(
            id=1, client=0, op="chat", session="s", invoke=2, complete=3, status=200,
            messages=sent, answer=answer if isinstance(answer, dict) else {"content": answer},
        ),
        Operation(
            id=2, client=0, op="get", session="s", invoke=4, complete=5, status=200,
            messages=read,
        ),
    ]  # fmt: skip
    check_history(operations)
