"""Scenario files: the built-in library is complete, and bad files fail at file:line:col."""

from __future__ import annotations

import pytest

from harness.errors import ScenarioFileError
from harness.model.loader import builtin_scenario_files, load_scenarios, parse_scenario
from harness.model.scenario import ChatStep, parse_status


def test_every_builtin_scenario_loads_and_explains_itself() -> None:
    scenarios = load_scenarios([])
    assert len(scenarios) == len(builtin_scenario_files()) >= 14
    for scenario in scenarios:
        assert scenario.description.strip(), scenario.name
        assert len(scenario.why.split()) >= 15, f"{scenario.name} must say why its codes are right"
        assert scenario.source.startswith("builtin:")


def test_filter_selects_by_glob() -> None:
    names = [s.name for s in load_scenarios([], "double-delete-*")]
    assert names == ["double-delete-sequential", "double-delete-concurrent"]
    assert [s.name for s in load_scenarios([], "bad-input, chat-never*")] == [
        "chat-never-existed",
        "bad-input",
    ]


HEAD = "name: x\ndescription: d\nsteps:\n  - create: s1\n"


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("name: x\ndescription: d\nsteps:\n  - create: s1\n   - chat: c1\n", 5, 4, "invalid YAML"),
        (HEAD + "  - chat: c1\n    upstream: holdd\n", 6, 15, "unknown upstream behaviour 'holdd'"),
        (HEAD + "  - chat: c1\n    expect: {status: 99x}\n", 6, 22, "'99x' is not a status"),
        (HEAD + "  - chat: c1\n    sesion: s1\n", 6, 5, "unknown field 'sesion'"),
        (HEAD + "  - wait: c9.received\n", 5, 11, "'c9' is not an earlier step"),
        (HEAD + "  - wait: c1.exploded\n", 5, 11, "wait"),
        (HEAD + "  - frobnicate: z\n", 5, 5, "a step needs exactly one of"),
        (HEAD + "  - chat: c1\n  - chat: c1\n", 6, 5, "used twice"),
        (HEAD + "  - chat: c1\n    session: s9\n", 6, 14, "session 's9' is not created"),
        (HEAD + "  - delete: d1\n  - cancel: d1\n", 6, 13, "is not a chat step"),
        (HEAD + "  - chat: c1\n  - cancel: c1\n", 6, 13, "must be a background step"),
        (
            HEAD + "  - request: r1\n    path: /x\n    body: '{}'\n    json: {}\n",
            5,
            5,
            "at most one of body, json, body_bytes, generate",
        ),
        (
            HEAD + "  - request: r1\n    path: /x\n    generate: {nesting: 5, integer_digits: 5}\n",
            7,
            15,
            "exactly one of nesting, integer_digits",
        ),
        ("name: x\nsteps:\n  - create: s1\n", 1, 1, "missing field 'description'"),
        ("name: Bad Name\ndescription: d\nsteps: []\n", 3, 8, "'steps' must be a non-empty list"),
        ("- just a list\n", 1, 1, "must be a YAML mapping"),
        (
            HEAD + "expect:\n  groups:\n    - exactly_one: [d1]\n      status: 204\n",
            7,
            20,
            "'d1' is not a step",
        ),
        (
            HEAD + "  - get: g1\n    expect: {tree: {contains: [c9]}}\n",
            6,
            13,
            "'c9' is not an earlier chat step",
        ),
        (HEAD + "expect:\n  tree:\n    upstream:\n      c9: {calls: 1}\n", 8, 11, "'c9'"),
        (HEAD + "  - chat: c1\n    expect: {tree: {staus: 200}}\n", 6, 21, "unknown field"),
    ],
)
def test_malformed_files_name_the_line_and_column(
    text: str, line: int, column: int, message: str
) -> None:
    with pytest.raises(ScenarioFileError) as raised:
        parse_scenario(text, "bad.yaml")
    error = raised.value
    assert (error.line, error.column) == (line, column), str(error)
    assert message in error.message
    assert str(error).startswith(f"bad.yaml:{line}:{column}: ")


def test_status_specs() -> None:
    matcher = parse_status([204, "4xx"])
    assert matcher.matches(204)
    assert matcher.matches(410)
    assert not matcher.matches(200)
    assert not matcher.matches(None)
    assert matcher.describe() == "204 or 4xx"
    with pytest.raises(ValueError, match="not a status"):
        parse_status("2xy")


def test_a_chat_script_is_one_behaviour_per_call() -> None:
    scenario = parse_scenario(
        HEAD + "  - chat: c1\n    upstream: [abort, {status: 503}, {delay: 0.5}, respond]\n", "x"
    )
    step = scenario.step("c1")
    assert isinstance(step, ChatStep)
    assert [b.describe() for b in step.behaviours] == [
        "abort",
        "status 503",
        "delay 0.5s",
        "respond",
    ]


def test_a_latency_budget_is_judged_only_when_asked_for() -> None:
    from harness.results import Kind, Observation
    from harness.run.checks import check_run
    from harness.run.context import RunContext

    scenario = parse_scenario(
        HEAD + "  - get: g1\n    expect: {status: 200, within_ms: 100}\n", "x"
    )
    slow = Observation("g1", "get", None, 200, started=10.0, ended=10.25, body={})
    context = RunContext(observations={"g1": slow})
    # By default a wall-clock figure never decides a verdict.
    assert check_run(scenario, context) == []
    (finding,) = check_run(scenario, context, timing_bounds=True)
    assert finding.kind is Kind.SAFETY
    assert finding.expected == "an answer within 100 ms (--latency-budgets)"
    assert finding.actual == "250.0 ms"
    assert finding.label == "GET over its latency budget"


def test_a_scenario_says_what_differs_on_a_tree_and_nothing_else_changes() -> None:
    [scenario] = load_scenarios([], "concurrent-writers-no-phantom")
    linear, tree = scenario.for_model("linear"), scenario.for_model("tree")
    c2_linear, c2_tree = linear.step("c2").expect, tree.step("c2").expect
    assert c2_linear is not None
    assert c2_tree is not None
    assert (c2_linear.status, c2_linear.error_type) == (409, "trajectory_conflict")
    assert (c2_tree.status, c2_tree.error_type) == (200, None)
    get_linear, get_tree = linear.step("g1").expect, tree.step("g1").expect
    assert get_linear is not None
    assert get_tree is not None
    assert (get_tree.contains, get_tree.excludes, get_tree.num_assistant) == (
        ["c1", "c2"],
        [],
        None,
    )
    assert (get_linear.contains, get_linear.excludes) == (["c1"], ["c2"])
    assert get_tree.status == get_linear.status == 200  # not named under tree: kept
    assert [g.kind_and_steps for g in linear.expect.groups] == [("exactly_one", ["c1", "c2"])]
    assert tree.expect.groups == []
    assert tree.expect.upstream["c2"].calls == 1
    assert linear.expect.upstream["c2"].calls == 0
    # Resolved once, a scenario has no tree expectations left to apply.
    assert tree.for_model("linear") == tree
    assert all(s.expect is None or s.expect.on_tree is None for s in tree.steps)
