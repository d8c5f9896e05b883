"""Harness benchmark: wall time of the whole built-in suite, as a user runs it.

    python benchmarks/suite_bench.py [--runs 5]

Runs ``sessctl run-scenarios`` (the full library against the embedded reference
server) and, interleaved with it as the baseline, the same command on a single
trivial scenario: interpreter start-up, imports, server start and teardown.
The difference is what the race library itself costs. Goal: full suite <= 10 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def timed(*args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", "run-scenarios", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run-scenarios {' '.join(args)} exited {done.returncode}:\n{done.stdout}")
    return elapsed


def describe(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    return (
        f"{name:<34} n={len(samples)}  median={statistics.median(samples):6.2f} s  "
        f"min={ordered[0]:6.2f} s  max={ordered[-1]:6.2f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    full: list[float] = []
    floor: list[float] = []
    for _ in range(args.runs):  # interleaved, so machine noise hits both alike
        floor.append(timed("--filter", "chat-never-existed"))
        full.append(timed())
    print(describe("full built-in suite", full))
    print(describe("one trivial scenario (baseline)", floor))
    median = statistics.median(full)
    print(
        f"suite cost above the baseline: {median - statistics.median(floor):.2f} s; "
        f"goal full suite <= 10 s: {'met' if median <= 10 else 'NOT met'}"
    )
    return 0 if median <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
