"""The terminal report: status-code matrices, failures explained, a summary.

Rich renders colour on a terminal and plain text elsewhere (and honours
NO_COLOR); tables switch to ASCII boxes when the output is not a terminal,
so CI logs stay readable.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from harness.chaos.linearizability import CheckResult
from harness.chaos.shrink import ShrinkResult
from harness.load.run import Progress as LoadProgress
from harness.results import Finding, Kind, ScenarioResult, SuiteResult, Verdict
from harness.run.selftest import CLEAN, SelftestResult
from harness.run.suite import NOT_RUN, SuiteHooks, Target
from refserver.variants import VARIANTS
from wire.engine import Flavor
from wire.tokens import TOKENIZER_DIR

from .exporters import reproduce_command

VERDICT_STYLE = {
    Verdict.PASS: "bold green",
    Verdict.NON_STRICT: "bold yellow",
    Verdict.UNTESTED: "bold cyan",
    Verdict.FAIL: "bold red",
    Verdict.ERROR: "bold magenta",
}


def _box(console: Console) -> box.Box:
    return box.SIMPLE_HEAD if console.is_terminal else box.ASCII2


def verdict_text(verdict: Verdict) -> Text:
    return Text(verdict.value.upper(), style=VERDICT_STYLE[verdict])


def render_scenario(console: Console, result: ScenarioResult, target: Target | None) -> None:
    runs = len(result.runs)
    title = Text.assemble(
        verdict_text(result.verdict),
        f"  {result.name}",
        (f"  on {result.target}", "dim"),
        (f"  ({runs} run{'s' if runs != 1 else ''})", "dim"),
    )
    console.print(title)
    step_order = [step.step for step in result.steps]
    if result.steps:
        columns = sorted({cell for step in result.steps for cell in step.cells}, key=_cell_order)
        table = Table(box=_box(console), show_edge=False, pad_edge=False, padding=(0, 1))
        table.add_column("step")
        table.add_column("op", style="dim")
        table.add_column("expected")
        for column in columns:
            table.add_column(column, justify="right")
        for step in result.steps:
            row: list[Text | str] = [step.step, step.op, step.expected or "-"]
            for column in columns:
                count = step.cells.get(column, 0)
                if not count:
                    row.append("")
                elif step.expected is None or column == NOT_RUN:
                    # A step not run observed nothing: the cause is reported above it.
                    row.append(Text(str(count), style="dim"))
                elif column in step.expected_cells:
                    row.append(Text(f"{count} ok", style="green"))
                elif column in step.convention_cells:
                    row.append(Text(f"{count} ~", style="yellow"))
                else:
                    row.append(Text(f"{count} !!", style="bold red"))
            table.add_row(*row)
        console.print(table)
    for step in result.steps:
        if step.budget_ms is not None and step.latencies_ms:
            ordered = sorted(step.latencies_ms)
            console.print(
                Text(
                    f"  {step.step} latency: median {statistics.median(ordered):.1f} ms, "
                    f"max {ordered[-1]:.1f} ms over {len(ordered)} run(s); budget "
                    f"{step.budget_ms:g} ms (judged only with --latency-budgets)",
                    style="dim",
                )
            )
    run = result.first_problem_run
    if run is not None:
        failed_runs = sum(1 for r in result.runs if r.verdict is not Verdict.PASS)
        if runs > 1:
            console.print(f"  {failed_runs} of {runs} runs did not pass; run {run.index} was:")
        if run.untested:
            cause = run.untested[0]
            console.print(
                Text.assemble(
                    ("  not tested: ", "bold cyan"),
                    f"the race was never placed, so {result.name!r} says nothing about "
                    "its property on this server; the cause:",
                ),
                soft_wrap=True,
            )
            render_findings(console, [cause], step_order)
            if run.failures or run.errors:
                console.print("  and, whatever was raced:")
        findings = run.errors + run.failures
        causes = [f for f in findings if f.follows is None]
        render_findings(console, causes, step_order)
        followers = [f for f in findings if f.follows is not None]
        if followers:
            steps = [f.step or "the run" for f in causes if f.kind is not Kind.CONVENTION]
            console.print(Text(f"  what follows from {', '.join(dict.fromkeys(steps))}:"))
            render_findings(console, followers, step_order)
        console.print(
            Text.assemble("  reproduce: ", (reproduce_command(result, target), "cyan")),
            soft_wrap=True,
        )
        if run.upstream_events:
            events = ", ".join(_upstream_events(run.upstream_events))
            console.print(Text.assemble("  upstream saw: ", (events, "dim")), soft_wrap=True)
    console.print()


def _upstream_events(events: list[dict[str, Any]]) -> list[str]:
    """``c1.received#1, c1.sent#1 x3, c1.cancelled#1``: a streamed call's chunks counted."""
    shown: list[str] = []
    repeats = 0
    for index, event in enumerate(events):
        text = f"{event['step']}.{event['kind']}#{event['call']}"
        following = events[index + 1] if index + 1 < len(events) else None
        if following is not None and following == event:
            repeats += 1
            continue
        shown.append(f"{text} x{repeats + 1}" if repeats else text)
        repeats = 0
    return shown


