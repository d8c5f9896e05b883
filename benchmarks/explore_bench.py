"""Exploration benchmark: the whole product against the reference server, within budget.

    python benchmarks/explore_bench.py [--runs 3] [--busy 0]

Runs ``sessctl explore``'s full product (every phase, interferer and engine
behaviour) against the embedded reference server, ``--runs`` times, with the
default 4 cells at once, interleaved run by run with a baseline measured side
by side: the same product one cell at a time (``parallel=1``), which is what
the parallelism buys. Reports, per setting, the wall time (median, min, max:
the goal is at most 120 s), the cells per second, how each cell's time is
spread (p50 / p95 / p99 / max over every cell of every run), and the outcome
counts of each run (a failed cell on the reference server is a bug).
``--busy N`` starts N busy-loop processes beside it first, as a loaded CI
machine would be.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter

import trio
from common import busy_loops, percentile

from harness.explore.explore import ExploreReport, ExploreSettings, run_explore

BUDGET_SECONDS = 120.0


async def one_run(parallel: int) -> ExploreReport:
    return await run_explore(ExploreSettings(parallel=parallel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0)
    options = parser.parse_args()
    settings = {"4 cells at once (default)": 4, "one cell at a time (baseline)": 1}
    walls: dict[str, list[float]] = {name: [] for name in settings}
    cells: dict[str, list[float]] = {name: [] for name in settings}
    outcomes: dict[str, list[Counter[str]]] = {name: [] for name in settings}
    with busy_loops(options.busy):
        for run in range(1, options.runs + 1):
            for name, parallel in settings.items():  # interleaved, run by run
                report = trio.run(one_run, parallel)
                walls[name].append(report.elapsed)
                cells[name] += [r.seconds for r in report.results if r.seconds]
                outcomes[name].append(Counter(r.outcome for r in report.results))
                print(f"run {run}, {name}: {report.elapsed:.1f} s, {dict(outcomes[name][-1])}")
    print(f"\nthe full product ({sum(outcomes[next(iter(settings))][0].values())} cells), "
          f"{options.runs} runs each, {options.busy} busy loop(s) beside it:")  # fmt: skip
    for name in settings:
        wall = walls[name]
        total = sum(outcomes[name][0].values())
        each = cells[name]
        print(
            f"  {name}: wall median {statistics.median(wall):.1f} s "
            f"(min {min(wall):.1f}, max {max(wall):.1f}); "
            f"{total / statistics.median(wall):.0f} cells/s; one cell p50 "
            f"{percentile(each, 50) * 1000:.0f} ms, p95 {percentile(each, 95) * 1000:.0f} ms, "
            f"p99 {percentile(each, 99) * 1000:.0f} ms, max {max(each) * 1000:.0f} ms"
        )
    worst = max(walls[next(iter(settings))])
    failed = sum(c["failed"] for runs in outcomes.values() for c in runs)
    met = "met" if worst <= BUDGET_SECONDS else "MISSED"
    print(
        f"budget {BUDGET_SECONDS:.0f} s: {met} (slowest default run {worst:.1f} s); "
        f"failed cells on the reference: {failed}"
    )
    sys.exit(0 if worst <= BUDGET_SECONDS and failed == 0 else 1)


if __name__ == "__main__":
    main()
