"""Determinism: the same verdicts run after run, and every variant caught every time.

    python benchmarks/determinism.py [--repeat 50] [--selftest-repeat 20]
                                     [--loaded-repeat 20] [--chaos-runs 20] [--chaos-ops 2000]

1. ``sessctl run-scenarios --repeat N`` against the embedded reference server:
   every scenario must pass in all N runs. Races left free on purpose show
   their split (which of two concurrent DELETEs wins), which is expected.
2. ``sessctl selftest --repeat M``: for every known-broken variant, the
   scenarios that catch it in all M runs (at least one is required), and
   those that catch it in some runs only.
3. Under load: two CPU-bound processes (as many as this 2-core machine has
   cores) run beside ``sessctl run-scenarios --repeat K`` and beside
   ``sessctl chaos --stream-ratio 0.5`` runs of 2,000 operations, each with its
   own seed. The
   clean reference server must get 0 FAIL, 0 UNTESTED and 0 ERROR in every
   one: a verdict that a busy CI runner can flip is worth nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import busy_loops, run_sessctl


def sessctl(*args: str) -> tuple[int, float]:
    code, _, seconds = run_sessctl(*args)
    return code, seconds


def loaded(args: argparse.Namespace, tmp: Path) -> bool:
    """Phase 3: the clean server, with every core kept busy by another process."""
    ok = True
    with busy_loops(2):
        report_path = tmp / "loaded.json"
        code, seconds = sessctl(
            "run-scenarios", "--repeat", str(args.loaded_repeat), "--quiet",
            "--json", str(report_path),
        )  # fmt: skip
        report = json.loads(report_path.read_text())
        summary = report["summary"]
        runs = sum(len(s["runs"]) for s in report["scenarios"])
        print(
            f"under load, run-scenarios --repeat {args.loaded_repeat}: exit {code} in "
            f"{seconds:.1f} s; {runs} runs; scenarios failed {summary['failed']}, "
            f"untested {summary['untested']}, errors {summary['errors']}"
        )
        # A race the load kept from being placed is as much a flipped verdict.
        ok &= code == 0 and summary["failed"] == summary["untested"] == summary["errors"] == 0
        verdicts: dict[int, int] = {}
        started = time.perf_counter()
        for seed in range(1, args.chaos_runs + 1):
            code, _ = sessctl(
                "chaos", "--seed", str(seed), "--ops", str(args.chaos_ops), "--no-shrink",
                "--stream-ratio", "0.5",
            )  # fmt: skip
            verdicts[code] = verdicts.get(code, 0) + 1
            if code != 0:
                print(f"  chaos seed {seed}: exit {code} (0 is valid)")
        valid = verdicts.get(0, 0)
        elapsed = time.perf_counter() - started
        print(
            f"under load, {args.chaos_runs} chaos runs of {args.chaos_ops} operations "
            "(half the chats streamed): "
            f"{valid} valid, {args.chaos_runs - valid} not, in {elapsed:.1f} s"
        )
        ok &= valid == args.chaos_runs
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--selftest-repeat", type=int, default=20)
    parser.add_argument("--loaded-repeat", type=int, default=20)
    parser.add_argument("--chaos-runs", type=int, default=20)
    parser.add_argument("--chaos-ops", type=int, default=2000)
    parser.add_argument("--only-loaded", action="store_true", help="phase 3 only")
    args = parser.parse_args()
    ok = True
    if args.only_loaded:
        with tempfile.TemporaryDirectory() as tmp:
            ok = loaded(args, Path(tmp))
        print("deterministic under load" if ok else "NOT deterministic under load")
        return 0 if ok else 1
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
        ok &= loaded(args, Path(tmp))
    print("deterministic" if ok else "NOT deterministic")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
