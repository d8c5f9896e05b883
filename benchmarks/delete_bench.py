"""DELETE of a held turn: ``sessctl serve`` and the peer side by side, sample by sample.

    python benchmarks/delete_bench.py [--levels 1,100,1000] [--samples 300]
                                      [--baseline-rev REV]

The scale benchmark (``scale_bench.py``) runs one server at a time, so a row
against the peer compares two different minutes of this machine, and a p99 of
200 samples moves by more than the difference looked for. Here every server
runs at once, each with its own chaos upstream and the same number of turns
held at it; then one sample (the scale benchmark's: a chat held on a fresh
session, once the upstream has received it, GET /healthz, then that session's
DELETE, timed from this process)
is taken of each server in turn, ``--samples`` rounds. Whatever the machine
does during a round, every server meets it.

The servers: ``sessctl serve`` (this checkout), the peer
(``benchmarks/peer_server.py``: Starlette on uvicorn, httpx to the engine;
``pip install -e '.[bench]'``) and, with ``--baseline-rev REV``, ``sessctl
serve`` at git revision REV (a temporary worktree). Reported per level and
server: DELETE and healthz p50 / p99, its memory per held turn (RSS over the
idle server), and each DELETE figure as a ratio to ``sessctl serve``'s (above
1: that server is slower). The goal (issue 31):
the peer's ratio above 1 at every level.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Child, percentile, run_beside_baseline, sessctl_process
from scale_bench import (
    AGENTS_PER_CLIENT,
    AT_LEVEL_TAG,
    PEER,
    RAMP_LIMIT,
    SAMPLE_TAG,
    TAG,
    Level,
    Samples,
    rss_mb,
)


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    upstream: str
    """The chaos upstream's root (its ``/_sessctl`` control routes)."""
    pid: int
    idle_rss_mb: float


@contextlib.contextmanager
def servers(baseline: Path | None, baseline_name: str) -> Iterator[list[Server]]:
    launched: list[tuple[str, tuple[str, ...], str, Path | None]] = [
        ("sessctl serve", ("-m", "sessctl"), "sessctl reference server on", None),
        ("peer", (PEER,), "peer session server on", None),
    ]
    if baseline is not None:
        launched.append((baseline_name, ("-m", "sessctl"), "sessctl reference server on", baseline))
    with contextlib.ExitStack() as stack:
        found = []
        for name, launcher, announced, code in launched:
            up: Child = stack.enter_context(
                sessctl_process("upstream", "--listen", "127.0.0.1:0", url_prefix="chaos upstream")
            )
            served: Child = stack.enter_context(
                sessctl_process(
                    "serve", "--port", "0", "--upstream", up.url,
                    url_prefix=announced, launcher=launcher, code=code,
                )
            )  # fmt: skip
            found.append(
                Server(name, served.url, up.url.removesuffix("/v1"), served.pid, rss_mb(served.pid))
            )
        yield found


async def bring_to(run: Level, nursery: trio.Nursery, level: int) -> list[str]:
    """``level`` chats held at the server's upstream, each on a session of its own."""
    for tag in (TAG, SAMPLE_TAG, run.at_level_tag):
        await run.client.post(f"{run.upstream}/_sessctl/steps/{tag}", json={"script": ["hold"]})
    already = await run.received()
    sessions = [await run.create() for _ in range(level)]
    for session_id in sessions:
        nursery.start_soon(run.held_chat, session_id)
    with trio.fail_after(RAMP_LIMIT):
        # Polling another process: there is no event to wait on.
        while await run.received() - already < level:  # noqa: ASYNC110
            await trio.sleep(0.2)
    return sessions


async def compare_at(
    found: list[Server], level: int, rounds: int
) -> tuple[dict[str, Samples], dict[str, float]]:
    """Each server's samples at ``level`` held turns, and its KB per held turn (RSS
    over the idle server, read once every server holds the level)."""
    limits = httpx.Limits(max_connections=AGENTS_PER_CLIENT + 8, max_keepalive_connections=64)
    timeout = httpx.Timeout(600.0, connect=60.0)
    count = 1 + (level + rounds) // AGENTS_PER_CLIENT
    samples = {server.name: Samples() for server in found}
    async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
        runs: dict[str, Level] = {}
        held: dict[str, list[str]] = {}
        for server in found:

            async def client(url: str = server.url) -> httpx.AsyncClient:
                made = httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout)
                return await stack.enter_async_context(made)

            run = Level(
                await client(),
                [await client() for _ in range(count)],
                server.upstream,
                AT_LEVEL_TAG.format(level=level),
            )
            runs[server.name] = run
            held[server.name] = await bring_to(run, nursery, level)
        memory = {
            server.name: 1024 * (rss_mb(server.pid) - server.idle_rss_mb) / max(1, level)
            for server in found
        }
        for _ in range(rounds):
            for server in found:
                await runs[server.name].sample(nursery, samples[server.name])
        for server in found:
            run = runs[server.name]
            for session_id in held[server.name] + run.extras:
                await run.client.delete(f"/sessions/{session_id}")
            lost = sum(1 for session_id in held[server.name] + run.extras if run.lost(session_id))
            if lost:
                print(f"  {server.name}: {lost} held chats lost: {run.examples}")
    return samples, memory


def figures(samples: Samples) -> tuple[float, float, float, float]:
    return (
        statistics.median(samples.deletes),
        percentile(samples.deletes, 99),
        statistics.median(samples.healthz),
        percentile(samples.healthz, 99),
    )


async def main(args: argparse.Namespace, baseline: Path | None) -> int:
    levels = [int(x) for x in args.levels.split(",")]
    baseline_name = f"sessctl serve at {args.baseline_rev}"
    ahead = True
    with servers(baseline, baseline_name) as found:
        print("servers: " + ", ".join(f"{server.name} ({server.url})" for server in found))
        for level in levels:
            started = time.perf_counter()
            samples, memory = await compare_at(found, level, args.samples)
            reference = figures(samples["sessctl serve"])
            print(
                f"{level} held on each, {args.samples} samples each, "
                f"{time.perf_counter() - started:.0f} s:"
            )
            for server in found:
                delete_p50, delete_p99, healthz_p50, healthz_p99 = figures(samples[server.name])
                ratio = (
                    ""
                    if server.name == "sessctl serve"
                    else f"  DELETE x{delete_p50 / reference[0]:.2f} (p50) "
                    f"x{delete_p99 / reference[1]:.2f} (p99)"
                )
                print(
                    f"  {server.name:<28} DELETE p50 {delete_p50:5.2f} ms p99 {delete_p99:5.2f} ms"
                    f"   healthz p50 {healthz_p50:5.2f} ms p99 {healthz_p99:5.2f} ms"
                    f"   {memory[server.name]:4.0f} KB a held turn{ratio}"
                )
                if server.name == "peer":
                    ahead &= delete_p99 > reference[1]
    print("sessctl serve ahead of the peer at every level" if ahead else "the peer is ahead")
    return 0 if ahead else 1


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,100,1000")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--baseline-rev", default=None)
    return run_beside_baseline(main, parser.parse_args())


if __name__ == "__main__":
    sys.exit(run())
