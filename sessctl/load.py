"""``sessctl load`` as plain functions: the run and its report, and a remote worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

from rich.console import Console

from harness.chaos.history import write_history
from harness.chaos.shrink import ShrinkSettings
from harness.chaos.workload import describe_target
from harness.errors import LoadFailed, UsageError
from harness.load.run import LoadPlan, LoadReport, LoadSetup, run_load
from harness.report.console import (
    announce_chaos_upstream,
    load_progress,
    render_check,
    render_load_stats,
)
from harness.report.timeline import ShrunkLink, render_timeline

from .chaos import (
    CHECK_EXIT,
    check_report,
    rate_as_reported,
    replay_command,
    shrunk_json,
    written_and_shrunk,
)
from .interrupt import StopRequest, run_interruptibly
from .run import INTERRUPTED, write_json_file, writing

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(h|m|s)?$")


def parse_run_time(text: str) -> float:
    """``20s``, ``5m``, ``1h`` or a number of seconds, as Locust spells a run time."""
    match = _DURATION.match(text.strip())
    seconds = (
        float(match.group(1)) * {"h": 3600, "m": 60, "s": 1, None: 1}[match.group(2)]
        if match
        else 0.0
    )
    if not seconds > 0:
        raise UsageError(f"--run-time {text!r}: expected a duration such as 20s, 5m or 1h")
    return seconds


def parse_turns(text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    try:
        turns = (int(low), int(high if dash else low))
    except ValueError:
        turns = (0, 0)
    if not 1 <= turns[0] <= turns[1]:
        raise UsageError(f"--turns {text!r}: expected N or LOW-HIGH, at least 1 (e.g. 2-6)")
    return turns


def load(
    setup: LoadSetup,
    plan: LoadPlan,
    target: str | None,
    emulate: str | None,
    engine: str | None,
    listen: tuple[str, int],
    json_path: Path | None,
    out: Path | None,
    console: Console,
    shrink: ShrinkSettings | None = None,
    scenario_out: Path | None = None,
    profile_option: str | None = None,
    listen_text: str = "",
) -> int:
    """Run the load, check every session's history, report; exit as `sessctl chaos`."""
    what = describe_target(target, emulate)
    workers = plan.workers if plan.expect_workers is None else plan.expect_workers
    console.print(
        f"load: {plan.users:,} agents (spawned {plan.spawn_rate:g}/s) for {plan.run_time:g} s "
        f"on {workers} worker{'s' if workers != 1 else ''}, against {what}",
        highlight=False,
        soft_wrap=True,
    )
    if plan.expect_workers is not None and plan.expect_workers > plan.workers:
        console.print(
            f"waiting for {plan.expect_workers - plan.workers} worker(s) to connect to "
            f"{plan.master_host}:{plan.master_port}: sessctl load --worker --master-host "
            f"{plan.master_host} --master-port {plan.master_port}",
            highlight=False,
        )
    stop = StopRequest()
    run_dir = out / "locust" if out is not None else None
    if run_dir is not None:
        plan = _with_out(plan, run_dir)
    with load_progress(console) as progress:
        report = run_interruptibly(
            partial(
                run_load,
                setup,
                plan,
                target,
                emulate=emulate,
                engine_url=engine,
                upstream_host=listen[0],
                upstream_port=listen[1],
                on_upstream_ready=(
                    partial(announce_chaos_upstream, console, flavor=setup.flavor)  # type: ignore[arg-type]
                    if target
                    else None
                ),
                on_progress=progress,
                shrink_settings=shrink,
                on_shrinking=lambda: console.print(
                    "the history is invalid; shrinking the failure to a scenario..."
                ),
                should_stop=stop,
            ),
            stop=stop,
        )
    render_load_stats(console, report.stats, report.races)
    console.print(
        f"{len(report.history):,} operations in {report.elapsed:.1f} s "
        f"({rate_as_reported(report.ops_per_second):,.0f} ops/s); "
        f"checked in {report.check_seconds:.2f} s",
        highlight=False,
    )
    for note in report.notes:
        console.print(note, highlight=False, soft_wrap=True)
    render_check(console, report.result, "history")
    paths: list[Path] = []
    scenario_path = None
    if report.shrunk is not None:
        scenario_path = scenario_out or (out or Path(".")) / f"{report.shrunk.name}.yaml"
    replay = None
    if report.shrunk is not None and scenario_path is not None:
        replay = replay_command(scenario_path, target, emulate, listen_text, profile_option)
    document = load_report(report, scenario_path)
    if json_path is not None:
        write_json_file(json_path, document)
        paths.append(json_path)
    history_path = None
    if out is not None:
        history_path = out / "history.jsonl"
        with writing(history_path):
            write_history(history_path, report.history)
        write_json_file(out / "report.json", document)
        timeline = out / "timeline.html"
        link = None
        if report.shrunk is not None and scenario_path is not None:
            where = os.path.relpath(scenario_path.resolve(), out.resolve())
            link = ShrunkLink(report.shrunk.finding, where, replay)
        with writing(timeline):
            timeline.write_text(
                render_timeline(report.result, report.history, shrunk=link), encoding="utf-8"
            )
        paths += [history_path, out / "report.json", timeline, report.out]
    if report.shrunk is not None and scenario_path is not None:
        with writing(scenario_path):
            scenario_path.write_text(
                f"# Shrunk by sessctl load from a failing run against {what}.\n"
                f"# Replay: {replay}\n" + report.shrunk.text,
                encoding="utf-8",
            )
        paths.append(scenario_path)
    written_and_shrunk(
        console,
        paths,
        report.shrunk,
        report.shrink_attempted,
        report.shrink_skipped,
        replay,
        history_path,
        profile_option,
    )
    if report.interrupted:
        console.print(
            f"interrupted: the {len(report.history):,} operations of whole sessions that ran "
            "were checked and reported",
            highlight=False,
        )
        return INTERRUPTED
    return CHECK_EXIT[report.result.verdict]


def _with_out(plan: LoadPlan, run_dir: Path) -> LoadPlan:
    from dataclasses import replace

    return replace(plan, out=run_dir)


def load_report(report: LoadReport, scenario_path: Path | None) -> dict[str, object]:
    """The JSON report: the verdict and findings as `sessctl check` writes them, the
    run's figures, Locust's statistics and the races set up."""
    document = check_report(report.result)
    document["run"] = {
        "seconds": round(report.elapsed, 3),
        "operations_per_second": rate_as_reported(report.ops_per_second),
        "check_seconds": round(report.check_seconds, 3),
        "workers": report.stats.get("workers"),
        "locust_directory": str(report.out),
    }
    document["locust"] = {
        "operations": report.stats.get("operations", []),
        "total": report.stats.get("total"),
        "errors": report.stats.get("errors", []),
        "workers_done": report.stats.get("workers_done", []),
    }
    document["races"] = report.races
    document["notes"] = report.notes
    if report.shrink_skipped is not None:
        document["shrink_skipped"] = report.shrink_skipped
    document["shrunk"] = shrunk_json(report.shrunk, scenario_path)
    return document


def worker(master_host: str, master_port: int, console: Console) -> int:
    """A worker for a master elsewhere: it gets everything else from the master."""
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        raise LoadFailed(
            "sessctl load needs Locust, an optional extra: pip install 'sessctl[load]'"
        )
    console.print(f"load worker: connecting to the master at {master_host}:{master_port}")
    command = [
        sys.executable,
        "-m",
        "harness.load.locust_main",
        "worker",
        "--master-host",
        master_host,
        "--master-port",
        str(master_port),
    ]
    return subprocess.run(command, check=False).returncode
