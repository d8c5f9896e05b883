"""Running many scenarios against one or more targets, with one chaos upstream.

With no target, the reference server is started in-process on loopback and
wired to the chaos upstream: the embedded default. An external target must
be started with the chaos upstream's URL as its LLM backend; a pre-flight
chat checks that it really is, so a mis-wired setup is reported as such
instead of as a wall of confusing failures.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

from harness.model.scenario import HTTP_OPS, Expect, Scenario
from harness.results import Finding, RunResult, ScenarioResult, StepSummary, SuiteResult, Verdict
from harness.upstream.chaos_upstream import ChaosUpstream
from refserver.server import ServerConfig, serve
from wire.engine import Flavor

from .client import TargetClient
from .preflight import check_target
from .runner import RunSettings, ScenarioRun

EMBEDDED = "reference"

NOT_RUN = "not run"
"""The matrix cell of a step a run never reached (an earlier step stopped it)."""


@dataclass(frozen=True)
class Target:
    name: str
    url: str | None
    """None: start the reference server in-process."""
    emulate: str | None = None
    """For in-process targets only: a known-broken variant of the reference server."""
    rerun_options: tuple[str, ...] = ()
    """The run's other options that judged this target and a rerun needs too
    (``--profile``, ``--flavor``, ``--upstream-listen``, ...)."""

    @property
    def command_option(self) -> str:
        """What ``sessctl run-scenarios`` needs to be told to run against this target again."""
        if self.url is not None:
            where = ["--target", self.url]
        else:
            where = ["--emulate", self.emulate] if self.emulate else []
        options = [*where, *self.rerun_options]
        return f" {shlex.join(options)}" if options else ""


@dataclass(frozen=True)
class SuiteSettings:
    concurrency: int = 8
    repeat: int | None = None
    """Overrides every scenario's ``repeat``."""
    flavor: Flavor = "openai"
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 0
    target_wait: float = 5.0
    """How long to keep probing a target that does not answer yet."""
    run: RunSettings = field(default_factory=RunSettings)


@dataclass(frozen=True)
class SuiteHooks:
    on_upstream_ready: Callable[[str], None] = lambda url: None
    on_start: Callable[[int], None] = lambda total_runs: None
    on_run_done: Callable[[str, str, Verdict], None] = lambda target, name, verdict: None
    should_stop: Callable[[], bool] = lambda: False
    """Asked before each run starts: True (after a Ctrl-C) starts no more, and the
    suite returns what had finished, marked interrupted."""


def runs_of(scenario: Scenario, settings: SuiteSettings) -> int:
    return settings.repeat or scenario.repeat


async def run_suite(
    scenarios: Sequence[Scenario],
    targets: Sequence[Target],
    settings: SuiteSettings,
    hooks: SuiteHooks | None = None,
    chaos: ChaosUpstream | None = None,
) -> SuiteResult:
    """Run every scenario on every target; ``chaos`` may be one already serving."""
    hooks = hooks or SuiteHooks()
    settings.run.profile.admin_key()  # a key the profile needs but cannot find: exit 2 now
    # One library for every shape: each scenario says what differs on a tree.
    scenarios = [s.for_model(settings.run.profile.trajectory.model) for s in scenarios]
    results: list[ScenarioResult] = []
    unreachable: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        if chaos is None or chaos.url is None:
            chaos = chaos or ChaosUpstream(
                settings.flavor, tool_call_content=settings.run.profile.engine.content
            )
            await nursery.start(
                partial(chaos.serve, settings.upstream_host, settings.upstream_port)
            )
        assert chaos.url is not None
        upstream_url = chaos.url
        hooks.on_upstream_ready(upstream_url)
        hooks.on_start(len(targets) * sum(runs_of(s, settings) for s in scenarios))
        for target in targets:
            # An in-process server lives only as long as its target's runs, so a
            # variant's leftovers never run beside the next target's timing bounds.
            async with trio.open_nursery() as target_nursery:
                url = target.url
                if url is None:
                    config = ServerConfig(port=0, upstream_url=upstream_url, emulate=target.emulate)
                    url = (await target_nursery.start(serve, config)).url
                problem, target_results = await _run_target(
                    target, url, scenarios, chaos, settings, hooks
                )
                target_nursery.cancel_scope.cancel()
            if problem is not None:
                unreachable[target.name] = problem
            results.extend(target_results)
        nursery.cancel_scope.cancel()
    return SuiteResult(
        [t.name for t in targets],
        results,
        unreachable,
        strict=settings.run.strict,
        interrupted=hooks.should_stop(),
    )