def render_findings(console: Console, findings: list[Finding], step_order: list[str]) -> None:
    """Findings grouped by step, in scenario order; one curl line per step.

    Everything is printed as Text, never markup: findings quote the server's
    answers and the harness's [[sessctl:...]] markers verbatim.
    """

    def position(finding: Finding) -> int:
        return step_order.index(finding.step) if finding.step in step_order else len(step_order)

    for step, group in itertools.groupby(sorted(findings, key=position), key=lambda f: f.step):
        items = list(group)
        label = f"  {step}: " if step else "  "
        pad = " " * len(label)
        for index, finding in enumerate(items):
            console.print(
                Text.assemble(
                    label if index == 0 else pad, "expected ", (finding.expected, "green")
                ),
                soft_wrap=True,
            )
            console.print(Text.assemble(pad, "got      ", (finding.actual, "red")), soft_wrap=True)
        repro = next((f.reproduce for f in items if f.reproduce), None)
        if repro:
            console.print(Text.assemble(pad, (repro, "dim")), soft_wrap=True)


def _cell_order(cell: str) -> tuple[int, str]:
    return (0, cell) if cell.isdigit() else (1, cell)


def render_suite(
    console: Console, suite: SuiteResult, targets: dict[str, Target], *, quiet: bool
) -> None:
    for result in suite.scenarios:
        if result.target in suite.unreachable:
            continue  # one line below says why none of its scenarios ran
        if not quiet or result.verdict is not Verdict.PASS:
            render_scenario(console, result, targets.get(result.target))
    if len(suite.targets) > 1:
        render_target_matrix(console, suite)
    for target, problem in suite.unreachable.items():
        # Text, not markup: the problem quotes what the target answered.
        console.print(
            Text.assemble((f"target {target} unusable: ", "bold magenta"), problem), soft_wrap=True
        )
    console.print(summary_line(suite))


def render_target_matrix(console: Console, suite: SuiteResult) -> None:
    table = Table(title="scenario x target", box=_box(console))
    table.add_column("scenario")
    for target in suite.targets:
        table.add_column(target, justify="center")
    by_key = {(s.name, s.target): s for s in suite.scenarios}
    for name in dict.fromkeys(s.name for s in suite.scenarios):
        cells: list[Text | str] = []
        for target in suite.targets:
            result = by_key.get((name, target))
            cells.append(verdict_text(result.verdict) if result else "-")
        table.add_row(name, *cells)
    console.print(table)


