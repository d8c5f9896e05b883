"""``sessctl explore``: every cell against one target, and the coverage it reached."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from harness.chaos.case import PROPERTY_OF_FINDING, ScenarioText, shrunk_text
from harness.chaos.linearizability import Finding
from harness.chaos.shrink import ShrinkResult, ShrinkSettings
from harness.chaos.workload import (
    chaos_cannot_check,
    describe_target,
    shrink_on,
    unshrinkable,
)
from harness.errors import UsageError
from harness.model.profile import REFERENCE_PROFILE, Profile
from harness.run.client import TargetClient
from harness.run.preflight import require_target
from harness.upstream.chaos_upstream import ChaosUpstream
from refserver.server import ServerConfig, serve
from refserver.upstream import RetryPolicy
from wire.engine import Flavor

from .cells import Cell, all_cells
from .driver import CellResult, CellRun, Outcome

OUTCOMES: tuple[Outcome, ...] = ("passed", "failed", "untested", "not applicable")

EXPLORE_RETRY = RetryPolicy(backoff_initial=0.15)
"""The embedded server's retry policy: its first back-off is the window in which the
retry-wait phase is placed, wide enough for the interfering request to land in it
on a loaded machine (the default's 50 ms is not, beside two busy processes)."""


@dataclass(frozen=True)
class ExploreSettings:
    cells: tuple[Cell, ...] = tuple(all_cells())
    profile: Profile = REFERENCE_PROFILE
    flavor: Flavor = "openai"
    parallel: int = 4
    """Cells run at once (each on sessions of its own)."""
    request_timeout: float = 5.0
    target_wait: float = 5.0


@dataclass(frozen=True)
class ExploreReport:
    results: tuple[CellResult, ...]
    elapsed: float
    interrupted: bool = False
    shrunk: ShrinkResult | None = None
    """The first failed cell that replays, as a minimal scenario."""
    shrunk_cell: CellResult | None = None
    shrink_skipped: str | None = None
    """Why no failed cell was shrunk although shrinking was asked for."""

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.outcome == "failed"]

    @property
    def exit_code(self) -> int:
        """0 every applicable cell passed or was untested with a reason; 1 a cell failed."""
        return 1 if self.failed else 0

    def finding_kinds(self) -> Counter[str]:
        return Counter(f.kind for r in self.failed for f in r.findings)


async def run_explore(
    settings: ExploreSettings,
    target_url: str | None = None,
    *,
    emulate: str | None = None,
    upstream_host: str = "127.0.0.1",
    upstream_port: int = 0,
    on_upstream_ready: Callable[[str], None] | None = None,
    on_cell: Callable[[CellResult], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    shrink_settings: ShrinkSettings | None = None,
    on_shrinking: Callable[[], None] | None = None,
) -> ExploreReport:
    """Run the cells against a target (default: the embedded reference server)."""
    unsupported = chaos_cannot_check(settings.profile)
    if unsupported is not None:
        raise UsageError(f"sessctl explore: {unsupported.replace('chaos checker', 'checker')}")
    upstream = ChaosUpstream(settings.flavor, tool_call_content=settings.profile.engine.content)
    results: dict[Cell, CellResult] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(upstream.serve, upstream_host, upstream_port))
        assert upstream.url is not None
        if on_upstream_ready is not None:
            on_upstream_ready(upstream.url)
        url = target_url
        if url is None:
            # In this trio loop, where the client's settle is exact: a request sent
            # has been read and waits on whatever it waits on (a lock, say), so the
            # queued phase is placed for certain.
            embedded = ServerConfig(
                port=0, upstream_url=upstream.url, emulate=emulate, retry=EXPLORE_RETRY
            )
            url = (await nursery.start(serve, embedded)).url
        client = TargetClient(
            url,
            request_timeout=settings.request_timeout,
            health_path=settings.profile.health_path,
            in_process=target_url is None,
        )
        started = trio.current_time()
        try:
            await require_target(
                client,
                upstream,
                settings.profile,
                wait=settings.target_wait,
                external=target_url is not None,
            )
            limiter = trio.CapacityLimiter(settings.parallel)

            async def one(index: int, cell: Cell) -> None:
                async with limiter:
                    if should_stop():
                        return
                    run = CellRun(
                        cell, client, upstream, settings.profile, settings.flavor, f"x{index}"
                    )
                    result = await run.run()
                results[cell] = result
                if on_cell is not None:
                    on_cell(result)

            async with trio.open_nursery() as cells:
                for index, cell in enumerate(settings.cells):
                    cells.start_soon(one, index, cell)
        finally:
            await client.aclose()
        elapsed = trio.current_time() - started
        ordered = tuple(results[c] for c in settings.cells if c in results)
        shrunk: tuple[ShrinkResult | None, CellResult | None, str | None] = (None, None, None)
        failed = [r for r in ordered if r.outcome == "failed"]
        if shrink_settings is not None and failed and not should_stop():
            if on_shrinking is not None:
                on_shrinking()
            shrunk = await _shrink_first(
                nursery, upstream, target_url, emulate, failed, settings, shrink_settings
            )
        nursery.cancel_scope.cancel()
    return ExploreReport(
        ordered,
        elapsed,
        interrupted=should_stop(),
        shrunk=shrunk[0],
        shrunk_cell=shrunk[1],
        shrink_skipped=shrunk[2],
    )


SHRINKABLE = frozenset(PROPERTY_OF_FINDING) - {
    "answer-not-from-engine",
    "other-session-waits",
    "accepted-malformed",
}
"""Findings a replayed scenario can show: what explore alone judges (from what the
engine answered, or a request outside the history) cannot be shrunk as a history."""


async def _shrink_first(
    nursery: trio.Nursery,
    upstream: ChaosUpstream,
    target_url: str | None,
    emulate: str | None,
    failed: list[CellResult],
    settings: ExploreSettings,
    shrink_settings: ShrinkSettings,
) -> tuple[ShrinkResult | None, CellResult | None, str | None]:
    """The first failed cell whose finding a scenario replays, shrunk; or why none was."""
    why = unshrinkable(settings.profile)
    if why is not None:
        return None, None, why
    assert upstream.url is not None
    embedded = ServerConfig(port=0, upstream_url=upstream.url, emulate=emulate)
    against = describe_target(target_url, emulate)
    tried = 0
    for result in failed:
        findings = [f for f in result.findings if f.kind in SHRINKABLE]
        if not findings:
            continue
        tried += 1

        def text_for(finding: Finding, result: CellResult = result) -> ScenarioText:
            return shrunk_text(
                f"explore-{result.cell.name.replace('/', '-')}-{finding.kind}",
                f"sessctl explore (cell {result.cell.name}: {result.cell.describe()}; "
                f"against {against})",
                finding,
            )

        shrunk, unreadable = await shrink_on(
            nursery,
            upstream,
            target_url,
            embedded,
            list(result.history),
            findings,
            settings.profile,
            settings.request_timeout,
            shrink_settings,
            text_for,
        )
        if unreadable is not None:  # a sessctl bug: the next cell would meet it too
            return None, None, unreadable
        if shrunk is not None:
            return shrunk, result, None
        if tried >= SHRINK_CELLS_TRIED:
            break
    if not tried:
        return None, None, "no failed cell has a finding a replayed scenario can show"
    return None, None, f"the first {tried} failed cell(s) did not replay as a scenario"


SHRINK_CELLS_TRIED = 3


__all__ = ["OUTCOMES", "ExploreReport", "ExploreSettings", "run_explore"]
