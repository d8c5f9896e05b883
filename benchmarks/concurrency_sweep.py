"""Chaos at every concurrency: the clean reference server must check VALID everywhere.

    python benchmarks/concurrency_sweep.py [--clients 10,100,300,1000,2000]
                                           [--seeds 1,2,3] [--seconds 10] [--busy 2]

For each number of concurrent clients (as many sessions as clients), and each
seed: ``sessctl chaos --duration SECONDS --no-shrink`` against the embedded
reference server, with ``--busy N`` busy-loop processes beside it (a loaded CI
machine). Reports per size the verdicts (any INVALID on the clean server is a
false alarm), the operations per second (median, min, max) and how long the
harness lagged (seconds its patience did not count, ``harness.run.patience``),
with the first row, the fewest clients, as the baseline the others are read
against. Exit status 1 if any run was not VALID.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter

import trio
from common import busy_loops

from harness.chaos.workload import ChaosReport, ChaosSettings, run_chaos


def one_run(clients: int, seed: int, seconds: float) -> ChaosReport:
    settings = ChaosSettings(
        seed=seed, ops=None, duration=seconds, clients=clients, sessions=clients, stream_ratio=0.3
    )
    return trio.run(run_chaos, settings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100,300,1000,2000")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--busy", type=int, default=2)
    options = parser.parse_args()
    sizes = [int(n) for n in options.clients.split(",")]
    seeds = [int(n) for n in options.seeds.split(",")]
    rows = []
    with busy_loops(options.busy):
        for clients in sizes:
            verdicts: Counter[str] = Counter()
            rates, lags = [], []
            for seed in seeds:
                report = one_run(clients, seed, options.seconds)
                verdicts[report.result.verdict] += 1
                rates.append(report.ops_per_second)
                lags.append(report.lag)
                kinds = sorted({f.kind for f in report.result.findings})
                print(
                    f"{clients} clients, seed {seed}: {report.result.verdict} {kinds or ''} "
                    f"{report.ops_per_second:.0f} ops/s, harness lag {report.lag:.1f} s",
                    flush=True,
                )
            rows.append((clients, verdicts, rates, lags))
    base = statistics.median(rows[0][2])
    print(
        f"\nclean reference server, {len(seeds)} seeds of {options.seconds:g} s each, "
        f"stream ratio 0.3, {options.busy} busy loop(s) beside it:"
    )
    print("| clients | verdicts | ops/s median (min / max) | vs the first row | lag median |")
    print("|---|---|---|---|---|")
    for clients, verdicts, rates, lags in rows:
        median = statistics.median(rates)
        print(
            f"| {clients} | {dict(verdicts)} | {median:.0f} ({min(rates):.0f} / {max(rates):.0f}) "
            f"| {median / base:.2f} | {statistics.median(lags):.1f} s |"
        )
    false_alarms = sum(n for _, v, _, _ in rows for verdict, n in v.items() if verdict != "valid")
    print(f"runs not VALID on the clean server: {false_alarms}")
    return 1 if false_alarms else 0


if __name__ == "__main__":
    sys.exit(main())