def summary_line(suite: SuiteResult) -> Text:
    """Counts, then what broke in words: the safety properties first, then
    conventions; last, the scenarios that tested nothing, by name and cause."""
    passed, non_strict, untested, failed, errors = (
        suite.count(v)
        for v in (Verdict.PASS, Verdict.NON_STRICT, Verdict.UNTESTED, Verdict.FAIL, Verdict.ERROR)
    )
    counts = (
        f"{len(suite.scenarios)} scenario results: {passed} passed, {non_strict} non-strict, "
        f"{untested} untested, {failed} failed, {plural(errors, 'error')}"
    )
    safety = suite.labels(Kind.SAFETY) + suite.labels(Kind.FAULT)
    conventions = suite.labels(Kind.CONVENTION)
    line = Text(counts, style="bold green" if failed == errors == 0 else "bold red")
    if safety or conventions:
        line.append("\n")
        line.append(
            plural(len(safety), "safety failure") + (f" ({', '.join(safety)})" if safety else ""),
            style="bold red" if safety else "bold green",
        )
        line.append(f"; {plural(len(conventions), 'non-strict convention')}", style="yellow")
        if conventions:
            line.append(f" ({'; '.join(conventions)})", style="yellow")
    if untested:
        line.append("\n")
        strict = "; --strict fails the run for it" if suite.strict else ""
        line.append(
            f"{untested} not tested (the race was never placed: each cause is quoted above"
            f"{strict}): ",
            style="bold cyan",
        )
        line.append(", ".join(untested_names(suite)), style="cyan")
    return line


def untested_names(suite: SuiteResult) -> list[str]:
    """Each UNTESTED scenario with the step that kept its race from being placed."""
    shown = []
    for result in suite.untested():
        cause = result.untested_because
        where = f" ({cause.step})" if cause is not None and cause.step else ""
        target = f" on {result.target}" if len(suite.targets) > 1 else ""
        shown.append(f"{result.name}{target}{where}")
    return shown


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def announce_chaos_upstream(console: Console, url: str, flavor: Flavor = "openai") -> None:
    """Where the server under test must send its LLM calls (the bound URL, port 0 resolved)."""
    console.print(
        Text.assemble(
            "chaos upstream listening on ",
            (url, "bold"),
            "\nthe server under test must use it as its LLM upstream ",
            upstream_routes(url, flavor),
        ),
        soft_wrap=True,
    )


def upstream_routes(url: str, flavor: Flavor) -> str:
    """Where a server's engine calls go, in words, for the flavour served."""
    chat = f"(OpenAI base URL; calls go to {url}/chat/completions)"
    if flavor != "sglang-generate":
        return chat
    root = url.removesuffix("/v1")
    return (
        f"(SGLang: native calls go to {root}/generate, OpenAI-style ones to "
        f"{url}/chat/completions; a server that tokenizes its prompts loads sessctl's "
        f"tokenizer from {TOKENIZER_DIR})"
    )


