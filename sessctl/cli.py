"""The ``sessctl`` command line: thin typer commands that forward to plain functions."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn

import trio
import typer
from rich.console import Console
from rich.text import Text

from harness.errors import HarnessError
from harness.model.builtin_profiles import builtin_profiles
from refserver import RunningServer, ServerConfig
from refserver.server import (
    capacity_hints,
    default_max_turns_in_flight,
    serve_until_signalled,
)
from refserver.transport.engine_http import base_url_problem
from refserver.variants import VARIANTS
from wire.engine import FLAVORS, Flavor

from .defaults import DEFAULT_EXTERNAL_UPSTREAM

# The harness's libraries (pydantic, YAML, httpx, the report) are imported by the
# commands that use them, not here: `sessctl serve` runs the reference server
# alone, and importing the CLI took 62.6 MB with them, 39 MB without.

app = typer.Typer(
    help="Race-test LLM session servers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(highlight=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    # CI logs and files have no width; 80 columns would fold the matrices.
    console = Console(highlight=False, width=120)
err_console = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    # Text, not markup: messages quote user input, which may contain [brackets].
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def _positive_seconds(value: float) -> float:
    if not value > 0 or value == float("inf"):
        raise typer.BadParameter(f"{value:g} is not a positive, finite number of seconds")
    return value


def _non_negative_seconds(value: float) -> float:
    if not value >= 0 or value == float("inf"):
        raise typer.BadParameter(f"{value:g} is not a finite number of seconds >= 0")
    return value


# Target options shared by run-scenarios, chaos and profile check, spelled once.
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile",
        metavar="PROFILE",
        help="How the target differs in conventions: a profile YAML file, or the name of "
        f"a built-in one ({', '.join(sorted(builtin_profiles()))}). Default: reference.",
    ),
]
FlavorOption = Annotated[
    str,
    typer.Option(
        "--flavor",
        metavar="FLAVOR",
        help="Upstream dialect: openai; sglang (SGLang's own fields); or sglang-generate "
        "(SGLang's native /generate too, prompts as text or token ids of the shipped tokenizer).",
    ),
]
RequestTimeoutOption = Annotated[
    float,
    typer.Option(
        "--request-timeout",
        metavar="SECONDS",
        callback=_positive_seconds,
        help="Seconds before a request to the target counts as unanswered.",
    ),
]
# What chaos and explore share: one target, an embedded variant, the upstream's
# address, shrinking.
OneTargetOption = Annotated[
    str | None,
    typer.Option(help="Server under test, URL. Default: the reference server.", metavar="URL"),
]
EmulateOption = Annotated[
    str | None,
    typer.Option(help="Run the reference server as a known-broken variant.", metavar="VARIANT"),
]
UpstreamListenOption = Annotated[
    str | None, typer.Option(help="HOST:PORT for the chaos upstream.", metavar="HOST:PORT")
]
ShrinkOption = Annotated[
    bool,
    typer.Option(
        help="Shrink a failure to a minimal scenario that replays it with holds.", metavar=""
    ),
]
ShrinkBudgetOption = Annotated[
    float,
    typer.Option(help="Seconds shrinking may take before it stops where it is.", metavar="SECONDS"),
]
ScenarioOutOption = Annotated[
    Path | None,
    typer.Option(
        help="Where to write the shrunk scenario (default: in --out, or here).", metavar="FILE"
    ),
]
TargetWaitOption = Annotated[
    float,
    typer.Option(
        "--target-wait",
        metavar="SECONDS",
        callback=_non_negative_seconds,
        help="Seconds to keep probing a target that is not up yet.",
    ),
]


def _base_url_option(value: str | None) -> str | None:
    if value is not None:
        problem = base_url_problem(value)
        if problem:
            raise typer.BadParameter(problem)
    return value


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            shown = version("sessctl")
        except PackageNotFoundError:  # run from a checkout that was never installed
            shown = "unknown (not installed)"
        console.print(f"sessctl {shown}")
        raise typer.Exit(0)


@app.callback()
def _group(
    _version_flag: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the version and exit.",
            metavar="",
        ),
    ] = False,
) -> None:
    """Race-test LLM session servers: a reference server, a chaos upstream, a scenario harness."""


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Interface to bind; loopback unless told otherwise.", metavar="HOST")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(min=0, max=65535, help="Port to bind; 0 picks a free one.", metavar="PORT"),
    ] = 8000,
    upstream: Annotated[
        str | None,
        typer.Option(
            callback=_base_url_option,
            help=(
                "OpenAI-compatible base URL of the LLM engine (POSTs go to "
                "URL/chat/completions). Without it, an embedded deterministic fake "
                "upstream is started."
            ),
            metavar="URL",
        ),
    ] = None,
    upstream_delay: Annotated[
        float,
        typer.Option(
            callback=_non_negative_seconds,
            help="Delay of the embedded fake upstream, in seconds.",
            metavar="SECONDS",
        ),
    ] = 0.0,
    upstream_timeout: Annotated[
        float,
        typer.Option(
            callback=_positive_seconds,
            help="Deadline of one turn's upstream call, retries included, in seconds.",
            metavar="SECONDS",
        ),
    ] = 300.0,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body accepted, in bytes.", metavar="N")
    ] = 8 * 1024 * 1024,
    grace_period: Annotated[
        float,
        typer.Option(
            callback=_non_negative_seconds,
            help="Seconds to wait for requests on shutdown.",
            metavar="SECONDS",
        ),
    ] = 5.0,
    emulate: Annotated[
        str | None,
        typer.Option(
            help="Run a known-broken variant (see --emulate list) to see a failing report.",
            metavar="VARIANT",
        ),
    ] = None,
    upstream_clients: Annotated[
        int | None,
        typer.Option(
            min=1,
            hidden=True,
            help="No effect (kept so that old scripts still start): there is one pool of "
            "engine connections, and each turn in flight may open its own.",
            metavar="N",
        ),
    ] = None,
    max_turns_in_flight: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Chat requests admitted at once; one more gets 503 server_busy at once. "
            "Default: 10,000, or what the open-file limit allows (2 per turn).",
            metavar="N",
        ),
    ] = None,
    access_log: Annotated[
        bool,
        typer.Option(
            help="Log one line per request (with its x-request-id). Errors are logged either way.",
            metavar="",
        ),
    ] = True,
    defer_gc: Annotated[
        bool,
        typer.Option(
            "--defer-gc/--python-gc",
            help="Full garbage collections only in a lull (refserver/collector.py), or on "
            "CPython's own schedule: over a second's pause each at 10,000 turns held.",
            metavar="",
        ),
    ] = True,
) -> None:
    """Run the reference session server."""
    if emulate == "list":
        for variant in VARIANTS.values():
            console.print(Text.assemble((f"{variant.name:<24}", "bold"), variant.bug))
        raise typer.Exit(0)
    _known_variant(emulate)
    from refserver.app import HttpLimits

    # Warnings about this machine's limits only for a scale the user asked for:
    # the default is sized to the open-file limit already, and most runs never
    # come near it (two warnings at every start were noise).
    asked_for_scale = max_turns_in_flight is not None
    max_turns_in_flight = max_turns_in_flight or default_max_turns_in_flight()
    server_log = logging.getLogger("refserver")
    server_log.addHandler(logging.StreamHandler())
    server_log.setLevel(logging.INFO)  # the access log, one line per request
    config = ServerConfig(
        host=host,
        port=port,
        upstream_url=upstream,
        upstream_delay=upstream_delay,
        upstream_timeout=upstream_timeout,
        limits=HttpLimits(max_body_bytes=max_body_bytes, max_turns_in_flight=max_turns_in_flight),
        grace_period=grace_period,
        log_requests=True,
        access_log=access_log,
        emulate=emulate,
        defer_gc=defer_gc,
    )

    def announce(running: RunningServer) -> None:
        upstream_note = "embedded fake" if running.upstream_is_embedded else "external"
        console.print(f"sessctl reference server on {running.url}")
        if emulate is not None:
            console.print(
                Text(f"EMULATING A BUG ({emulate}): {VARIANTS[emulate].bug}", style="bold red")
            )
        console.print(f"upstream ({upstream_note}): {running.upstream_url}")
        console.print(
            f"agents use {running.url}/sessions/{{id}}/v1 as their OpenAI base URL", soft_wrap=True
        )
        console.print(
            f"        or {running.url}/sessions/{{id}} as their Anthropic base URL", soft_wrap=True
        )
        hints = capacity_hints(max_turns_in_flight) if asked_for_scale else []
        if not asked_for_scale:
            console.print(
                f"admits {max_turns_in_flight} turns in flight (503 server_busy past that); "
                "--max-turns-in-flight N checks this machine's limits for N",
                style="dim",
                soft_wrap=True,
            )
        if upstream_clients is not None:
            hints.append(
                "--upstream-clients has no effect any more (one pool of engine connections)"
            )
        for hint in hints:
            err_console.print(Text.assemble(("warning: ", "bold yellow"), hint), soft_wrap=True)

    bind_error = _run_trio(partial(serve_until_signalled, config, announce))
    if bind_error is not None:
        print_error(f"cannot listen on {host}:{port}: {bind_error}")
        raise typer.Exit(3)


@app.command("run-scenarios")
def run_scenarios_command(
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            help="Scenario files or directories; default: the built-in library.", metavar="PATH..."
        ),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            help="Server under test, URL or NAME=URL; repeatable. Default: the reference "
            "server, in-process.",
            metavar="URL",
        ),
    ] = None,
    upstream_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT for the chaos upstream (default 127.0.0.1:8900 with --target, "
            "a free port otherwise).",
            metavar="HOST:PORT",
        ),
    ] = None,
    flavor: FlavorOption = "openai",
    filter: Annotated[
        str | None,
        typer.Option(
            "--filter", help="Only scenarios whose name matches GLOB[,GLOB].", metavar="GLOB[,GLOB]"
        ),
    ] = None,
    exclude: Annotated[
        str | None,
        typer.Option(
            "--exclude",
            help="Skip scenarios whose name matches GLOB[,GLOB].",
            metavar="GLOB[,GLOB]",
        ),
    ] = None,
    repeat: Annotated[
        int | None, typer.Option(min=1, help="Run every scenario N times.", metavar="N")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Scenario runs in flight at once. Default: 8 in-process; 1 against --target, "
            "so that one scenario's load never decides another's verdict.",
            metavar="N",
        ),
    ] = None,
    request_timeout: RequestTimeoutOption = 10.0,
    target_wait: TargetWaitOption = 5.0,
    junit: Annotated[
        Path | None, typer.Option(help="Write a JUnit XML report here.", metavar="FILE")
    ] = None,
    json: Annotated[
        Path | None, typer.Option("--json", help="Write a JSON report here.", metavar="FILE")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write a Markdown report here.", metavar="FILE")
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="List the selected scenarios and exit.", metavar="")
    ] = False,
    quiet: Annotated[
        bool, typer.Option(help="Show matrices only for scenarios that did not pass.", metavar="")
    ] = False,
    profile: ProfileOption = None,
    strict: Annotated[
        bool, typer.Option(help="Convention differences (NON-STRICT) fail the run too.", metavar="")
    ] = False,
    latency_budgets: Annotated[
        bool,
        typer.Option(
            help="Judge the scenarios' within_ms latency budgets (a FAIL when over). Off by "
            "default: latencies are reported, and a verdict never depends on the wall clock.",
            metavar="",
        ),
    ] = False,
    emulate: Annotated[
        str | None,
        typer.Option(
            help="Run against the in-process reference server as a known-broken variant "
            "(see sessctl serve --emulate list).",
            metavar="VARIANT",
        ),
    ] = None,
) -> None:
    """Replay race scenarios against session servers; report a status-code matrix.

    Verdicts: PASS; NON-STRICT (only conventions differ: safe); FAIL (a safety
    property broke); ERROR (the run could not complete).

    Exit status: 0 nothing failed (NON-STRICT included, unless --strict), 1 a
    scenario failed, 2 usage or scenario-file error, 3 a target was unreachable
    or not wired to the chaos upstream.
    """
    from .run import RunOptions, list_scenarios, run_scenarios

    options = RunOptions(
        paths=paths or [],
        targets=target or [],
        upstream_listen=upstream_listen,
        flavor=_parse_flavor(flavor),
        name_filter=filter,
        exclude=exclude,
        repeat=repeat,
        concurrency=concurrency,
        request_timeout=request_timeout,
        target_wait=target_wait,
        junit=junit,
        json=json,
        markdown=markdown,
        quiet=quiet,
        profile=profile,
        strict=strict,
        latency_budgets=latency_budgets,
        emulate=_known_variant(emulate, with_target=bool(target)),
    )
    command = list_scenarios if list_only else run_scenarios
    raise typer.Exit(_run_harness(lambda: command(options, console)))


@app.command("selftest")
def selftest_command(
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            help="Scenario files or directories; default: the built-in library.", metavar="PATH..."
        ),
    ] = None,
    filter: Annotated[
        str | None, typer.Option("--filter", help="GLOB[,GLOB]", metavar="GLOB[,GLOB]")
    ] = None,
    repeat: Annotated[
        int | None, typer.Option(min=1, help="Run every scenario N times.", metavar="N")
    ] = None,
    json: Annotated[
        Path | None, typer.Option("--json", help="Write a JSON report here.", metavar="FILE")
    ] = None,
) -> None:
    """Prove the scenarios catch real bugs: run them on the clean server and every variant.

    Exit status 0 only if the clean server passes everything and every variant
    is caught by at least one scenario.
    """
    from .run import RunOptions, selftest

    options = RunOptions(paths=paths or [], name_filter=filter, repeat=repeat, json=json)
    raise typer.Exit(_run_harness(lambda: selftest(options, console)))


@app.command("list-scenarios")
def list_scenarios_command(
    paths: Annotated[
        list[str] | None, typer.Argument(help="Scenario files or directories.", metavar="PATH...")
    ] = None,
    filter: Annotated[
        str | None, typer.Option("--filter", help="GLOB[,GLOB]", metavar="GLOB[,GLOB]")
    ] = None,
) -> None:
    """List scenarios: name, runs, description, file."""
    from .run import RunOptions, list_scenarios

    options = RunOptions(paths=paths or [], name_filter=filter)
    raise typer.Exit(_run_harness(lambda: list_scenarios(options, console)))


@app.command("chaos")
def chaos_command(
    target: OneTargetOption = None,
    seed: Annotated[int, typer.Option(help="Seeds every client's choices.", metavar="N")] = 1,
    ops: Annotated[
        int, typer.Option(help="Operations to run (ignored with --duration).", metavar="N")
    ] = 2000,
    duration: Annotated[
        float | None, typer.Option(help="Run for this many seconds instead.", metavar="SECONDS")
    ] = None,
    clients: Annotated[int, typer.Option(help="Concurrent clients.", metavar="N")] = 16,
    sessions: Annotated[int, typer.Option(help="Sessions the clients share.", metavar="N")] = 8,
    faults: Annotated[
        str,
        typer.Option(
            help="Comma-separated: delay,hold,503,abort,reset,garbage,disconnect.",
            metavar="FAULT[,FAULT]",
        ),
    ] = "delay,hold,503,abort,reset,garbage,disconnect",
    stream_ratio: Annotated[
        float,
        typer.Option(
            help="Share of chats sent with stream: true (0 to 1); their faults may come "
            "after a chunk.",
            metavar="RATIO",
        ),
    ] = 0.0,
    history: Annotated[
        Path | None, typer.Option(help="Save the history (JSON lines).", metavar="FILE")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for history.jsonl, report.json and timeline.html.", metavar="DIR"
        ),
    ] = None,
    emulate: EmulateOption = None,
    upstream_listen: UpstreamListenOption = None,
    shrink: ShrinkOption = True,
    shrink_budget: ShrinkBudgetOption = 60.0,
    scenario_out: ScenarioOutOption = None,
    profile: ProfileOption = None,
    flavor: FlavorOption = "openai",
    request_timeout: RequestTimeoutOption = 5.0,
    target_wait: TargetWaitOption = 5.0,
) -> None:
    """Random concurrent workload; the history is checked for linearizability and leaks.

    A failure is shrunk to a minimal YAML scenario, written out with the command
    that replays it.

    Exit status: 0 valid, 1 invalid, 2 usage error, 3 target unreachable,
    4 undecided (search budget).
    """
    from harness.chaos.shrink import ShrinkSettings
    from harness.chaos.workload import ChaosSettings, Fault
    from harness.model.profile import load_profile

    from .chaos import chaos

    _known_variant(emulate, with_target=target is not None)
    if shrink_budget <= 0:
        _usage_error("--shrink-budget must be a positive number of seconds")
    chosen: set[Fault] = set()
    for name in filter(None, (f.strip() for f in faults.split(","))):
        try:
            chosen.add(Fault(name))
        except ValueError:
            _usage_error(f"--faults: unknown fault {name!r}")
    if ops < 1 or clients < 1 or sessions < 1:
        _usage_error("--ops, --clients and --sessions must be at least 1")
    if duration is not None and duration <= 0:
        _usage_error("--duration must be a positive number of seconds")
    if not 0 <= stream_ratio <= 1:
        _usage_error(f"--stream-ratio must be from 0 to 1; got {stream_ratio:g}")
    settings = ChaosSettings(
        seed=seed,
        ops=None if duration is not None else ops,
        duration=duration,
        clients=clients,
        sessions=sessions,
        faults=frozenset(chosen),
        request_timeout=request_timeout,
        flavor=_parse_flavor(flavor),
        target_wait=target_wait,
        stream_ratio=stream_ratio,
    )
    raise typer.Exit(
        _run_harness(
            lambda: chaos(
                replace(settings, profile=load_profile(profile)),
                target,
                emulate,
                upstream_listen,
                history,
                out,
                console,
                ShrinkSettings(time_budget=shrink_budget) if shrink else None,
                scenario_out,
                profile_option=profile,
            )
        )
    )


@app.command("load")
def load_command(
    target: OneTargetOption = None,
    users: Annotated[
        int, typer.Option(help="Agents (Locust users) at full load.", metavar="N")
    ] = 100,
    spawn_rate: Annotated[
        float, typer.Option(help="Agents started per second until all run.", metavar="R")
    ] = 50.0,
    run_time: Annotated[
        str, typer.Option(help="How long the load runs: 20s, 5m, 1h.", metavar="DURATION")
    ] = "30s",
    workers: Annotated[
        int | None,
        typer.Option(
            help="Local worker processes (default 1; 0 with --master, where workers "
            "connect from other machines).",
            metavar="K",
        ),
    ] = None,
    expect_workers: Annotated[
        int | None,
        typer.Option(
            help="Workers to wait for before the load starts (default: --workers).", metavar="N"
        ),
    ] = None,
    master: Annotated[
        bool,
        typer.Option(
            "--master",
            help="Serve as the master of workers on other machines (sessctl load --worker).",
            metavar="",
        ),
    ] = False,
    worker_wait: Annotated[
        float,
        typer.Option(
            help="Seconds the master waits for its workers to connect.",
            metavar="SECONDS",
            callback=_positive_seconds,
        ),
    ] = 60.0,
    stop_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds the agents get, once the run time is up, to finish the session "
            "each is living (then it is cut, its open operations recorded as unknown).",
            metavar="SECONDS",
            callback=_non_negative_seconds,
        ),
    ] = 30.0,
    master_bind: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT the master listens on for workers (default 127.0.0.1 and any "
            "free port; with --master, 0.0.0.0:5557).",
            metavar="HOST:PORT",
        ),
    ] = None,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker", help="Run as a worker of a master elsewhere (--master-host).", metavar=""
        ),
    ] = False,
    master_host: Annotated[
        str | None, typer.Option(help="The master's host, for --worker.", metavar="HOST")
    ] = None,
    master_port: Annotated[
        int, typer.Option(help="The master's port, for --worker.", metavar="PORT")
    ] = 5557,
    engine: Annotated[
        str | None,
        typer.Option(
            help="A chaos upstream already running (sessctl upstream), as its base URL "
            "http://HOST:PORT/v1, or several, comma-separated, that --target spreads its "
            "calls over; default: one in this process.",
            metavar="URL",
        ),
    ] = None,
    real_engine: Annotated[
        bool,
        typer.Option(
            "--real-engine",
            help="--engine is a real engine (SGLang, vLLM...), not the chaos upstream: "
            "nothing is held or scripted, races are placed by timing, and only what "
            "needs no engine events is judged.",
            metavar="",
        ),
    ] = False,
    model: Annotated[
        str, typer.Option(help="The model every chat names (for a real engine).", metavar="NAME")
    ] = "sessctl-load",
    mix: Annotated[
        str | None,
        typer.Option(
            help="Weights of the kinds of turn: chat, retry, read, second-writer, "
            "delete-in-flight, hangup (e.g. chat=5,read=2; those not named: 0).",
            metavar="KIND=W[,KIND=W]",
        ),
    ] = None,
    turns: Annotated[
        str, typer.Option(help="Turns in one session's life: N or LOW-HIGH.", metavar="N")
    ] = "2-6",
    fault_rate: Annotated[
        float,
        typer.Option(help="Share of plain chats whose engine call gets a fault.", metavar="RATIO"),
    ] = 0.2,
    stream_ratio: Annotated[
        float,
        typer.Option(
            help="Share of chats sent with stream: true (0 to 1); their holds and faults "
            "may come after a chunk.",
            metavar="RATIO",
        ),
    ] = 0.3,
    think: Annotated[
        float,
        typer.Option(
            help="Seconds an agent waits between its requests.",
            metavar="SECONDS",
            callback=_non_negative_seconds,
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seeds every agent's choices.", metavar="N")] = 1,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the verdict, findings and statistics.", metavar="FILE"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for history.jsonl, report.json, timeline.html and Locust's own "
            "files (locust/).",
            metavar="DIR",
        ),
    ] = None,
    csv: Annotated[
        str | None,
        typer.Option(help="Locust's CSV files, at this path prefix.", metavar="PREFIX"),
    ] = None,
    html: Annotated[Path | None, typer.Option(help="Locust's HTML report.", metavar="FILE")] = None,
    web: Annotated[
        str | None,
        typer.Option(help="Serve Locust's web UI at HOST:PORT, to watch.", metavar="HOST:PORT"),
    ] = None,
    emulate: EmulateOption = None,
    upstream_listen: UpstreamListenOption = None,
    shrink: ShrinkOption = True,
    shrink_budget: ShrinkBudgetOption = 60.0,
    scenario_out: ScenarioOutOption = None,
    profile: ProfileOption = None,
    flavor: FlavorOption = "openai",
    request_timeout: RequestTimeoutOption = 30.0,
    target_wait: TargetWaitOption = 5.0,
) -> None:
    """Load on Locust: agents living whole sessions, every session's history checked.

    Needs the extra: pip install 'sessctl\\[load]'. The findings, their labels and
    the exit status are chaos mode's: 0 valid, 1 invalid, 2 usage error, 3 target
    unreachable or the load could not run, 4 undecided.
    """
    from harness.chaos.shrink import ShrinkSettings
    from harness.load.run import LoadPlan, LoadSetup
    from harness.load.settings import DEFAULT_MIX, parse_mix
    from harness.model.profile import load_profile

    from .chaos import target_and_upstream
    from .load import load, parse_run_time, parse_turns
    from .load import worker as run_worker
    from .run import parse_listen

    if worker:
        if master_host is None:
            _usage_error("--worker needs --master-host: where the master runs")
        raise typer.Exit(_run_harness(lambda: run_worker(master_host, master_port, console)))
    _known_variant(emulate, with_target=target is not None)
    if users < 1 or spawn_rate <= 0:
        _usage_error("--users must be at least 1 and --spawn-rate above 0")
    if shrink_budget <= 0:
        _usage_error("--shrink-budget must be a positive number of seconds")
    if not 0 <= fault_rate <= 1:
        _usage_error(f"--fault-rate must be from 0 to 1; got {fault_rate:g}")
    if not 0 <= stream_ratio <= 1:
        _usage_error(f"--stream-ratio must be from 0 to 1; got {stream_ratio:g}")
    local = workers if workers is not None else (0 if master else 1)
    if local < 0 or (expect_workers is not None and expect_workers < 1):
        _usage_error("--workers must be 0 or more and --expect-workers at least 1")
    expected = expect_workers if expect_workers is not None else local
    if expected < 1:
        _usage_error("--master with no local --workers needs --expect-workers N")
    if real_engine and engine is None:
        _usage_error("--real-engine needs --engine: the engine's base URL")
    if engine is not None and upstream_listen is not None:
        _usage_error("--engine and --upstream-listen: the upstream runs elsewhere, or here")
    try:
        seconds = parse_run_time(run_time)
        turn_range = parse_turns(turns)
        weights = parse_mix(mix) if mix is not None else dict(DEFAULT_MIX)
        url, listen, host, port = target_and_upstream(target, upstream_listen)
        bind_host, bind_port = parse_listen(
            master_bind or ("0.0.0.0:5557" if master else "127.0.0.1:0")
        )
        remote = expected > local and bind_host not in ("127.0.0.1", "localhost", "::1")
        if remote and (target is None or engine is None):
            # What runs in this process listens on loopback, out of other machines' reach.
            _usage_error(
                "workers on other machines need a server and an engine they can reach: "
                "--target URL and --engine URL (a sessctl upstream --listen 0.0.0.0:8900); "
                "or --master-bind 127.0.0.1:PORT for workers on this machine"
            )
        if engine is not None:
            from harness.load.settings import engine_urls
            from refserver.transport.engine_http import base_url_problem

            for one in engine_urls(engine) or [engine]:
                problem = base_url_problem(one, example="http://127.0.0.1:8900/v1")
                if problem is not None:
                    _usage_error(f"--engine {one!r}: {problem}")
            if len(engine_urls(engine)) > 1 and (target is None or real_engine):
                _usage_error(
                    "several --engine addresses are chaos upstreams behind your server "
                    "(--target), which spreads its calls over them"
                )
    except HarnessError as problem:
        _usage_error(str(problem))
    plan = LoadPlan(
        users=users,
        spawn_rate=spawn_rate,
        run_time=seconds,
        workers=local,
        expect_workers=expected,
        master_host=bind_host,
        master_port=bind_port,
        worker_wait=worker_wait,
        stop_timeout=stop_timeout,
        web=web,
        csv=csv,
        html=html,
    )
    raise typer.Exit(
        _run_harness(
            lambda: load(
                LoadSetup(
                    profile=load_profile(profile),
                    flavor=_parse_flavor(flavor),
                    seed=seed,
                    request_timeout=request_timeout,
                    mix=weights,
                    turns=turn_range,
                    fault_rate=fault_rate,
                    think=think,
                    stream_ratio=stream_ratio,
                    real_engine=real_engine,
                    model=model,
                    target_wait=target_wait,
                ),
                plan,
                url,
                emulate,
                engine.rstrip("/") if engine else None,
                (host, port),
                json_out,
                out,
                console,
                ShrinkSettings(time_budget=shrink_budget) if shrink else None,
                scenario_out,
                profile_option=profile,
                listen_text=listen,
            )
        )
    )


@app.command("explore")
def explore_command(
    target: OneTargetOption = None,
    cells: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only the cells matching this glob (PHASE/INTERFERER/BEHAVIOUR, "
            "e.g. 'held/delete/*'); repeatable. --list-cells names them.",
            metavar="GLOB",
        ),
    ] = None,
    list_cells: Annotated[
        bool, typer.Option(help="List the phases, interferers and behaviours, then exit.")
    ] = False,
    parallel: Annotated[
        int, typer.Option(help="Cells run at once, each on sessions of its own.", metavar="N")
    ] = 4,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory for report.json and coverage.html.", metavar="DIR"),
    ] = None,
    json: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON report here.", metavar="FILE")
    ] = None,
    emulate: EmulateOption = None,
    upstream_listen: UpstreamListenOption = None,
    shrink: Annotated[
        bool,
        typer.Option(help="Shrink the first failed cell to a scenario that replays it."),
    ] = True,
    shrink_budget: ShrinkBudgetOption = 60.0,
    scenario_out: ScenarioOutOption = None,
    profile: ProfileOption = None,
    flavor: FlavorOption = "openai",
    request_timeout: RequestTimeoutOption = 5.0,
    target_wait: TargetWaitOption = 5.0,
) -> None:
    """Every interfering request at every phase of a turn, under every engine behaviour.

    Each cell (phase/interferer/behaviour) runs on sessions of its own, is placed
    by holds and checked like a chaos history; the coverage matrix says what
    passed, failed, was untested (and why) or does not apply.

    Exit status: 0 no cell failed, 1 a cell failed, 2 usage error, 3 target
    unreachable.
    """
    from harness.chaos.shrink import ShrinkSettings
    from harness.explore.cells import (
        BEHAVIOURS,
        INTERFERERS,
        PHASES,
        all_cells,
        select,
        unknown_patterns,
    )
    from harness.explore.explore import ExploreSettings
    from harness.model.profile import load_profile

    from .explore import explore

    if list_cells:
        for title, table in (
            ("phases", PHASES),
            ("interferers", INTERFERERS),
            ("behaviours", BEHAVIOURS),
        ):
            console.print(f"[bold]{title}[/bold]")
            for name, meaning in table.items():
                console.print(f"  {name:<18} {meaning}", highlight=False)
        raise typer.Exit(0)
    _known_variant(emulate, with_target=target is not None)
    if shrink_budget <= 0:
        _usage_error("--shrink-budget must be a positive number of seconds")
    if parallel < 1:
        _usage_error("--parallel must be at least 1")
    patterns = cells or ["*"]
    unknown = unknown_patterns(patterns)
    if unknown:
        _usage_error(
            f"--cells {unknown[0]!r} matches no cell; cells are PHASE/INTERFERER/BEHAVIOUR "
            "(sessctl explore --list-cells names them)"
        )
    settings = ExploreSettings(
        cells=tuple(select(all_cells(), patterns)),
        flavor=_parse_flavor(flavor),
        parallel=parallel,
        request_timeout=request_timeout,
        target_wait=target_wait,
    )
    raise typer.Exit(
        _run_harness(
            lambda: explore(
                replace(settings, profile=load_profile(profile)),
                target,
                emulate,
                upstream_listen,
                out,
                json,
                console,
                ShrinkSettings(time_budget=shrink_budget) if shrink else None,
                scenario_out,
                profile_option=profile,
            )
        )
    )


@app.command("check")
def check_command(
    history: Annotated[Path, typer.Argument(help="A history file (JSON lines).", metavar="FILE")],
    json: Annotated[
        Path | None, typer.Option("--json", help="Write a JSON report here.", metavar="FILE")
    ] = None,
    profile: ProfileOption = None,
) -> None:
    """Check a saved history: linearizability per session, durability, no 2xx after
    DELETE, no leaked LLM work. --profile: the one the history was recorded
    with (its trajectory model decides what a turn may do).

    Exit status: 0 valid, 1 invalid, 2 unreadable history, 4 undecided (the
    search budget ran out).
    """
    from harness.model.profile import load_profile

    from .chaos import check

    raise typer.Exit(_run_harness(lambda: check(history, json, console, load_profile(profile))))


profile_app = typer.Typer(
    help="Target profiles: how a server differs from docs/contract.md in its conventions.",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")


@profile_app.command("check")
def profile_check_command(
    target: Annotated[str, typer.Option(help="The server to probe, URL.", metavar="URL")],
    upstream_listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT for the chaos upstream the server must use.", metavar="HOST:PORT"
        ),
    ] = DEFAULT_EXTERNAL_UPSTREAM,
    output: Annotated[
        Path | None,
        typer.Option(help="Also write the suggested profile to this file.", metavar="FILE"),
    ] = None,
    request_timeout: RequestTimeoutOption = 10.0,
    target_wait: TargetWaitOption = 5.0,
    flavor: FlavorOption = "openai",
) -> None:
    """Probe a server and suggest a profile (YAML) for --profile.

    Exit status: 0 a profile was suggested, 1 a partial one (some probes failed:
    the notes quote the answers, and the file says what was not probed), 2 usage
    error, 3 the target is unreachable, not a session server, or not wired to the
    chaos upstream.
    """
    from harness.run.profile_probe import ProbeOptions

    from .run import profile_check

    probe = ProbeOptions(request_timeout, target_wait, _parse_flavor(flavor))
    raise typer.Exit(
        _run_harness(lambda: profile_check(target, upstream_listen, output, probe, console))
    )


@app.command()
def upstream(
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on.", metavar="HOST:PORT")
    ] = "127.0.0.1:8900",
    flavor: FlavorOption = "openai",
    tool_call_content: Annotated[
        str,
        typer.Option(
            help='A tool call\'s content: null (OpenAI, current SGLang) or empty ("", as '
            "SGLang builds patched for servers that refuse null send it).",
            metavar="null|empty",
        ),
    ] = "null",
) -> None:
    """Run the chaos upstream on its own (scriptable over /_sessctl/...)."""
    from harness.report.console import upstream_routes
    from harness.upstream.chaos_upstream import ChaosUpstream

    from .run import parse_listen

    try:
        host, port = parse_listen(listen)
    except HarnessError as problem:
        _usage_error(str(problem))
    if tool_call_content not in ("null", "empty"):
        _usage_error(f"--tool-call-content must be null or empty, not {tool_call_content!r}")
    chaos = ChaosUpstream(
        _parse_flavor(flavor), tool_call_content="" if tool_call_content == "empty" else None
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(chaos.serve, host, port)
            console.print(f"chaos upstream ({flavor}) on {url}")
            console.print(
                f"point a session server's LLM upstream at {url} "
                + upstream_routes(url, chaos.flavor),
                soft_wrap=True,
            )

    def run() -> int:
        trio.run(main)
        return 0

    # The chaos upstream reports an address it cannot take as ListenFailed: one
    # line and exit 2, as run-scenarios and chaos do.
    raise typer.Exit(_run_harness(run))


def _run_harness(command: Callable[[], int]) -> int:
    # except*: a HarnessError raised inside a trio nursery arrives wrapped in an
    # exception group; unwrapping it here serves every command at once.
    failure: HarnessError | None = None
    bug: Exception | None = None
    interrupted = False
    try:
        return command()
    except* HarnessError as group:
        leaf = _first_leaf(group)
        assert isinstance(leaf, HarnessError)
        failure = leaf
    except* KeyboardInterrupt:
        interrupted = True
    except* Exception as group:
        leaf = _first_leaf(group)
        assert isinstance(leaf, Exception)
        bug = leaf
    if interrupted:
        err_console.print("interrupted")
        return 130
    if bug is not None:
        return _report_bug(bug)
    assert failure is not None
    print_error(str(failure))
    return failure.exit_code


INTERNAL_ERROR = 3
"""A bug of sessctl's own: the run could not be judged, as with an unreachable target."""


