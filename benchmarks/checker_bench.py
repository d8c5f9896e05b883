"""History-checker benchmark: how long the linearizability check of a big history takes.

    python benchmarks/checker_bench.py [--ops 10000] [--seed 1]

Builds a synthetic history the way chaos mode sees one: sessions shared by
several clients, overlapping turns (one commits, the others conflict),
reads, exact retries, unknown outcomes and deletes. It is valid by
construction, which is the expensive case: every session must be searched to
the end. The baseline, measured side by side, is the invariant checks alone
(one pass over the history). Goal: 10,000 operations in at most 5 s.

    python benchmarks/checker_bench.py --variants [--seeds 1,2,3]

Instead: ``sessctl chaos`` at its default size (2,000 operations, a third of the
chats streamed) against every known-broken variant and, as the baseline, the
clean reference server, each seed; reported per server: how long checking the
history took (median, max) and the verdicts. Goal (issue 31): at most 1 s for
every history.

    python benchmarks/checker_bench.py --histories FILE... --baseline-rev REV

Instead: each saved history (``sessctl chaos --history FILE``) checked by this
code and by the code at git revision REV (a temporary worktree), each in a
process of its own: the seconds each took and both verdicts, which must agree
wherever the baseline reached one ("unknown" is its search giving up).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from harness.chaos.history import Operation
from harness.chaos.linearizability import check_history, check_invariants


def synthetic_history(total: int, seed: int) -> list[Operation]:
    rng = random.Random(seed)
    ops: list[Operation] = []
    clock = 0.0

    def add(
        op: str, session: str, start: float, end: float | None, status: int | None, **f: Any
    ) -> None:
        ops.append(Operation(len(ops), rng.randrange(8), op, session, start, end, status, **f))

    session_index = 0
    while len(ops) < total:
        session = f"s{session_index}"
        session_index += 1
        add("create", session, clock, clock + 0.001, 201)
        clock += 0.002
        committed: list[dict[str, Any]] = []
        for turn in range(rng.randrange(3, 12)):
            writers = rng.randrange(1, 4)  # concurrent writers on one trajectory
            start = clock
            winner = rng.randrange(writers)
            for w in range(writers):
                sent = [*committed, {"role": "user", "content": f"{session} t{turn} w{w}"}]
                answer = {"role": "assistant", "content": f"answer {session} {turn} {w}"}
                if w == winner:
                    if rng.random() < 0.05:  # the winner's client timed out: unknown outcome
                        add(
                            "chat",
                            session,
                            start,
                            None,
                            None,
                            messages=sent,
                            answer_if_committed=answer,
                        )
                    else:
                        add(
                            "chat", session, start, start + 0.010, 200, messages=sent, answer=answer
                        )
                    winner_turn = [*sent, answer]
                else:
                    add("chat", session, start + 0.001, start + 0.012, 409, messages=sent)
            committed = winner_turn
            clock += 0.013
            if rng.random() < 0.5:  # a trainer reads, concurrently with the next turn's start
                add(
                    "get",
                    session,
                    clock - 0.004,
                    clock + 0.001,
                    200,
                    messages=committed,
                    num_assistant=turn + 1,
                )
        add("delete", session, clock, clock + 0.001, 204)
        add("chat", session, clock + 0.002, clock + 0.003, 404, messages=committed)
        clock += 0.004
    return ops[:total] if ops[total - 1].op != "create" else ops[: total - 1]


def variants(seeds: list[int]) -> int:
    """Check time of each variant's chaos history at the default size."""
    import trio

    from harness.chaos.workload import ChaosSettings, run_chaos
    from refserver.variants import VARIANTS

    worst = 0.0
    for name in [None, *sorted(VARIANTS)]:
        seconds: list[float] = []
        verdicts: list[str] = []
        for seed in seeds:
            settings = ChaosSettings(seed=seed, stream_ratio=0.3)
            report = trio.run(partial(run_chaos, settings, emulate=name))
            seconds.append(report.check_seconds)
            verdicts.append(report.result.verdict)
        worst = max(worst, *seconds)
        print(
            f"{name or 'reference (baseline)':<32} check median {statistics.median(seconds):.3f} s"
            f"  max {max(seconds):.3f} s  verdicts {' '.join(verdicts)}",
            flush=True,
        )
    ok = worst <= 1.0
    print(f"goal: every history checked within 1 s: {'met' if ok else 'NOT met'} ({worst:.2f} s)")
    return 0 if ok else 1


TIMED_CHECK = """
import json, sys, time
from pathlib import Path
from harness.chaos.history import read_history
from harness.chaos.linearizability import check_history
history = read_history(Path(sys.argv[1]))
start = time.perf_counter()
result = check_history(history)
print(json.dumps({"verdict": result.verdict, "seconds": time.perf_counter() - start}))
"""


def histories(files: list[str], baseline_rev: str) -> int:
    """Each saved history checked by this code and by ``baseline_rev``'s."""
    from common import ROOT, json_from_code, worktree_at

    def timed(code: Path, file: str) -> dict[str, Any]:
        return json_from_code(code, TIMED_CHECK, str(Path(file).resolve()))

    agree = True
    with worktree_at(baseline_rev) as baseline:
        for file in files:
            ours, theirs = timed(ROOT, file), timed(baseline, file)
            agree &= theirs["verdict"] in (ours["verdict"], "unknown")
            print(
                f"{Path(file).name:<36} this code {ours['seconds']:7.2f} s {ours['verdict']:<8}"
                f"  {baseline_rev} {theirs['seconds']:7.2f} s {theirs['verdict']}",
                flush=True,
            )
    print("verdicts agree" if agree else "verdicts DIFFER")
    return 0 if agree else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--histories", nargs="+", metavar="FILE")
    parser.add_argument("--baseline-rev", default="HEAD")
    args = parser.parse_args()
    if args.histories:
        return histories(args.histories, args.baseline_rev)
    if args.variants:
        return variants([int(s) for s in args.seeds.split(",")])
    history = synthetic_history(args.ops, args.seed)
    full: list[float] = []
    invariants: list[float] = []
    for _ in range(args.runs):
        start = time.perf_counter()
        check_invariants(history)
        invariants.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = check_history(history)
        full.append(time.perf_counter() - start)
    print(f"{len(history)} operations in {result.sessions} sessions: verdict {result.verdict}")
    for name, samples in (("full check", full), ("invariants only (baseline)", invariants)):
        print(
            f"{name:<28} median {statistics.median(samples):6.3f} s  "
            f"min {min(samples):6.3f} s  max {max(samples):6.3f} s  (n={len(samples)})"
        )
    ok = result.verdict == "valid" and statistics.median(full) <= 5
    print(f"goal: valid, and at most 5 s for {args.ops} operations: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