@contextmanager
def progress_hooks(
    console: Console, announce_upstream: bool, flavor: Flavor = "openai"
) -> Iterator[SuiteHooks]:
    """A progress bar on a terminal; nothing but the upstream line elsewhere."""
    progress = Progress(
        TextColumn("[bold]running scenarios"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}", style="dim"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task("runs", total=None, last="")

    def on_upstream_ready(url: str) -> None:
        if announce_upstream:
            announce_chaos_upstream(console, url, flavor)

    def on_start(total: int) -> None:
        progress.update(task, total=total)

    def on_run_done(target: str, name: str, verdict: Verdict) -> None:
        progress.update(task, advance=1, last=f"{name} {verdict.value}")

    with progress:
        yield SuiteHooks(on_upstream_ready, on_start, on_run_done)


PROGRESS_EVERY = 0.1
"""Seconds between updates of a progress line that counts operations."""


@contextmanager
def chaos_progress(
    console: Console, total: int | None, label: str = "chaos", unit: str = "ops"
) -> Iterator[Callable[[int], None]]:
    """A progress line for a chaos run (or an exploration's cells) on a terminal
    (nothing elsewhere): how many done, their rate, and the time left. The callback
    takes the count done."""
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task("operations", total=total, rate="")
    shown_at = 0.0

    def done(count: int) -> None:
        # Called after every operation, thousands a second: rich's speed walks all
        # its samples, so the line is brought up to date ten times a second at
        # most, and not at all where it is not shown (7% of a chaos run's CPU).
        nonlocal shown_at
        now = time.monotonic()
        if progress.disable or (now - shown_at < PROGRESS_EVERY and count != total):
            return
        shown_at = now
        speed = progress.tasks[0].speed
        progress.update(task, completed=count, rate=f"{speed:,.0f} {unit}/s" if speed else "")

    with progress:
        yield done


def render_selftest(console: Console, result: SelftestResult) -> None:
    """Scenario x variant: a cell counts the runs in which the scenario caught the variant."""
    table = Table(
        title="scenario x variant: runs in which the scenario caught the bug",
        box=_box(console),
        caption="columns are numbered as in the legend below",
    )
    table.add_column("scenario", no_wrap=True)
    table.add_column(CLEAN, justify="center", no_wrap=True)
    for number, _ in enumerate(result.variants, start=1):
        table.add_column(str(number), justify="center", no_wrap=True)
    for scenario in result.scenarios:
        clean = result.cell(scenario, CLEAN)
        row: list[Text | str] = [
            scenario,
            Text("pass", style="green")
            if not clean.caught
            else Text(f"FAIL {clean.caught_runs}/{clean.runs}", style="bold red"),
        ]
        for variant in result.variants:
            cell = result.cell(scenario, variant)
            if not cell.caught:
                row.append(Text(".", style="dim"))
            else:
                style = "bold green" if cell.caught_runs == cell.runs else "yellow"
                row.append(Text(f"{cell.caught_runs}/{cell.runs}", style=style))
        table.add_row(*row)
    console.print(table)
    for number, variant in enumerate(result.variants, start=1):
        caught = result.caught_by(variant)
        label = Text("caught" if caught else "MISSED", style="bold green" if caught else "bold red")
        console.print(
            Text.assemble(
                f"{number:>2} ", label, " ", (variant, "bold"), f": {VARIANTS[variant].bug}"
            )
        )
        if caught:
            console.print(Text(f"   by {', '.join(caught)}", style="dim"))
    if result.idle_scenarios:
        console.print(
            Text(
                f"scenarios that catch no variant: {', '.join(result.idle_scenarios)}",
                style="yellow",
            )
        )
    if result.clean_problems:
        console.print(
            Text(
                f"the clean server does not pass: {', '.join(result.clean_problems)}",
                style="bold red",
            )
        )
    for target, problem in result.suite.unreachable.items():
        console.print(Text(f"target {target} unusable: {problem}", style="bold magenta"))
    verdict = "self-test passed" if result.exit_code == 0 else "self-test FAILED"
    console.print(
        Text(
            f"{verdict}: clean server {'passes' if not result.clean_problems else 'fails'}, "
            f"{len(result.variants) - len(result.uncaught_variants)} of {len(result.variants)} "
            f"variants caught",
            style="bold green" if result.exit_code == 0 else "bold red",
        )
    )


MAX_FINDINGS_SHOWN = 5


def render_check(console: Console, result: CheckResult, source: str) -> None:
    """What `sessctl check` found in a history, with the operations that show it."""
    style = {"valid": "bold green", "invalid": "bold red", "unknown": "bold yellow"}[result.verdict]
    console.print(
        Text.assemble(
            (result.verdict.upper(), style),
            f"  {source}: {result.operations} operations in {result.sessions} sessions",
        )
    )
    shown = result.findings[:MAX_FINDINGS_SHOWN]
    for finding in shown:
        console.print(
            Text.assemble(("  " + finding.kind, "bold red"), f" in session {finding.session}: ")
        )
        console.print(Text("    " + finding.explanation), soft_wrap=True)
        for op in finding.window:
            end = "…" if op.complete is None else f"{op.complete:.3f}"
            console.print(
                Text(f"      {op.invoke:.3f}-{end}  {op.describe()}", style="dim"), soft_wrap=True
            )
    if len(result.findings) > len(shown):
        kinds = sorted({f.kind for f in result.findings})
        console.print(
            Text(
                f"  (+{len(result.findings) - len(shown)} more findings of kinds "
                f"{', '.join(kinds)}; all of them are in the JSON report)",
                style="dim",
            )
        )
    if result.undecided_sessions:
        console.print(
            Text(
                f"  the search budget ran out for {len(result.undecided_sessions)} session(s): "
                f"{', '.join(result.undecided_sessions[:5])}",
                style="yellow",
            )
        )


def render_shrink_skipped(console: Console, why: str) -> None:
    console.print(Text(why, style="yellow"), soft_wrap=True)


def render_shrink(console: Console, shrunk: ShrinkResult | None, replay: str | None) -> None:
    """How a failing chaos run was shrunk to a scenario, and how to replay it."""
    if shrunk is None:
        console.print(
            Text(
                "could not shrink: no failing window tried replays as a scenario under forced "
                "order (the failure may hang on timing that holds cannot force); the history "
                "and the timeline show it as it happened",
                style="yellow",
            ),
            soft_wrap=True,
        )
        return
    runs = shrunk.confirm_runs
    deterministic = shrunk.target_failures == runs and shrunk.reference_passes == runs
    console.print(
        Text.assemble(
            ("shrunk", "bold"),
            f" the {shrunk.finding.kind} finding to {shrunk.name}: "
            f"{shrunk.operations_before} operations of that session down to "
            f"{shrunk.operations_after} ({shrunk.steps} steps), {shrunk.tests} replays in "
            f"{shrunk.seconds:.1f} s"
            + (" (budget ran out: small, maybe not minimal)" if shrunk.exhausted else ""),
        ),
        soft_wrap=True,
    )
    console.print(
        Text(
            f"  fails on the target {shrunk.target_failures}/{runs}, passes on the reference "
            f"server {shrunk.reference_passes}/{runs}"
            + ("" if deterministic else ": not deterministic, see the scenario's steps"),
            style="green" if deterministic else "yellow",
        )
    )
    if replay is not None:
        console.print(Text.assemble("  replay: ", (replay, "cyan")), soft_wrap=True)


LOAD_PROGRESS_EVERY = 10.0
"""Seconds between the progress lines of a load run that is not on a terminal."""


@contextmanager
def load_progress(console: Console) -> Iterator[Callable[[LoadProgress], None]]:
    """A live line on a terminal; elsewhere (CI, a log) a line every 10 s: agents,
    requests and their rate, failures, sessions checked so far and findings."""
    last_printed = -LOAD_PROGRESS_EVERY
    progress = Progress(
        TextColumn("[bold]load"),
        TextColumn("{task.fields[line]}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task("load", total=None, line="starting the Locust processes")

    def update(now: LoadProgress) -> None:
        nonlocal last_printed
        line = load_progress_line(now)
        if console.is_terminal:
            progress.update(task, line=line)
        elif now.seconds - last_printed >= LOAD_PROGRESS_EVERY:
            last_printed = now.seconds
            console.print(f"load {line}", highlight=False, soft_wrap=True)

    with progress:
        yield update


def load_progress_line(now: LoadProgress) -> str:
    return (
        f"{now.seconds:.0f} s: {now.users:,} agents, {now.requests:,} requests "
        f"({now.requests_per_second:,.0f}/s), {now.failures:,} unanswered; "
        f"{now.sessions_checked:,} sessions checked, {plural(now.findings, 'finding')}"
    )


def render_load_stats(console: Console, stats: dict[str, Any], races: dict[str, int]) -> None:
    """Locust's statistics per operation, and which races were set up."""
    table = Table(box=_box(console), title="requests (Locust's statistics)", title_justify="left")
    for column in ("operation", "requests", "unanswered", "p50 ms", "p95 ms", "p99 ms", "per s"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    rows = sorted(stats.get("operations", []), key=lambda e: -int(e["requests"]))
    for entry in [*rows, stats.get("total")]:
        if not entry:
            continue
        table.add_row(
            "all" if entry["name"] == "Aggregated" else f"{entry['method']} {entry['name']}",
            f"{entry['requests']:,}",
            f"{entry['failures']:,}",
            f"{entry['median_ms'] or 0:,.0f}",
            f"{entry['p95_ms'] or 0:,.0f}",
            f"{entry['p99_ms'] or 0:,.0f}",
            f"{entry['requests_per_second']:,.1f}",
        )
    console.print(table)
    kinds = sorted({name.partition(":")[2] for name in races})
    if kinds:
        placed = [
            f"{kind} {races.get(f'placed:{kind}', 0):,}"
            + (f" ({races[f'missed:{kind}']:,} not placed)" if races.get(f"missed:{kind}") else "")
            for kind in kinds
        ]
        console.print("races set up: " + ", ".join(placed), highlight=False)
