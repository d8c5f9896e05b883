"""Reference-server benchmark: DELETE preemption latency and proxy throughput.

    python benchmarks/refserver_bench.py [--trials 200] [--seconds 5] [--sessions 64]

Measured side by side in one run, each against its baseline:

1. DELETE latency while the session's turn is held at the upstream (upstream
   delay 30 s), against GET /healthz on the same server at the same moment.
   Goal: DELETE p99 within 3x of healthz p99, and under 20 ms. Then the same
   for a streamed turn: DELETE once the agent has the first chunk and the
   engine (the chaos upstream, scripted over HTTP) holds the rest.
2. Chat turns per second through the proxy at N concurrent sessions (zero-delay
   upstream), against calling the same upstream directly, in alternating
   phases. Goal: proxy throughput at least half of the direct upstream's.
   Measured twice, because the ratio depends on the floor: against the lean
   chaos upstream (raw h11 on trio sockets, the cheapest possible engine) and
   against the embedded default's fake upstream (hypercorn + Starlette).
   The "direct" rows are also the load generator's own ceiling: it spends
   about as much CPU per turn as a server does, on a machine of two cores.
   Each phase also reports the server's CPU per proxied turn (from
   /proc/PID/stat), the figure that decides how many turns two cores carry.

Every server runs in its own process (started with the installed ``sessctl``),
so the load generator does not share a trio loop with what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio
from common import percentile, sessctl_process


@dataclass(frozen=True)
class Summary:
    name: str
    samples_ms: list[float]

    def row(self) -> str:
        s = self.samples_ms
        return (
            f"{self.name:<32} n={len(s):<5} p50={statistics.median(s):7.2f} ms  "
            f"p90={percentile(s, 90):7.2f} ms  p99={percentile(s, 99):7.2f} ms  "
            f"max={max(s):7.2f} ms"
        )


async def time_delete_beside_healthz(
    client: httpx.AsyncClient, session_id: str, deletes: list[float], healthz: list[float]
) -> None:
    """One GET /healthz, then the DELETE, each timed in ms, on the same server."""
    start = trio.current_time()
    await client.get("/healthz")
    healthz.append((trio.current_time() - start) * 1000)
    start = trio.current_time()
    response = await client.delete(f"/sessions/{session_id}")
    deletes.append((trio.current_time() - start) * 1000)
    assert response.status_code == 204, response.text


async def delete_latency(trials: int) -> tuple[Summary, Summary]:
    with sessctl_process(
        "serve", "--port", "0", "--upstream-delay", "30", url_prefix="sessctl reference server on"
    ) as child:
        url = child.url
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            deletes: list[float] = []
            healthz: list[float] = []
            for _ in range(trials):
                session_id = (await client.post("/sessions")).json()["session_id"]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda sid=session_id: client.post(
                            f"/sessions/{sid}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hold me"}]},
                        )
                    )
                    # The turn is at the (30 s) upstream once GET says it is in flight;
                    # the server is another process, so there is no event to wait on.
                    while not (await client.get(f"/sessions/{session_id}")).json()["in_flight"]:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                    await time_delete_beside_healthz(client, session_id, deletes, healthz)
            return Summary("DELETE, turn held 30 s", deletes), Summary(
                "GET /healthz (baseline)", healthz
            )


async def delete_mid_stream_latency(trials: int) -> tuple[Summary, Summary]:
    """DELETE while a streamed turn is mid-stream: the agent has read the first
    chunk, the engine holds the rest. Each stream must end with session_deleted."""
    with (
        upstream_process("chaos") as upstream,
        sessctl_process(
            "serve", "--port", "0", "--upstream", upstream, url_prefix="sessctl reference server on"
        ) as served,
    ):
        control = upstream.removesuffix("/v1")
        async with (
            httpx.AsyncClient(base_url=served.url, timeout=60) as client,
            httpx.AsyncClient(base_url=control, timeout=60) as upstream_control,
        ):
            deletes: list[float] = []
            healthz: list[float] = []
            for trial in range(trials):
                tag = f"bench.{trial}"
                script = {"script": [{"chunks": 4, "hold_after": 1}]}
                await upstream_control.post(f"/_sessctl/steps/{tag}", json=script)
                session_id = (await client.post("/sessions")).json()["session_id"]
                body = {
                    "messages": [{"role": "user", "content": f"hold me [[sessctl:{tag}]]"}],
                    "stream": True,
                }
                async with client.stream(
                    "POST", f"/sessions/{session_id}/v1/chat/completions", json=body
                ) as stream:
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: "):
                            break  # the first chunk: the engine now holds the rest
                    await time_delete_beside_healthz(client, session_id, deletes, healthz)
                    rest = [line async for line in lines if line.startswith("data: ")]
                    assert "session_deleted" in rest[-1], rest
                await upstream_control.post(f"/_sessctl/steps/{tag}/release")
            return Summary("DELETE, stream held at chunk 1", deletes), Summary(
                "GET /healthz (baseline)", healthz
            )


@dataclass(frozen=True)
class Throughput:
    name: str
    turns: int
    seconds: float
    latencies_ms: list[float]
    server_cpu_s: float = 0.0
    """CPU the session server spent in the timed window (0 when it was bypassed)."""

    @property
    def per_second(self) -> float:
        return self.turns / self.seconds

    def row(self) -> str:
        s = self.latencies_ms
        cpu = f"  server CPU {1e6 * self.server_cpu_s / self.turns:5.0f} us/turn" * bool(
            self.server_cpu_s
        )
        return (
            f"{self.name:<28} {self.per_second:8.0f} turns/s  "
            f"p50={statistics.median(s):6.2f} ms  p99={percentile(s, 99):6.2f} ms{cpu}"
        )


def cpu_seconds(pid: int) -> float:
    """User and system CPU of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    base_url: str,
    name: str,
    sessions: int,
    seconds: float,
    *,
    direct_url: str | None,
    server_pid: int | None = None,
) -> Throughput:
    latencies: list[float] = []
    turns = 0

    async def agent(client: httpx.AsyncClient, index: int) -> None:
        nonlocal turns
        while True:
            session_id = None
            if direct_url is None:
                session_id = (await client.post("/sessions")).json()["session_id"]
            messages: list[dict[str, object]] = []
            for turn in range(8):  # short trajectories, like real agent rollouts
                messages = [*messages, {"role": "user", "content": f"worker {index} turn {turn}"}]
                url = (
                    f"{direct_url}/chat/completions"
                    if direct_url is not None
                    else f"/sessions/{session_id}/v1/chat/completions"
                )
                start = trio.current_time()
                response = await client.post(url, json={"model": "m", "messages": messages})
                latencies.append((trio.current_time() - start) * 1000)
                assert response.status_code == 200, response.text
                turns += 1
                messages.append(response.json()["choices"][0]["message"])
            if session_id is not None:
                await client.delete(f"/sessions/{session_id}")

    # One client per simulated agent, as in a real rollout fleet: a single
    # shared httpx pool at this concurrency would measure itself rather than
    # the servers (the pool comparison below shows how much). They are built
    # before the clock starts: each costs about 23 ms (its TLS context), which
    # at 1,000 agents would eat the whole window.
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=base_url, timeout=60))
            for _ in range(sessions)
        ]
        cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
        start = trio.current_time()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for index, client in enumerate(clients):
                    nursery.start_soon(agent, client, index)
        elapsed = trio.current_time() - start
        cpu = cpu_seconds(server_pid) - cpu_before if server_pid else 0.0
    return Throughput(name, turns, elapsed, latencies, cpu)


