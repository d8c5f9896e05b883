"""``sessctl explore``: the cells, the reference server passing every applicable one,
each known-broken variant failing one with a finding that names its bug, and the
command as a user runs it (the matrix, the JSON and HTML it writes, the shrunk
scenario that replays a failed cell)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.chaos.shrink import ShrinkSettings
from harness.errors import ScenarioFileError
from harness.explore.cells import (
    BEHAVIOURS,
    INTERFERERS,
    PHASES,
    Cell,
    all_cells,
    not_applicable,
    plan,
    select,
    unknown_patterns,
)
from harness.explore.explore import ExploreSettings, run_explore
from harness.model.profile import REFERENCE_PROFILE, load_profile
from harness.upstream.script import parse_behaviour

from .conftest import sessctl_cli

RETRY_RACED = "its wait before a retry is shorter than a round trip"
"""The one reason a cell may be untested on the reference server: under load, its
50 ms back-off can pass before the interfering request is answered."""


def test_the_product_is_every_phase_interferer_and_behaviour() -> None:
    cells = all_cells()
    assert len(cells) == len(PHASES) * len(INTERFERERS) * len(BEHAVIOURS)
    assert len(set(cells)) == len(cells)
    assert [c.name for c in select(cells, ["held/delete/*"])] == [
        f"held/delete/{b}" for b in BEHAVIOURS
    ]
    assert {c.behaviour for c in select(cells, ["*/*/tool-call*"])} == {
        "tool-call",
        "tool-call-stream",
    }
    assert unknown_patterns(["held/delete/*", "hold/*/*"]) == ["hold/*/*"]


def test_every_applicable_cell_has_a_script_the_upstream_plays() -> None:
    for cell in all_cells():
        if not_applicable(cell, REFERENCE_PROFILE) is None:
            turn = plan(cell)
            for spec in turn.script:
                parse_behaviour(spec)  # raises on a script the upstream cannot play


def test_a_profile_prunes_the_cells_its_server_cannot_show() -> None:
    buffered = load_profile("records-tool-400")
    streaming = Cell("streaming", "delete", "text-stream")
    assert not_applicable(streaming, REFERENCE_PROFILE) is None
    assert "buffered streaming" in (not_applicable(streaming, buffered) or "")
    assert "not streamed" in (not_applicable(Cell("streaming", "delete", "text"), buffered) or "")
    assert "does not fail" in (not_applicable(Cell("retry-wait", "get", "text"), buffered) or "")
    assert "nothing is in flight" in (
        not_applicable(Cell("answered", "hangup", "text"), REFERENCE_PROFILE) or ""
    )


async def test_the_reference_server_passes_every_applicable_cell() -> None:
    report = await run_explore(ExploreSettings(parallel=8), should_stop=lambda: False)
    assert len(report.results) == len(all_cells())
    assert report.failed == [], [r.why for r in report.failed][:3]
    untested = [r for r in report.results if r.outcome == "untested"]
    assert all(r.cell.phase == "retry-wait" and RETRY_RACED in r.why for r in untested), untested
    # Most of the product applies to the reference server, and it passes.
    assert report.count("passed") > 400
    # A phase it does show is never called not applicable: it retries, relays
    # chunks as they come and queues a session's turns.
    for cell in ("retry-wait/delete/503-then-ok", "streaming/delete/text-stream",
                 "queued/delete/text", "finished/get/tool-call-stream"):  # fmt: skip
        (result,) = [r for r in report.results if r.cell.name == cell]
        assert result.outcome == "passed", result


# Each variant, and cells that catch it with the finding that names its bug.
CAUGHT = {
    "autocreate-after-delete": ("answered/delete/text", {"linearizability"}),
    "split-lock": ("held/writer-same/text", {"linearizability", "durability"}),
    "delete-waits": ("held/delete/text", {"delete-waits"}),
    "queued-proceed": ("queued/delete/text", {"llm-leak"}),
    "double-delete-ok": ("answered/delete-twice/text", {"linearizability"}),
    "leak-upstream": ("held/hangup/text", {"hangup-ignored"}),
    "commit-on-disconnect": ("held/hangup/text", {"hangup-ignored", "linearizability"}),
    "commit-aborted": ("received/get/abort-then-ok", {"answer-not-from-engine"}),
    "loose-input": ("answered/malformed/text", {"accepted-malformed"}),
    "commit-partial-stream": ("answered/get/cut-then-ok", {"committed-after-error"}),
    "delete-waits-for-stream": ("held/delete/text-stream", {"delete-waits"}),
    "commit-abandoned-stream": ("streaming/hangup/text-stream", {"hangup-ignored"}),
    "prompt-tail-after-cut": ("answered/get/cut-then-ok", {"committed-after-error"}),
    "last-writer-wins": ("answered/writer-divergent/text", {"linearizability", "durability"}),
    # The variants written for the cells exploration added:
    "done-after-error": ("answered/get/cut-then-ok", {"data-after-error"}),
    "retry-after-relay": (
        "answered/get/cut-then-ok",
        {"answer-not-from-engine", "stream-mismatch"},
    ),
    "retry-after-delete": ("retry-wait/delete/503-then-ok", {"llm-leak", "delete-waits"}),
    "global-lock": ("held/other-session/text", {"other-session-waits"}),
    "streamed-tool-calls-dropped": ("answered/get/tool-call-stream", {"stream-mismatch"}),
}


@pytest.mark.parametrize("variant", sorted(CAUGHT))
async def test_each_known_broken_variant_fails_a_cell_that_names_its_bug(variant: str) -> None:
    cell, kinds = CAUGHT[variant]
    settings = ExploreSettings(cells=tuple(select(all_cells(), [cell])))
    report = await run_explore(settings, emulate=variant)
    (result,) = report.results
    assert result.outcome == "failed", result
    assert result.findings[0].kind in kinds, result.why


def test_every_variant_has_a_cell_that_catches_it() -> None:
    from refserver.variants import VARIANTS

    assert set(CAUGHT) == set(VARIANTS)


async def test_the_command_writes_the_matrix_json_and_html(tmp_path: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "explore.json"
    code, text = await sessctl_cli(
        "explore", "--cells", "held/*/*", "--cells", "retry-wait/delete/*",
        "--out", str(out), "--json", str(report),
    )  # fmt: skip
    assert code == 0, text
    assert "Traceback" not in text
    assert "phase \\ interferer" in text
    assert "PASS: 90 cells:" in text
    document = json.loads(report.read_text())
    assert document == json.loads((out / "report.json").read_text())
    assert document["summary"]["cells"] == 90
    assert document["summary"]["failed"] == 0
    cell = next(c for c in document["cells"] if c["cell"] == "held/delete/text")
    assert cell["outcome"] == "passed"
    assert "delete 204" in cell["why"]
    garbage = next(c for c in document["cells"] if c["cell"] == "held/delete/garbage")
    assert garbage["outcome"] == "not applicable"
    page = (out / "coverage.html").read_text()
    assert "<table class='matrix'>" in page
    assert page.count("class='sq'") >= 90
    assert "held/delete/text: passed." in page


async def test_a_failed_cell_is_reported_by_cause_and_shrunk_to_a_scenario(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    code, text = await sessctl_cli(
        "explore", "--emulate", "split-lock", "--cells", "held/writer-same/text",
        "--cells", "held/get/text", "--out", str(out), "--shrink-budget", "30",
    )  # fmt: skip
    assert code == 1, text
    assert "✗ 1 cell: " in text
    assert "e.g. held/writer-same/text: " in text
    assert "FAIL: 2 cells: 1 passed, 1 failed" in text
    document = json.loads((out / "report.json").read_text())
    (failed,) = [c for c in document["cells"] if c["outcome"] == "failed"]
    assert failed["findings"][0]["property"] in (
        "answers that no order of the operations explains",
        "phantom commit",
    )
    shrunk = document["shrunk"]
    assert shrunk["cell"] == "held/writer-same/text"
    scenario = Path(shrunk["file"])
    header = scenario.read_text()  # noqa: ASYNC240
    assert header.startswith("# Shrunk by sessctl explore from the failed cell")
    page = (out / "coverage.html").read_text()
    assert "id='cell-held-writer-same-text'" in page
    assert "<svg" in page  # the failed cell's history drawn
    # The scenario replays the failure on the variant, and passes on the reference.
    code, replay = await sessctl_cli("run-scenarios", str(scenario), "--emulate", "split-lock")
    assert code == 1, replay
    code, replay = await sessctl_cli("run-scenarios", str(scenario))
    assert code == 0, replay


async def test_bad_options_are_usage_errors() -> None:
    code, text = await sessctl_cli("explore", "--cells", "hold/*/*")
    assert code == 2
    assert "--cells 'hold/*/*' matches no cell" in text
    code, text = await sessctl_cli("explore", "--parallel", "0")
    assert code == 2
    assert "--parallel must be at least 1" in text
    code, text = await sessctl_cli("explore", "--profile", "areal-proxy")
    assert code == 2
    assert "every call is a record" in text or "reads each session once" in text
    code, text = await sessctl_cli("explore", "--list-cells")
    assert code == 0
    for name in ("retry-wait", "writer-divergent", "cut-then-ok"):
        assert name in text


async def test_run_scenarios_names_what_follows_an_error_event(tmp_path: Path) -> None:
    """The check exploration added to every streamed step, as a user meets it: a
    [DONE] after the error event is its own finding, not the scenario's headline."""
    report = tmp_path / "report.json"
    code, text = await sessctl_cli(
        "run-scenarios", "scenarios/32-stream-cut-then-engine-recovers.yaml",
        "--emulate", "done-after-error", "--json", str(report),
    )  # fmt: skip
    assert code == 1, text
    assert "after it came [DONE]" in text
    document = json.loads(report.read_text())
    labels = {f["label"] for s in document["scenarios"] for r in s["runs"] for f in r["failures"]}
    assert "a stream goes on after its error event" in labels
    code, text = await sessctl_cli(
        "run-scenarios", "scenarios/32-stream-cut-then-engine-recovers.yaml"
    )
    assert code == 0, text


async def test_a_scenario_the_shrinker_cannot_read_leaves_the_failed_cell_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As in chaos and load (one mechanism, ``shrink_on``): a shrinker bug must not
    turn a failed cell into an error that loses the run."""

    def refuse(text: str, source: str) -> None:
        raise ScenarioFileError(source, 14, 12, "'c176' is not an earlier step")

    monkeypatch.setattr("harness.chaos.shrink.parse_scenario", refuse)
    settings = ExploreSettings(cells=tuple(select(all_cells(), ["held/writer-same/text"])))
    report = await run_explore(
        settings, emulate="split-lock", shrink_settings=ShrinkSettings(time_budget=30)
    )
    (result,) = report.results
    assert result.outcome == "failed"
    assert report.shrunk is None
    assert report.shrunk_cell is None
    assert report.shrink_skipped is not None
    assert "could not read" in report.shrink_skipped
    assert "'c176' is not an earlier step" in report.shrink_skipped
