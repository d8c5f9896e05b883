"""Where a chaos run's CPU goes: the harness's process against the server's, per operation.

    python benchmarks/harness_cpu.py [--ops 5000] [--runs 3] [--baseline-rev REV]

Each run is ``sessctl chaos`` (its library call, ``run_chaos``) at the default
settings but ``--ops``, against the embedded reference server, in a process of
its own: the harness (the clients and the chaos upstream, one trio loop) is that
process, the server its child. CPU comes from ``getrusage`` (self, and children
once the server has exited), so it includes start-up and the check: compare
runs, not absolutes. With ``--baseline-rev REV`` the same measurement of the
code at git revision REV (a temporary worktree) is interleaved run by run: the
baseline, side by side in the same minutes of this machine.

Reports per code: operations/s, the harness's and the server's CPU per operation
(ms), and the harness's scheduler rounds per operation (its trio loop's waits
for I/O: a figure this machine's speed does not move), medians with min and max.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

from common import ROOT, json_from_code, worktree_at

MEASURE = """
import json, resource, sys, trio
from harness.chaos.workload import ChaosSettings, run_chaos

class Rounds(trio.abc.Instrument):
    # Scheduler rounds of the harness's loop: a figure the machine's speed does not move.
    count = 0
    def before_io_wait(self, timeout):
        Rounds.count += 1

async def main():
    ops = int(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF)
    report = await run_chaos(ChaosSettings(seed=1, ops=ops))
    me = resource.getrusage(resource.RUSAGE_SELF)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = len(report.history)
    harness = (me.ru_utime + me.ru_stime) - (before.ru_utime + before.ru_stime)
    server = child.ru_utime + child.ru_stime
    print(json.dumps({"verdict": report.result.verdict, "rate": report.ops_per_second,
                      "harness_ms": harness / n * 1000, "server_ms": server / n * 1000,
                      "rounds": Rounds.count / n}))

trio.run(main, instruments=[Rounds()])
"""


def measure(code: Path, ops: int) -> dict[str, float | str]:
    return json_from_code(code, MEASURE, str(ops))


def spread(values: list[float], digits: int = 0) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-rev", default=None)
    args = parser.parse_args()
    codes = {"this code": ROOT}
    with contextlib.ExitStack() as stack:
        if args.baseline_rev:
            codes[f"baseline {args.baseline_rev}"] = stack.enter_context(
                worktree_at(args.baseline_rev)
            )
        results: dict[str, list[dict[str, float | str]]] = {name: [] for name in codes}
        for _ in range(args.runs):
            for name, code in codes.items():
                results[name].append(measure(code, args.ops))
    print(f"{args.ops} operations a run, {args.runs} runs interleaved; median (min-max)")
    print(
        f"{'code':<28} {'ops/s':>18} {'harness ms/op':>18} {'server ms/op':>18} "
        f"{'harness rounds/op':>18}  verdicts"
    )
    valid = True
    for name, runs in results.items():
        rates = [float(r["rate"]) for r in runs]
        harness = [float(r["harness_ms"]) for r in runs]
        server = [float(r["server_ms"]) for r in runs]
        rounds = [float(r["rounds"]) for r in runs]
        verdicts = sorted({str(r["verdict"]) for r in runs})
        valid &= verdicts == ["valid"]
        print(
            f"{name:<28} {spread(rates):>18} {spread(harness, 2):>18} "
            f"{spread(server, 2):>18} {spread(rounds, 2):>18}  {', '.join(verdicts)}"
        )
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
