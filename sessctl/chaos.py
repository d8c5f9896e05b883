"""``sessctl chaos`` and ``sessctl check`` as plain functions."""

from __future__ import annotations

import os
import shlex
from functools import partial
from pathlib import Path

from rich.console import Console

from harness.chaos.history import read_history, write_history
from harness.chaos.linearizability import CheckResult, check_history
from harness.chaos.shrink import ShrinkResult, ShrinkSettings
from harness.chaos.workload import ChaosReport, ChaosSettings, describe_target, run_chaos
from harness.errors import UsageError
from harness.model.profile import Profile
from harness.report.console import (
    announce_chaos_upstream,
    chaos_progress,
    render_check,
    render_shrink,
    render_shrink_skipped,
)
from harness.report.timeline import ShrunkLink, render_timeline
from harness.run.suite import Target

from .defaults import DEFAULT_EXTERNAL_UPSTREAM
from .interrupt import StopRequest, run_interruptibly
from .run import INTERRUPTED, parse_listen, parse_target, write_json_file, writing

CHECK_EXIT = {"valid": 0, "invalid": 1, "unknown": 4}
LAG_WORTH_SAYING = 0.1
"""The share of a run the harness lagged that the report mentions."""


def chaos(
    settings: ChaosSettings,
    target: str | None,
    emulate: str | None,
    listen: str | None,
    history_path: Path | None,
    out: Path | None,
    console: Console,
    shrink: ShrinkSettings | None = None,
    scenario_out: Path | None = None,
    profile_option: str | None = None,
) -> int:
    """Run a chaos workload, check its history, shrink a failure; exit as `sessctl check`."""
    url, listen, host, port = target_and_upstream(target, listen)
    what = describe_target(url, emulate)
    console.print(
        f"chaos: seed {settings.seed}, "
        + (f"{settings.ops} operations" if settings.ops else f"{settings.duration:g} s")
        + f", {settings.clients} clients on {settings.sessions} sessions, against {what}"
    )
    stop = StopRequest()
    with chaos_progress(console, settings.ops) as progress:
        report = run_interruptibly(
            partial(
                run_chaos,
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
                shrink_settings=shrink,
                on_shrinking=lambda: console.print(
                    "the history is invalid; shrinking the failure to a scenario..."
                ),
                on_operation=progress,
                should_stop=stop,
            ),
            stop=stop,
        )
    console.print(
        f"{len(report.history)} operations in {report.elapsed:.1f} s "
        f"({rate_as_reported(report.ops_per_second):.0f} ops/s); "
        f"checked in {report.check_seconds:.2f} s"
    )
    if report.lag >= LAG_WORTH_SAYING * report.elapsed:
        console.print(
            f"the harness lagged: for {report.lag:.1f} s of the run its event loop was too "
            "busy to look, and patience (2 s for a DELETE or a hang-up) was not counted "
            "then; fewer --clients would run as many operations per second"
        )
    render_check(console, report.result, "history")
    if out is not None:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        history_path = history_path or out / "history.jsonl"
    scenario_path = None
    if report.shrunk is not None:
        scenario_path = scenario_out or (out or Path(".")) / f"{report.shrunk.name}.yaml"
    paths: list[Path] = []
    if history_path is not None:
        with writing(history_path):
            write_history(history_path, report.history)
        paths.append(history_path)
    replay = None
    if report.shrunk is not None and scenario_path is not None:
        replay = replay_command(scenario_path, url, emulate, listen, profile_option)
    if out is not None:
        timeline = out / "timeline.html"
        write_json_file(out / "report.json", chaos_report(report, scenario_path))
        link = None
        if report.shrunk is not None and scenario_path is not None:
            where = os.path.relpath(scenario_path.resolve(), out.resolve())
            link = ShrunkLink(report.shrunk.finding, where, replay)
        with writing(timeline):
            timeline.write_text(
                render_timeline(report.result, report.history, shrunk=link), encoding="utf-8"
            )
        paths += [out / "report.json", timeline]
    if report.shrunk is not None and scenario_path is not None and replay is not None:
        with writing(scenario_path):
            scenario_path.write_text(
                scenario_file(report.shrunk, settings, what, replay), encoding="utf-8"
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
            f"interrupted: the {len(report.history)} operations that ran were checked and reported"
        )
        return INTERRUPTED
    return CHECK_EXIT[report.result.verdict]


def written_and_shrunk(
    console: Console,
    paths: list[Path],
    shrunk: ShrinkResult | None,
    attempted: bool,
    skipped: str | None,
    replay: str | None,
    history_path: Path | None,
    profile_option: str | None,
) -> None:
    """The end of a chaos or load report: the files written, the shrinking, and how to
    check the saved history again."""
    for path in paths:
        console.print(f"wrote {path}", highlight=False)
    if attempted:
        render_shrink(console, shrunk, replay)
    elif skipped is not None:
        render_shrink_skipped(console, skipped)
    if history_path is not None:
        again = ["sessctl", "check", str(history_path)]
        if profile_option is not None:
            again += ["--profile", profile_option]
        console.print(f"re-check with: {shlex.join(again)}", highlight=False)


