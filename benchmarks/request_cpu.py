"""Server CPU per request: ``sessctl serve`` and the peer side by side, block by block.

    python benchmarks/request_cpu.py [--rounds 30] [--block 100] [--baseline-rev REV]

Where ``delete_bench.py`` times a request from the client, this measures what it
costs the server: every server runs at once (as in ``delete_bench.py``, each with
its own chaos upstream), and each round sends every server, in turn, a block of
``--block`` requests of one kind, one at a time on one kept-alive connection,
reading the server process's CPU time (``/proc/PID/task/*/schedstat``, in
nanoseconds) before and after the block. The kinds:

- ``healthz``: ``GET /healthz``, the HTTP path alone;
- ``turn``: a whole turn with an engine that answers at once (``POST /sessions``,
  one chat, ``DELETE``), divided by its three requests.

Reported per kind and server: the median over rounds of CPU microseconds per
request, its spread (min-max), the client's median latency, and the ratio to
``sessctl serve`` (above 1: that server spends more). Nothing is judged: the
figures say where per-request time goes, before the HTTP path is changed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import run_beside_baseline
from delete_bench import Server, servers
from scale_bench import marker

Kind = Callable[[httpx.AsyncClient], Awaitable[int]]
"""Sends one unit of a kind's work; returns how many requests that was."""


async def healthz(client: httpx.AsyncClient) -> int:
    (await client.get("/healthz")).raise_for_status()
    return 1


async def turn(client: httpx.AsyncClient) -> int:
    created = await client.post("/sessions")
    session_id = created.raise_for_status().json()["session_id"]
    body = {"model": "m", "messages": [{"role": "user", "content": marker("cpu")}]}
    chat = await client.post(f"/sessions/{session_id}/v1/chat/completions", json=body)
    chat.raise_for_status()
    (await client.delete(f"/sessions/{session_id}")).raise_for_status()
    return 3


KINDS: dict[str, Kind] = {"healthz": healthz, "turn": turn}


def cpu_ns(pid: int) -> int:
    """CPU time all the process's threads have run, in nanoseconds (schedstat's
    first field; /proc/PID/stat counts in clock ticks, too coarse for a block)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between the listing and the read
    return total


async def block(
    server: Server, client: httpx.AsyncClient, kind: Kind, size: int
) -> tuple[float, float]:
    """One block: the server's CPU microseconds per request, and the client's
    median milliseconds per request."""
    latencies = []
    requests = 0
    before = cpu_ns(server.pid)
    for _ in range(size):
        start = time.perf_counter()
        count = await kind(client)
        latencies.append((time.perf_counter() - start) * 1000 / count)
        requests += count
    used = cpu_ns(server.pid) - before
    return used / 1000 / requests, statistics.median(latencies)


async def main(args: argparse.Namespace, baseline: Path | None) -> int:
    with servers(baseline, f"sessctl serve at {args.baseline_rev}") as found:
        print("servers: " + ", ".join(f"{server.name} ({server.url})" for server in found))
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        clients = {
            server.name: httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60.0)
            for server in found
        }
        try:
            for name, kind in KINDS.items():
                for server in found:  # warm up: imports, caches, the connection
                    await block(server, clients[server.name], kind, args.block)
                cpu: dict[str, list[float]] = {server.name: [] for server in found}
                latency: dict[str, list[float]] = {server.name: [] for server in found}
                for _ in range(args.rounds):
                    for server in found:
                        used, took = await block(server, clients[server.name], kind, args.block)
                        cpu[server.name].append(used)
                        latency[server.name].append(took)
                reference = statistics.median(cpu["sessctl serve"])
                print(f"{name}: {args.rounds} rounds of {args.block}, server CPU per request")
                for server in found:
                    median = statistics.median(cpu[server.name])
                    print(
                        f"  {server.name:<28} {median:6.0f} us"
                        f" ({min(cpu[server.name]):.0f}-{max(cpu[server.name]):.0f})"
                        f"   client median {statistics.median(latency[server.name]):.3f} ms"
                        f"   x{median / reference:.2f}"
                    )
        finally:
            for client in clients.values():
                await client.aclose()
    return 0


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--baseline-rev", default=None)
    return run_beside_baseline(main, parser.parse_args())


if __name__ == "__main__":
    sys.exit(run())
