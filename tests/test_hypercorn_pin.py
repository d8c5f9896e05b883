"""What ``refserver/transport/hypercorn_compat.py`` takes from hypercorn's internals is still there.

It wraps private methods of hypercorn 0.18 and copies its connection task's
``run``; ``pyproject.toml`` pins hypercorn to the releases it was written
against. When a release renames or reshapes one of them, this test names it,
so the upgrade fails here and not in ``sessctl serve`` on a user's machine.
"""

from __future__ import annotations

import inspect
import os
from importlib.metadata import version
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio import task_group, tcp_server
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer

from .conftest import HANG_GUARD, TaskSteps

WRAPPED = [
    # (where, what, the parameters hypercorn_compat relies on)
    (Config, "response_headers", ["self", "protocol"]),
    (H11Protocol, "_send_error_response", ["self", "status_code"]),
    (H11Protocol, "_send_h11_event", ["self", "event"]),
    (HTTPStream, "handle", ["self", "event"]),
    (TCPServer, "__init__", ["self", "app", "config", "context", "state", "stream"]),
    (TCPServer, "run", ["self"]),
    (TCPServer, "_read_data", ["self"]),
    (TCPServer, "_close", ["self"]),
    (TCPServer, "_initiate_server_close", ["self"]),
    (TCPServer, "protocol_send", ["self", "event"]),
    (TCPServer, "_idle_timeout", ["self"]),
    (TaskGroup, "spawn_app", ["self", "app", "config", "scope", "send"]),
    (
        task_group,
        "_handle",
        ["app", "config", "scope", "receive", "send", "sync_spawn", "call_soon"],
    ),
    (
        ProtocolWrapper,
        "__init__",
        [
            "self",
            "app",
            "config",
            "context",
            "task_group",
            "state",
            "ssl",
            "client",
            "server",
            "send",
            "alpn_protocol",
        ],
    ),
]


@pytest.mark.parametrize(
    ("owner", "name", "parameters"),
    WRAPPED,
    ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in WRAPPED],
)
def test_each_internal_hypercorn_compat_wraps_is_there_as_it_was(
    owner: object, name: str, parameters: list[str]
) -> None:
    where = f"hypercorn {version('hypercorn')}: {getattr(owner, '__name__', owner)}.{name}"
    member = getattr(owner, name, None)
    assert member is not None, f"{where} is gone; refserver/transport/hypercorn_compat.py wraps it"
    found = list(inspect.signature(member).parameters)
    assert found == parameters, (
        f"{where} now takes {found}, not {parameters}; "
        "update refserver/transport/hypercorn_compat.py"
    )


def test_the_constant_the_connection_task_reads_with_is_there() -> None:
    assert isinstance(getattr(tcp_server, "MAX_RECV", None), int), (
        "hypercorn.trio.tcp_server.MAX_RECV is gone; "
        "refserver/transport/hypercorn_compat.py reads with it"
    )


def test_the_installed_release_is_one_the_pin_admits() -> None:
    major, minor = (int(part) for part in version("hypercorn").split(".")[:2])
    assert (major, minor) == (0, 18), (
        f"hypercorn {version('hypercorn')} is installed; pyproject.toml pins >=0.18,<0.19, "
        "the releases refserver/transport/hypercorn_compat.py is written against"
    )


def test_the_lean_config_sends_one_date_and_hypercorns_other_headers() -> None:
    from email.utils import parsedate_to_datetime

    from refserver.transport.hypercorn_compat import LeanConfig

    headers = LeanConfig().response_headers("h11")
    dates = [value for name, value in headers if name == b"date"]
    assert len(dates) == 1, headers  # hypercorn's own would make two
    assert parsedate_to_datetime(dates[0].decode()).tzinfo is not None  # an HTTP-date, in GMT
    assert (b"server", b"hypercorn-h11") in headers


async def _lifespan(receive: Any, send: Any) -> None:
    """A test app's lifespan: each message acknowledged until shutdown, which ends it."""
    while (message := await receive())["type"] != "lifespan.shutdown":
        await send({"type": message["type"] + ".complete"})


async def test_an_answer_leaves_before_a_task_it_made_ready_runs(nursery: trio.Nursery) -> None:
    # Item 11: hypercorn takes its send lock with trio's Lock.acquire, which
    # yields even when the lock is free. A DELETE's 204 then waited behind the
    # turn it had just preempted (made ready by the cancel). serve's connections
    # write first: the task made ready finds the answer already on the wire.
    from refserver.transport.hypercorn_compat import serve

    made_ready = trio.Event()
    seen: list[bytes] = []
    client = trio.socket.socket()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        made_ready.set()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def made_ready_task() -> None:
        await made_ready.wait()
        try:  # what the client has received by now, without waiting for more
            seen.append(os.read(client.fileno(), 65536))
        except BlockingIOError:
            seen.append(b"")

    config = Config()
    config.bind = ["127.0.0.1:0"]
    binds = await nursery.start(serve, app, config)
    nursery.start_soon(made_ready_task)
    await client.connect(("127.0.0.1", int(binds[0].rsplit(":", 1)[1])))
    await client.send(b"DELETE /x HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(HANG_GUARD):
        await made_ready.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert len(seen) == 1
    assert seen[0].startswith(b"HTTP/1.1 204"), (
        f"the task the app made ready ran before the answer was written (it saw {seen}): "
        "hypercorn_compat item 11 no longer holds"
    )
    client.close()
    nursery.cancel_scope.cancel()


async def _answer(client: trio.socket.SocketType) -> None:
    received = b""
    while not received.endswith(b"ok"):
        received += await client.recv(65536)


async def test_a_request_answered_at_once_runs_each_server_task_once(nursery: trio.Nursery) -> None:
    # Item 12: trio's recv, send and memory channels yield after the fact even
    # when they did not wait, and a request answered at once took five
    # scheduler rounds: three steps of the connection task, three of the app's.
    # Now the connection task runs once per request (woken by the bytes, back
    # to waiting for the next ones) and the app once (its answer written).
    from refserver.transport.hypercorn_compat import serve

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await receive()  # the (empty) body, queued before the app ran
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config()
    config.bind = ["127.0.0.1:0"]
    binds = await nursery.start(serve, app, config)
    client = trio.socket.socket()
    await client.connect(("127.0.0.1", int(binds[0].rsplit(":", 1)[1])))
    requests = 20
    steps = TaskSteps("_run_handler", "task_group._handle")
    with trio.fail_after(HANG_GUARD):
        await client.send(b"GET /warm-up HTTP/1.1\r\nhost: x\r\n\r\n")  # the first connects
        await _answer(client)
        trio.lowlevel.add_instrument(steps)
        try:
            for _ in range(requests):
                await client.send(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
                await _answer(client)
                await trio.testing.wait_all_tasks_blocked()  # the app's task has ended
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert steps.steps == {"_run_handler": requests, "task_group._handle": requests}, (
        f"scheduler steps for {requests} requests: {steps.steps} "
        "(hypercorn_compat item 12 no longer holds)"
    )
    client.close()
    nursery.cancel_scope.cancel()