FAKE_UPSTREAM = (
    "import trio, functools, sys\n"
    "from refserver.fake_upstream import create_fake_upstream_app\n"
    "from refserver.server import serve_asgi\n"
    "async def main():\n"
    "    async with trio.open_nursery() as n:\n"
    "        app = create_fake_upstream_app()\n"
    "        url = await n.start(functools.partial(serve_asgi, app, '127.0.0.1', 0))\n"
    "        print('point a session server at', url + '/v1', flush=True)\n"
    "trio.run(main)\n"
)
"""The embedded default's fake upstream (hypercorn + Starlette), in a process of its own."""


@contextmanager
def upstream_process(kind: str) -> Iterator[str]:
    if kind == "chaos":
        with sessctl_process(
            "upstream", "--listen", "127.0.0.1:0", url_prefix="chaos upstream"
        ) as child:
            yield child.url
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_UPSTREAM], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        yield proc.stdout.readline().rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def throughput(
    kind: str, sessions: int, seconds: float, rounds: int
) -> tuple[Throughput, Throughput]:
    with (
        upstream_process(kind) as upstream,
        sessctl_process(
            "serve", "--port", "0", "--upstream", upstream, url_prefix="sessctl reference server on"
        ) as served,
    ):
        return await side_by_side(
            partial(load, served.url, f"direct to {kind} upstream", direct_url=upstream),
            partial(
                load,
                served.url,
                f"proxy -> {kind} upstream",
                direct_url=None,
                server_pid=served.pid,
            ),
            sessions,
            seconds,
            rounds,
        )


async def side_by_side(
    first: Callable[[int, float], Awaitable[Throughput]],
    second: Callable[[int, float], Awaitable[Throughput]],
    sessions: int,
    seconds: float,
    rounds: int,
) -> tuple[Throughput, Throughput]:
    """Warm both up for a second, then run them in alternate rounds, so drift hits both alike."""
    await first(sessions, 1.0)
    await second(sessions, 1.0)
    first_runs: list[Throughput] = []
    second_runs: list[Throughput] = []
    for _ in range(rounds):
        first_runs.append(await first(sessions, seconds))
        second_runs.append(await second(sessions, seconds))
    return merge(first_runs), merge(second_runs)


def merge(runs: list[Throughput]) -> Throughput:
    return Throughput(
        runs[0].name,
        sum(r.turns for r in runs),
        sum(r.seconds for r in runs),
        [x for r in runs for x in r.latencies_ms],
        sum(r.server_cpu_s for r in runs),
    )


async def main(args: argparse.Namespace) -> int:
    print(
        f"sessctl reference-server benchmark ({args.trials} DELETE trials, "
        f"{args.sessions} sessions x {args.rounds} rounds of {args.seconds:g} s)"
    )
    delete_ok = True
    for measure in (delete_latency, delete_mid_stream_latency):
        delete, healthz = await measure(args.trials)
        print(delete.row())
        print(healthz.row())
        p99_ratio = percentile(delete.samples_ms, 99) / percentile(healthz.samples_ms, 99)
        met = p99_ratio <= 3 and percentile(delete.samples_ms, 99) < 20
        delete_ok = delete_ok and met
        print(
            f"DELETE p99 / healthz p99 = {p99_ratio:.2f}  (goal <= 3 and p99 < 20 ms: "
            f"{'met' if met else 'NOT met'})"
        )
    ratios: list[float] = []
    for kind in ("chaos", "fake"):
        direct, proxied = await throughput(kind, args.sessions, args.seconds, args.rounds)
        print(direct.row())
        print(proxied.row())
        ratios.append(proxied.per_second / direct.per_second)
        verdict = "met" if ratios[-1] >= 0.5 else "NOT met"
        print(f"proxy / direct throughput = {ratios[-1]:.2f}  (goal >= 0.5: {verdict})")
    return 0 if delete_ok and min(ratios) >= 0.5 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=64)
    sys.exit(trio.run(main, parser.parse_args()))