def target_and_upstream(target: str | None, listen: str | None) -> tuple[str | None, str, str, int]:
    """--target and --upstream-listen, parsed: the target's URL (None: embedded), and
    where the chaos upstream listens (a fixed default an external server can be
    wired to; any free port for the embedded one), as written and as host, port."""
    url = parse_target(target).url if target else None
    listen = listen or (DEFAULT_EXTERNAL_UPSTREAM if url else "127.0.0.1:0")
    host, port = parse_listen(listen)
    return url, listen, host, port


def replay_command(
    path: Path, url: str | None, emulate: str | None, listen: str, profile: str | None = None
) -> str:
    # An external server stays wired to the chaos upstream's address, so the
    # replay must listen there again; and it is judged under the same profile.
    options = ("--upstream-listen", listen) if url else ()
    if profile is not None:
        options = (*options, "--profile", profile)
    target = Target("chaos", url, emulate=emulate, rerun_options=options)
    return shlex.join(["sessctl", "run-scenarios", str(path)]) + target.command_option


def scenario_file(shrunk: ShrinkResult, settings: ChaosSettings, against: str, replay: str) -> str:
    """The shrunk scenario, with where it came from and how to replay it on top."""
    runs = f"{shrunk.confirm_runs} runs"
    header = [
        f"Shrunk by sessctl chaos from a failing run (seed {settings.seed}, against {against}):",
        f"{shrunk.operations_before} operations of the failing session down to "
        f"{shrunk.operations_after}, in {shrunk.tests} replays.",
        f"Failed on that target in {shrunk.target_failures} of {runs}; passed on the "
        f"reference server in {shrunk.reference_passes} of {runs}.",
        f"Replay: {replay}",
    ]
    return "".join(f"# {line}\n" for line in header) + shrunk.text


def rate_as_reported(ops_per_second: float) -> float:
    """Operations per second as report.json holds them (to 0.1); the console prints
    this figure too, so the two never disagree."""
    return round(ops_per_second, 1)


def chaos_report(report: ChaosReport, scenario_path: Path | None) -> dict[str, object]:
    document = check_report(report.result)
    document["run"] = {
        "seconds": round(report.elapsed, 3),
        "operations_per_second": rate_as_reported(report.ops_per_second),
        "check_seconds": round(report.check_seconds, 3),
        "harness_lag_seconds": round(report.lag, 3),
    }
    if report.shrink_skipped is not None:
        document["shrink_skipped"] = report.shrink_skipped
    document["shrunk"] = shrunk_json(report.shrunk, scenario_path)
    return document


def shrunk_json(shrunk: ShrinkResult | None, scenario_path: Path | None) -> object:
    """A shrunk failure in a JSON report (null: none)."""
    if shrunk is None:
        return None
    return {
        "scenario": shrunk.name,
        "file": str(scenario_path) if scenario_path else None,
        "finding": shrunk.finding.kind,
        "session": shrunk.finding.session,
        "operations_before": shrunk.operations_before,
        "operations_after": shrunk.operations_after,
        "replays": shrunk.tests,
        "seconds": round(shrunk.seconds, 3),
        "budget_ran_out": shrunk.exhausted,
        "confirm_runs": shrunk.confirm_runs,
        "target_failures": shrunk.target_failures,
        "reference_passes": shrunk.reference_passes,
    }


def check_report(result: CheckResult) -> dict[str, object]:
    return {
        "verdict": result.verdict,
        "operations": result.operations,
        "sessions": result.sessions,
        "undecided_sessions": result.undecided_sessions,
        "findings": [
            {
                "kind": f.kind,
                "session": f.session,
                "explanation": f.explanation,
                "window": [op.to_json() for op in f.window],
            }
            for f in result.findings
        ],
    }


def check(history: Path, output: Path | None, console: Console, profile: Profile) -> int:
    """Re-check a saved history the way the profile says the server behaves:
    0 valid, 1 invalid, 4 the search budget ran out."""
    model = profile.trajectory.model
    operations = read_history(history)
    if model == "linear" and any(op.turns is not None for op in operations):
        raise UsageError(
            f"{history} was recorded on a server whose trajectory is a tree (its reads list "
            "turns): pass the --profile it was recorded with"
        )
    result = check_history(operations, model=model, rollback=profile.rollback == "one-step")
    render_check(console, result, str(history))
    if output is not None:
        write_json_file(output, check_report(result))
    return CHECK_EXIT[result.verdict]


__all__ = ["chaos", "check"]