async def _run_target(
    target: Target,
    url: str,
    scenarios: Sequence[Scenario],
    chaos: ChaosUpstream,
    settings: SuiteSettings,
    hooks: SuiteHooks,
) -> tuple[str | None, list[ScenarioResult]]:
    """Probe one target, check its wiring, run the scenarios on it."""
    assert chaos.url is not None
    client = TargetClient(
        url,
        request_timeout=settings.run.request_timeout,
        in_process=target.url is None,
        health_path=settings.run.profile.health_path,
    )
    try:
        problem = await check_target(
            client,
            chaos,
            settings.run.profile,
            wait=settings.target_wait,
            external=target.url is not None,
        )
        if problem is not None:
            for scenario in scenarios:
                for _ in range(runs_of(scenario, settings)):
                    hooks.on_run_done(target.name, scenario.name, Verdict.ERROR)
            return problem, _unreachable_results(scenarios, target.name, problem)
        return None, await _run_scenarios(scenarios, target.name, client, chaos, settings, hooks)
    finally:
        await client.aclose()


async def _run_scenarios(
    scenarios: Sequence[Scenario],
    target: str,
    client: TargetClient,
    chaos: ChaosUpstream,
    settings: SuiteSettings,
    hooks: SuiteHooks,
) -> list[ScenarioResult]:
    limiter = trio.CapacityLimiter(settings.concurrency)
    runs: dict[str, list[RunResult]] = {s.name: [] for s in scenarios}

    async def one(scenario: Scenario, index: int) -> None:
        async with limiter:
            if hooks.should_stop():
                return
            result = await ScenarioRun(scenario, client, chaos, index, settings.run).run()
        runs[scenario.name].append(result)
        hooks.on_run_done(target, scenario.name, result.verdict)

    async with trio.open_nursery() as nursery:
        for scenario in scenarios:
            for index in range(runs_of(scenario, settings)):
                nursery.start_soon(one, scenario, index)
    return [
        summarise(scenario, target, sorted(runs[scenario.name], key=lambda r: r.index))
        for scenario in scenarios
        if runs[scenario.name]  # none ran: stopped before it (Ctrl-C)
    ]


def _expected_cell(expect: Expect) -> str:
    """The expected status, and for a stream how it ends, as the matrix writes cells."""
    matcher = expect.status_matcher
    assert matcher is not None
    if expect.stream is None:
        return matcher.describe()
    if expect.stream == "error":
        return f"{matcher.describe()} ✗{' or '.join(sorted(expect.error_types)) or 'error'}"
    return f"{matcher.describe()} {'✓[DONE]' if expect.stream == 'done' else '✗cut'}"


def summarise(scenario: Scenario, target: str, runs: list[RunResult]) -> ScenarioResult:
    steps: list[StepSummary] = []
    for step in scenario.steps:
        if step.op not in HTTP_OPS:
            continue
        cells: Counter[str] = Counter()
        expected_cells: set[str] = set()
        convention_cells: set[str] = set()
        matcher = step.expect.status_matcher if step.expect else None
        for run in runs:
            observation = run.observations.get(step.id)
            if observation is None:
                cells[NOT_RUN] += 1
                continue
            cells[observation.cell] += 1
            if matcher is None or observation.status is None:
                continue
            if matcher.matches(observation.status):
                expected_cells.add(observation.cell)
            elif matcher.outcome is None or matcher.outcome == (observation.status // 100 == 2):
                convention_cells.add(observation.cell)
        budget = step.expect.within_ms if step.expect else None
        latencies = tuple(
            observation.latency_ms
            for run in runs
            if budget is not None
            and (observation := run.observations.get(step.id)) is not None
            and observation.status is not None
        )
        steps.append(
            StepSummary(
                step.id,
                step.op,
                _expected_cell(step.expect) if step.expect and matcher else None,
                cells,
                frozenset(expected_cells),
                frozenset(convention_cells),
                budget,
                latencies,
            )
        )
    return ScenarioResult(
        scenario.name, scenario.description.strip(), scenario.source, target, runs, steps
    )


def _unreachable_results(
    scenarios: Sequence[Scenario], target: str, problem: str
) -> list[ScenarioResult]:
    finding = Finding(None, "a reachable target", problem)
    return [
        ScenarioResult(
            s.name,
            s.description.strip(),
            s.source,
            target,
            [RunResult(0, Verdict.ERROR, {}, [], [finding])],
            [],
        )
        for s in scenarios
    ]