def _report_bug(bug: Exception) -> int:
    """One line, not a traceback: what broke and where; SESSCTL_DEBUG=1 shows the rest."""
    frames = traceback.extract_tb(bug.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    print_error(
        f"internal error (a sessctl bug, please report it): {type(bug).__name__}: "
        f"{str(bug)[:300]}{where}; rerun with SESSCTL_DEBUG=1 for the traceback"
    )
    if os.environ.get("SESSCTL_DEBUG"):
        traceback.print_exception(bug)
    return INTERNAL_ERROR


def _parse_flavor(value: str) -> Flavor:
    for flavor in FLAVORS:
        if value == flavor:
            return flavor
    _usage_error(f"--flavor must be one of {', '.join(FLAVORS)}")


def _known_variant(emulate: str | None, *, with_target: bool = False) -> str | None:
    """--emulate, checked: a variant that exists, and no --target beside it."""
    if emulate is None:
        return None
    if emulate not in VARIANTS:
        _usage_error(f"--emulate {emulate!r}: unknown variant; see sessctl serve --emulate list")
    if with_target:
        _usage_error("--emulate runs the in-process reference server; it cannot go with --target")
    return emulate


def _usage_error(message: str) -> NoReturn:
    print_error(f"{message}")
    raise typer.Exit(2)


def _run_trio(entry: Callable[[], Awaitable[object]]) -> str | None:
    """Run a trio entry point; an OSError (a port in use, say) comes back as a message."""
    failure: str | None = None
    try:
        trio.run(entry)
    except* OSError as group:
        leaf = _first_leaf(group)
        failure = getattr(leaf, "strerror", None) or str(leaf)
    return failure


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def main() -> None:
    app()
