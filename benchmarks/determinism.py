"""Determinism: the same verdicts run after run, and every variant caught every time.

    python benchmarks/determinism.py [--repeat 50] [--selftest-repeat 20]

1. ``sessctl run-scenarios --repeat N`` against the embedded reference server:
   every scenario must pass in all N runs. Races left free on purpose show
   their split (which of two concurrent DELETEs wins), which is expected.
2. ``sessctl selftest --repeat M``: for every known-broken variant, the
   scenarios that catch it in all M runs (at least one is required), and
   those that catch it in some runs only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sessctl(*args: str) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", *args], capture_output=True, text=True, check=False
    )
    return done.returncode, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--selftest-repeat", type=int, default=20)
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "runs.json"
        code, seconds = sessctl(
            "run-scenarios", "--repeat", str(args.repeat), "--quiet", "--json", str(report_path)
        )
        report = json.loads(report_path.read_text())
        print(f"run-scenarios --repeat {args.repeat}: exit {code} in {seconds:.1f} s")
        for scenario in report["scenarios"]:
            runs = scenario["runs"]
            passed = sum(1 for run in runs if run["verdict"] == "pass")
            ok &= passed == len(runs)
            spread = [
                f"{s['step']} {s['observed']}"
                for s in scenario["steps"]
                if s["expected"] and len(s["observed"]) > 1
            ]
            note = f"  free race: {'; '.join(spread)}" if spread else ""
            print(f"  {scenario['name']:<42} {passed}/{len(runs)} passed{note}")

        self_path = Path(tmp) / "selftest.json"
        code, seconds = sessctl(
            "selftest", "--repeat", str(args.selftest_repeat), "--json", str(self_path)
        )
        selftest = json.loads(self_path.read_text())
        print(f"selftest --repeat {args.selftest_repeat}: exit {code} in {seconds:.1f} s")
        ok &= code == 0
        for variant, found in selftest["variants"].items():
            every = found["caught_in_every_run_by"]
            ok &= bool(every)
            print(f"  {variant:<24} caught in every run by {', '.join(every) or 'NONE'}")
            matrix = selftest["matrix"]
            sometimes = [
                f"{name} ({matrix[name][variant]['caught_runs']}/{args.selftest_repeat})"
                for name in found["caught_by"]
                if name not in every
            ]
            if sometimes:
                print(f"  {'':<24} and in some runs by {', '.join(sometimes)}")
    print("deterministic" if ok else "NOT deterministic")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
