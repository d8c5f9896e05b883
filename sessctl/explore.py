"""``sessctl explore`` as a plain function."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from rich.console import Console

from harness.chaos.shrink import ShrinkResult, ShrinkSettings
from harness.chaos.workload import describe_target
from harness.explore.explore import ExploreReport, ExploreSettings, run_explore
from harness.report.console import (
    announce_chaos_upstream,
    chaos_progress,
    render_shrink,
    render_shrink_skipped,
)
from harness.report.coverage import coverage_html, coverage_json, render_coverage

from .chaos import replay_command, target_and_upstream
from .interrupt import StopRequest, run_interruptibly
from .run import INTERRUPTED, write_json_file, writing


def explore(
    settings: ExploreSettings,
    target: str | None,
    emulate: str | None,
    listen: str | None,
    out: Path | None,
    json_path: Path | None,
    console: Console,
    shrink: ShrinkSettings | None = None,
    scenario_out: Path | None = None,
    profile_option: str | None = None,
) -> int:
    """Run the cells, show the coverage, write the reports; 0 no cell failed, 1 one did."""
    url, listen, host, port = target_and_upstream(target, listen)
    what = describe_target(url, emulate)
    console.print(f"explore: {len(settings.cells)} cells against {what}")
    stop = StopRequest()
    with chaos_progress(console, len(settings.cells), label="explore", unit="cells") as progress:
        done = 0

        def on_cell(_: object) -> None:
            nonlocal done
            done += 1
            progress(done)

        report = run_interruptibly(
            partial(
                run_explore,
                settings,
                url,
                emulate=emulate,
                upstream_host=host,
                upstream_port=port,
                on_upstream_ready=(
                    partial(announce_chaos_upstream, console, flavor=settings.flavor)
                    if url
                    else None
                ),
                on_cell=on_cell,
                should_stop=stop,
                shrink_settings=shrink,
                on_shrinking=lambda: console.print(
                    "a cell failed; shrinking its history to a scenario..."
                ),
            ),
            stop=stop,
        )
    render_coverage(console, report, what)
    scenario_path = None
    replay = None
    if report.shrunk is not None:
        scenario_path = scenario_out or (out or Path(".")) / f"{report.shrunk.name}.yaml"
        replay = replay_command(scenario_path, url, emulate, listen, profile_option)
    document = coverage_json(report, what) | {"shrunk": _shrunk_json(report, scenario_path)}
    paths: list[Path] = []
    if out is not None:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        write_json_file(out / "report.json", document)
        page = out / "coverage.html"
        with writing(page):
            page.write_text(coverage_html(report, what), encoding="utf-8")
        paths += [out / "report.json", page]
    if json_path is not None:
        write_json_file(json_path, document)
        paths.append(json_path)
    if report.shrunk is not None and scenario_path is not None and replay is not None:
        with writing(scenario_path):
            scenario_path.write_text(
                _scenario_file(report.shrunk, report, what, replay), encoding="utf-8"
            )
        paths.append(scenario_path)
    for path in paths:
        console.print(f"wrote {path}")
    if report.shrunk is not None:
        render_shrink(console, report.shrunk, replay)
    elif report.shrink_skipped is not None:
        render_shrink_skipped(console, report.shrink_skipped)
    if report.interrupted:
        console.print(f"interrupted: the {len(report.results)} cells that ran are reported")
        return INTERRUPTED
    return report.exit_code


def _shrunk_json(report: ExploreReport, path: Path | None) -> dict[str, object] | None:
    shrunk, cell = report.shrunk, report.shrunk_cell
    if shrunk is None or cell is None:
        return None if report.shrink_skipped is None else {"skipped": report.shrink_skipped}
    return {
        "cell": cell.cell.name,
        "scenario": shrunk.name,
        "file": str(path) if path else None,
        "finding": shrunk.finding.kind,
        "operations_before": shrunk.operations_before,
        "operations_after": shrunk.operations_after,
        "confirm_runs": shrunk.confirm_runs,
        "target_failures": shrunk.target_failures,
        "reference_passes": shrunk.reference_passes,
    }


def _scenario_file(shrunk: ShrinkResult, report: ExploreReport, against: str, replay: str) -> str:
    cell = report.shrunk_cell
    assert cell is not None
    runs = f"{shrunk.confirm_runs} runs"
    header = [
        f"Shrunk by sessctl explore from the failed cell {cell.cell.name} (against {against}):",
        f"{cell.cell.describe()}.",
        f"{shrunk.operations_before} operations down to {shrunk.operations_after}, in "
        f"{shrunk.tests} replays.",
        f"Failed on that target in {shrunk.target_failures} of {runs}; passed on the "
        f"reference server in {shrunk.reference_passes} of {runs}.",
        f"Replay: {replay}",
    ]
    return "".join(f"# {line}\n" for line in header) + shrunk.text


__all__ = ["explore"]
