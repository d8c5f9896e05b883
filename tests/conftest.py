"""Fixtures: a chaos upstream and a reference server, both on 127.0.0.1:0 in the test's nursery."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio

from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import Behaviour, marker, parse_behaviour
from refserver.server import RunningServer, ServerConfig, serve
from refserver.upstream import RetryPolicy

# Backoff 0: retries are exercised by count, and the suite stays fast.
FAST_RETRY = RetryPolicy(attempts=3, backoff_initial=0.0)

# The server's own upstream deadline must never be what ends a test: a turn
# that is cancelled only because it timed out would pass the preemption and
# disconnect tests by luck.
NO_UPSTREAM_DEADLINE = 3600.0

# A hang guard, not a timing assertion: a broken server makes a test fail
# here instead of hanging the suite.
HANG_GUARD = 10.0


class TaskSteps(trio.abc.Instrument):
    """How many steps trio ran of the tasks whose name contains each key: how many
    scheduler rounds they took (add with ``trio.lowlevel.add_instrument``)."""

    def __init__(self, *keys: str) -> None:
        self.steps = dict.fromkeys(keys, 0)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        for key in self.steps:
            if key in task.name:
                self.steps[key] += 1


def free_port() -> int:
    """A loopback port free right now, for a chaos upstream that a server under test
    must be told about before it starts (as a user's server would be).

    Drawn below the kernel's ephemeral range: a port the kernel handed out (bind
    to port 0) is free again once the probe closes, and under ``-n 4`` another
    test's outgoing connection took one as its source port before the upstream
    could listen on it ("Address already in use", once in a CI run). Below the
    range only another ``free_port`` can take it."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port between 10000 and {low}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768  # Linux's default
    return max(low, 10_001)


async def sessctl_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``sessctl ARGS`` in a child process, as a user runs it: exit code, and output.
    ``env``: variables set for it (an admin key, say), beside a plain terminal's."""
    done = await trio.run_process(
        [sys.executable, "-m", "sessctl", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200", **(env or {})},
    )
    return done.returncode, done.stdout.decode() + done.stderr.decode()


def start_sessctl_serve(*args: str, **popen: Any) -> tuple[subprocess.Popen[str], str]:
    """``sessctl serve --port 0 ARGS`` in a child process, and the URL it announces."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sessctl", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        **popen,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("sessctl reference server on "):
            return process, line.split(" on ", 1)[1].strip()
    process.kill()
    raise AssertionError("sessctl serve did not announce its URL")


class Api:
    """The trainer's and the agent's calls, spelled out once for every test."""

    def __init__(self, client: httpx.AsyncClient, chaos: ChaosUpstream) -> None:
        self.client = client
        self.chaos = chaos

    async def create(self) -> str:
        response = await self.client.post("/sessions")
        assert response.status_code == 201, response.text
        session_id: str = response.json()["session_id"]
        return session_id

    async def chat(self, session_id: str, messages: list[dict[str, Any]]) -> httpx.Response:
        return await self.client.post(
            f"/sessions/{session_id}/v1/chat/completions",
            json={"model": "test", "messages": messages},
        )

    async def get(self, session_id: str) -> httpx.Response:
        return await self.client.get(f"/sessions/{session_id}")

    async def delete(self, session_id: str) -> httpx.Response:
        return await self.client.delete(f"/sessions/{session_id}")

    def script(self, tag: str, *specs: object) -> None:
        self.chaos.script(tag, [parse_behaviour(spec) for spec in specs])


def user(tag: str, text: str = "hello") -> dict[str, Any]:
    """A user message carrying the chaos upstream's marker for ``tag``."""
    return {"role": "user", "content": f"{text} {marker(tag)}"}


@pytest.fixture
async def chaos(nursery: trio.Nursery) -> ChaosUpstream:
    upstream = ChaosUpstream()
    await nursery.start(upstream.serve)
    return upstream


ServerStarter = Callable[..., Any]


@pytest.fixture
def start_server(nursery: trio.Nursery, chaos: ChaosUpstream) -> ServerStarter:
    async def start(**overrides: Any) -> RunningServer:
        fields: dict[str, Any] = {
            "port": 0,
            "upstream_url": chaos.url,
            "retry": FAST_RETRY,
            "upstream_timeout": NO_UPSTREAM_DEADLINE,
        }
        fields.update(overrides)
        running: RunningServer = await nursery.start(serve, ServerConfig(**fields))
        return running

    return start


@pytest.fixture
async def server(start_server: ServerStarter) -> RunningServer:
    running: RunningServer = await start_server()
    return running


@pytest.fixture
async def api(server: RunningServer, chaos: ChaosUpstream) -> AsyncIterator[Api]:
    async with httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD) as client:
        yield Api(client, chaos)


__all__ = ["Api", "Behaviour", "user"]
