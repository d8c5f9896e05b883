"""Chaos-mode benchmark: generation rate, and time to find known bugs.

    python benchmarks/chaos_bench.py [--ops 2000] [--seed 1] [--clean-ops N]

1. Operations per second generated against the in-process reference server,
   with the default fault mix, against a baseline measured side by side: the
   same eight clients sending plain GET /healthz, the floor of what client and
   server can do at all. Goal: >= 1,000 operations/s.
2. For split-lock, autocreate-after-delete and queued-proceed, with default
   settings and a fixed seed: whether the run finds the bug, and how long the
   workload plus the check took. Goal: found, within 10 s.
3. With ``--clean-ops N``, a long run against the clean reference server
   (seed 7), which must check as valid: ``--clean-ops 100000`` is the
   issue's 100,000-operation goal.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx
import trio

from harness.chaos import ChaosSettings, run_chaos
from refserver.server import ServerConfig, serve


async def healthz_rate(clients: int, seconds: float) -> float:
    done = 0
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, ServerConfig(port=0))

        async def client() -> None:
            nonlocal done
            async with httpx.AsyncClient(base_url=server.url) as http:
                while True:
                    await http.get("/healthz")
                    done += 1

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as clients_nursery:
                for _ in range(clients):
                    clients_nursery.start_soon(client)
        nursery.cancel_scope.cancel()
    return done / seconds


async def main(args: argparse.Namespace) -> int:
    settings = ChaosSettings(seed=args.seed, ops=args.ops)
    baseline = await healthz_rate(settings.clients, 3.0)
    clean = await run_chaos(settings)
    print(
        f"clean reference: {len(clean.history)} ops, {clean.ops_per_second:.0f} ops/s, "
        f"verdict {clean.result.verdict}"
    )
    print(f"baseline: {settings.clients} clients on GET /healthz: {baseline:.0f} requests/s")
    rate_ok = clean.ops_per_second >= 1000
    print(f"goal >= 1000 ops/s: {'met' if rate_ok else 'NOT met'}")
    all_found = True
    for variant in ("split-lock", "autocreate-after-delete", "queued-proceed"):
        started = time.perf_counter()
        report = await run_chaos(settings, emulate=variant)
        wall = time.perf_counter() - started
        found = report.result.verdict == "invalid"
        kinds = sorted({f.kind for f in report.result.findings})
        all_found &= found and wall <= 10
        print(
            f"{variant:<24} {'found' if found else 'MISSED'} in {wall:4.1f} s "
            f"(workload {report.elapsed:.1f} s, check {report.check_seconds:.2f} s) {kinds}"
        )
    long_ok = True
    if args.clean_ops:
        started = time.perf_counter()
        long = await run_chaos(ChaosSettings(seed=7, ops=args.clean_ops))
        long_ok = long.result.verdict == "valid"
        print(
            f"clean reference, {len(long.history)} ops (seed 7): {long.result.verdict}, "
            f"{long.result.sessions} sessions, workload {long.elapsed:.1f} s "
            f"({long.ops_per_second:.0f} ops/s), check {long.check_seconds:.2f} s, "
            f"wall {time.perf_counter() - started:.1f} s"
        )
    return 0 if clean.result.verdict == "valid" and all_found and long_ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clean-ops", type=int, default=0)
    sys.exit(trio.run(main, parser.parse_args()))
