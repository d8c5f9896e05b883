"""Chaos-mode benchmark: generation rate, time to find known bugs, and shrinking.

    python benchmarks/chaos_bench.py [--ops 2000] [--seed 1] [--runs 5] [--clean-ops N]
                                     [--stream-seconds 10]

1. Operations per second generated against the embedded reference server
   (which runs in a child process), with the default fault mix, against two
   baselines measured side by side, interleaved run by run: the same
   workload with the server in the clients' trio loop (the design it
   replaced), and the same clients (16 by default) sending plain GET /healthz to the
   same kind of server, the floor of what client and server can do at all.
   Goal: >= 2,000 operations/s (issue 31).
2. For split-lock, autocreate-after-delete and queued-proceed, with default
   settings and a fixed seed: whether the run finds the bug, and how long the
   workload plus the check took (goal: found, within 10 s); then how long
   shrinking the failure to a scenario took, how small it got, and whether
   the scenario failed on the variant and passed on the reference every time.
   The same for the four streaming variants, with half the chats streamed
   (``--stream-ratio 0.5``), in runs of ``--stream-seconds`` (10). For every
   variant: when, into the workload, the first operation that shows the bug
   had completed.
3. With ``--clean-ops N``, a long run against the clean reference server
   (seed 7, half the chats streamed), which must check as valid:
   ``--clean-ops 100000`` is the 100,000-operation goal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import trio

from harness.chaos.shrink import ShrinkSettings
from harness.chaos.workload import ChaosSettings, run_chaos
from harness.run.client import TargetClient
from refserver.child import serve_in_child
from refserver.server import ServerConfig


async def healthz_rate(clients: int, seconds: float) -> float:
    done = 0
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_in_child, ServerConfig(port=0))

        async def client() -> None:
            nonlocal done
            # The harness's own client, as chaos mode uses it.
            http = TargetClient(server.url, request_timeout=10.0)
            try:
                while True:
                    await http.send("h", "get", "GET", "/healthz")
                    done += 1
            finally:
                await http.aclose()

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as clients_nursery:
                for _ in range(clients):
                    clients_nursery.start_soon(client)
        nursery.cancel_scope.cancel()
    return done / seconds


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.0f} (min {min(values):.0f}, max {max(values):.0f})"


async def main(args: argparse.Namespace) -> int:
    settings = ChaosSettings(seed=args.seed, ops=args.ops)
    rates: list[float] = []
    in_loop_rates: list[float] = []
    baselines: list[float] = []
    clean_ok = True
    for _ in range(args.runs):
        baselines.append(await healthz_rate(settings.clients, 2.0))
        clean = await run_chaos(settings)
        rates.append(clean.ops_per_second)
        in_loop = await run_chaos(settings, embedded_in_child=False)
        in_loop_rates.append(in_loop.ops_per_second)
        clean_ok &= clean.result.verdict == "valid" and in_loop.result.verdict == "valid"
    print(
        f"clean reference, {args.runs} runs of {settings.ops} ops: ops/s {spread(rates)}, "
        f"every verdict valid: {clean_ok}"
    )
    print(f"the same with the server in the clients' trio loop: ops/s {spread(in_loop_rates)}")
    print(f"baseline, {settings.clients} clients on GET /healthz: requests/s {spread(baselines)}")
    rate_ok = statistics.median(rates) >= 2000
    print(f"goal >= 2000 ops/s (median): {'met' if rate_ok else 'NOT met'}")
    all_found = True
    streamed = replace(settings, ops=None, duration=args.stream_seconds, stream_ratio=0.5)
    for variant, variant_settings in [
        *((v, settings) for v in ("split-lock", "autocreate-after-delete", "queued-proceed")),
        *(
            (v, streamed)
            for v in (
                "commit-partial-stream",
                "delete-waits-for-stream",
                "commit-abandoned-stream",
                "prompt-tail-after-cut",
            )
        ),
    ]:
        started = time.perf_counter()
        report = await run_chaos(variant_settings, emulate=variant)
        wall = time.perf_counter() - started
        found = report.result.verdict == "invalid"
        kinds = sorted({f.kind for f in report.result.findings})
        all_found &= found and (wall <= 10 if variant_settings.duration is None else True)
        start = min((op.invoke for op in report.history), default=0.0)
        evidence = min(
            (max(o.complete or o.invoke for o in f.window) - start for f in report.result.findings),
            default=float("nan"),
        )
        print(
            f"{variant:<24} {'found' if found else 'MISSED'} in {wall:4.1f} s "
            f"(workload {report.elapsed:.1f} s, check {report.check_seconds:.2f} s; first "
            f"evidence {evidence:.1f} s in) {kinds}"
        )
        shrinking = await run_chaos(
            variant_settings, emulate=variant, shrink_settings=ShrinkSettings()
        )
        shrunk = shrinking.shrunk
        if shrunk is None:
            all_found = False
            print(f"{'':<24} NOT shrunk")
            continue
        print(
            f"{'':<24} shrunk in {shrunk.seconds:.1f} s ({shrunk.tests} replays): "
            f"{shrunk.operations_before} -> {shrunk.operations_after} operations, "
            f"{shrunk.steps} steps; fails on the variant {shrunk.target_failures}/"
            f"{shrunk.confirm_runs}, passes on the reference {shrunk.reference_passes}/"
            f"{shrunk.confirm_runs}"
        )
    long_ok = True
    if args.clean_ops:
        started = time.perf_counter()
        long = await run_chaos(ChaosSettings(seed=7, ops=args.clean_ops, stream_ratio=0.5))
        long_ok = long.result.verdict == "valid"
        print(
            f"clean reference, {len(long.history)} ops (seed 7, half the chats streamed): "
            f"{long.result.verdict}, "
            f"{long.result.sessions} sessions, workload {long.elapsed:.1f} s "
            f"({long.ops_per_second:.0f} ops/s), check {long.check_seconds:.2f} s, "
            f"wall {time.perf_counter() - started:.1f} s"
        )
    return 0 if clean_ok and rate_ok and all_found and long_ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clean-ops", type=int, default=0)
    parser.add_argument("--stream-seconds", type=float, default=10.0)
    sys.exit(trio.run(main, parser.parse_args()))
