"""``sessctl run-scenarios`` and ``sessctl list-scenarios`` as plain functions."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.errors import UsageError
from harness.model.loader import load_scenarios
from harness.model.profile import load_profile
from harness.model.scenario import Scenario
from harness.report.console import (
    announce_chaos_upstream,
    progress_hooks,
    render_selftest,
    render_suite,
)
from harness.report.exporters import write_json, write_junit, write_markdown
from harness.run.profile_probe import ProbeOptions, check_profile
from harness.run.runner import RunSettings
from harness.run.selftest import run_selftest
from harness.run.suite import EMBEDDED, SuiteSettings, Target, run_suite
from refserver.transport.engine_http import base_url_problem
from wire.engine import Flavor

from .defaults import DEFAULT_EXTERNAL_UPSTREAM
from .interrupt import StopRequest, run_interruptibly

INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells use."""


@dataclass(frozen=True)
class RunOptions:
    paths: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    upstream_listen: str | None = None
    flavor: Flavor = "openai"
    name_filter: str | None = None
    exclude: str | None = None
    repeat: int | None = None
    concurrency: int | None = None
    """Scenario runs in flight at once; default 8 in-process, 1 against an external
    target (so one scenario's load never decides another's verdict)."""
    request_timeout: float = 10.0
    target_wait: float = 5.0
    junit: Path | None = None
    json: Path | None = None
    markdown: Path | None = None
    quiet: bool = False
    profile: str | None = None
    strict: bool = False
    latency_budgets: bool = False
    """Judge the scenarios' within_ms budgets (off: latencies are reported only)."""
    emulate: str | None = None
    """Run against the in-process reference server as this known-broken variant."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Around every file a command writes: a path it cannot write is a usage error."""
    try:
        yield
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def check_writable(path: Path | None, option: str) -> None:
    """Before a long run: a report that cannot be written is a usage error now,
    not after every result has been computed and then lost."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory, not a file")
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")


def write_json_file(path: Path, document: object) -> None:
    with writing(path):
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def parse_target(spec: str) -> Target:
    name, _, url = spec.partition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
    problem = base_url_problem(url, example="http://127.0.0.1:8000")
    if problem is not None:
        raise UsageError(f"--target {spec!r}: {problem} (URL or NAME=URL)")
    return Target(name=name or urlsplit(url).netloc, url=url.rstrip("/"))


def parse_listen(spec: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", spec)
    if not match or int(match.group(2)) > 65535:
        raise UsageError(f"--upstream-listen {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:8900")
    return match.group(1), int(match.group(2))


def select(options: RunOptions) -> list[Scenario]:
    scenarios = load_scenarios(options.paths, options.name_filter, options.exclude)
    if not scenarios:
        raise UsageError(
            f"no scenario matches --filter {options.name_filter!r}"
            + (f" and --exclude {options.exclude!r}" if options.exclude else "")
        )
    return scenarios


def list_scenarios(options: RunOptions, console: Console) -> int:
    table = Table(box=None, pad_edge=False)
    table.add_column("scenario", style="bold")
    table.add_column("runs", justify="right")
    table.add_column("description")
    table.add_column("file", style="dim")
    for scenario in select(options):
        table.add_row(
            scenario.name, str(scenario.repeat), scenario.description.strip(), scenario.source
        )
    console.print(table)
    return 0


def selftest(options: RunOptions, console: Console) -> int:
    check_writable(options.json, "--json")
    if options.repeat is not None and options.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    scenarios = select(options)
    settings = SuiteSettings(
        concurrency=options.concurrency or SuiteSettings.concurrency,
        repeat=options.repeat,
        run=RunSettings(request_timeout=options.request_timeout),
    )
    with progress_hooks(console, announce_upstream=False) as hooks:
        result = run_interruptibly(run_selftest, scenarios, settings, hooks)
    render_selftest(console, result)
    if options.json is not None:
        write_json_file(options.json, result.to_json())
    return result.exit_code


def profile_check(
    target: str, listen: str, output: Path | None, options: ProbeOptions, console: Console
) -> int:
    url = parse_target(target).url
    assert url is not None
    host, port = parse_listen(listen)
    result = run_interruptibly(
        check_profile,
        url,
        host,
        port,
        options,
        partial(announce_chaos_upstream, console, flavor=options.flavor),
    )
    for note in result.notes:
        # Whole notes, never cut: they quote what the server answered.
        console.print(Text(f"note: {note}"), soft_wrap=True)
    for gap in result.unprobed:
        console.print(Text(f"not probed: {gap}"), soft_wrap=True)
    differences = result.profile.differences()
    console.print(
        "differs from the reference conventions: " + "; ".join(differences)
        if differences
        else "follows the reference conventions"
    )
    document = yaml.safe_dump(
        result.profile.model_dump(mode="json"), sort_keys=False, default_flow_style=None
    )
    console.print(document, highlight=False, markup=False)
    if output is not None:
        # The notes go with the file: why each value was chosen, and what was not
        # probed (those keep the reference's value until someone says otherwise).
        header = [f"# note: {note}" for note in result.notes]
        header += [
            f"# not probed (the reference's value is kept): {gap}" for gap in result.unprobed
        ]
        text = "".join(f"{' '.join(line.split())}\n" for line in header) + document
        with writing(output):
            output.write_text(text, encoding="utf-8")
        console.print(f"written to {output}; use it with --profile {output}")
    if result.partial:
        console.print(
            Text(
                f"partial: {len(result.unprobed)} part(s) of the profile could not be probed "
                "(see 'not probed' above); check them by hand before trusting its verdicts"
            ),
            soft_wrap=True,
        )
        return 1
    return 0


@dataclass(frozen=True)
class SuitePlan:
    """What a run of the library is: its scenarios, targets and settings, from the
    options (shared by ``run-scenarios`` and the pytest plugin)."""

    scenarios: list[Scenario]
    targets: list[Target]
    settings: SuiteSettings
    external: bool


def plan_suite(options: RunOptions) -> SuitePlan:
    scenarios = select(options)
    targets = [parse_target(t) for t in options.targets] or [
        Target(options.emulate, None, emulate=options.emulate)
        if options.emulate
        else Target(EMBEDDED, None)
    ]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise UsageError("two targets have the same name; name them with NAME=URL")
    external = any(t.url is not None for t in targets)
    listen = options.upstream_listen or (DEFAULT_EXTERNAL_UPSTREAM if external else "127.0.0.1:0")
    host, port = parse_listen(listen)
    if options.repeat is not None and options.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    settings = SuiteSettings(
        concurrency=options.concurrency or (1 if external else SuiteSettings.concurrency),
        repeat=options.repeat,
        flavor=options.flavor,
        upstream_host=host,
        upstream_port=port,
        target_wait=options.target_wait,
        run=RunSettings(
            request_timeout=options.request_timeout,
            profile=load_profile(options.profile),
            strict=options.strict,
            timing_bounds=options.latency_budgets,
        ),
    )
    rerun = rerun_options(options, external)
    targets = [replace(t, rerun_options=rerun) for t in targets]
    return SuitePlan(scenarios, targets, settings, external)


def run_scenarios(options: RunOptions, console: Console) -> int:
    for path, option in (
        (options.json, "--json"),
        (options.junit, "--junit"),
        (options.markdown, "--markdown"),
    ):
        check_writable(path, option)
    plan = plan_suite(options)
    scenarios, targets, settings, external = (
        plan.scenarios,
        plan.targets,
        plan.settings,
        plan.external,
    )
    if settings.run.profile.name != "reference":
        differences = settings.run.profile.differences()
        console.print(
            f"profile {settings.run.profile.name}: "
            + ("; ".join(differences) if differences else "the reference conventions")
        )
    stop = StopRequest()
    with progress_hooks(console, announce_upstream=external, flavor=settings.flavor) as hooks:
        hooks = replace(hooks, should_stop=stop)
        suite = run_interruptibly(run_suite, scenarios, targets, settings, hooks, stop=stop)
    by_name = {t.name: t for t in targets}
    # The files first: CI reads them, and a report that fails to render in the
    # terminal must not take them down with it.
    for path, writer in (
        (options.json, write_json),
        (options.junit, write_junit),
        (options.markdown, write_markdown),
    ):
        if path is not None:
            with writing(path):
                writer(path, suite, by_name)
    render_suite(console, suite, by_name, quiet=options.quiet)
    if suite.interrupted:
        runs = sum(len(s.runs) for s in suite.scenarios)
        console.print(f"interrupted: the reports hold the {runs} run(s) that had finished")
        return INTERRUPTED
    return suite.exit_code


def rerun_options(options: RunOptions, external: bool) -> tuple[str, ...]:
    """The options a printed rerun command must repeat to get the same verdicts."""
    rerun: list[str] = []
    if options.profile is not None:
        rerun += ["--profile", options.profile]
    if options.flavor != RunOptions.flavor:
        rerun += ["--flavor", options.flavor]
    if external and options.upstream_listen is not None:
        rerun += ["--upstream-listen", options.upstream_listen]  # where the target calls
    if options.request_timeout != RunOptions.request_timeout:
        rerun += ["--request-timeout", f"{options.request_timeout:g}"]
    if options.strict:
        rerun.append("--strict")
    if options.latency_budgets:
        rerun.append("--latency-budgets")
    return tuple(rerun)


__all__ = [
    "RunOptions",
    "SuitePlan",
    "list_scenarios",
    "plan_suite",
    "profile_check",
    "run_scenarios",
    "selftest",
]
