"""The harness's HTTP/1.1 transport (``harness/run/transport.py``) through ``TargetClient``.

The peer is the raw HTTP/1.1 server of ``test_engine_http``: each test decides
what the server does with its connection. What is asserted is what a report
would say: the same observation, and the same names for the same failures, as
with httpx's own transport, and no request ever queued behind the harness's pool.
"""

from __future__ import annotations

import json
from functools import partial

import h11
import trio
import trio.testing

from harness.results import Observation
from harness.run.client import StreamProgress, TargetClient

from .conftest import HANG_GUARD
from .test_engine_http import Peer, json_answer, send


async def test_whole_answers_reuse_one_connection_and_read_as_httpx_sent_them(
    nursery: trio.Nursery,
) -> None:
    peer = Peer(json_answer(b'{"id": "s1"}'))
    url = (await nursery.start(peer.serve)).removesuffix("/v1")
    client = TargetClient(url + "/base/", request_timeout=HANG_GUARD)
    for body in ({"n": 1}, {"text": "é"}, None):
        observation = await client.send("s", "create", "POST", "/sessions", json_body=body)
        assert observation.status == 200
        assert observation.body == {"id": "s1"}
        assert observation.sent is not None
        assert observation.sent >= observation.started
    got = await client.send("g", "get", "GET", "/sessions/a b/../c")
    assert got.status == 200
    assert peer.connections == 1  # kept alive between requests
    # The JSON encoding httpx uses (compact, UTF-8), and the length of what was sent.
    assert peer.bodies == [b'{"n":1}', '{"text":"é"}'.encode(), b"", b""]
    heads = [(head.target, list(head.headers)) for head in peer.heads]
    targets = [target for target, _ in heads]
    # Under the base URL's path; an odd path quoted and normalised as httpx does.
    assert targets == [b"/base/sessions"] * 3 + [b"/base/sessions/c"]
    first = dict(heads[0][1])
    assert first[b"content-type"] == b"application/json"
    assert first[b"content-length"] == b"7"
    assert first[b"accept-encoding"] == b"identity"  # bodies judged as the server sent them
    assert dict(heads[2][1])[b"content-length"] == b"0"  # a POST without a body
    await client.aclose()
    nursery.cancel_scope.cancel()


async def test_requests_in_flight_never_wait_for_a_connection(nursery: trio.Nursery) -> None:
    # Eight requests the server holds at once: each has its own connection at
    # once. One queued behind the harness's pool would look like a server that waits.
    arrived = 0
    all_arrived = trio.Event()

    async def hold_until_all(
        stream: trio.SocketStream, connection: h11.Connection, number: int
    ) -> bool:
        nonlocal arrived
        arrived += 1
        if arrived == 8:
            all_arrived.set()
        await all_arrived.wait()
        return await json_answer(b"{}")(stream, connection, number)

    peer = Peer(hold_until_all)
    url = await nursery.start(peer.serve)
    client = TargetClient(url, request_timeout=HANG_GUARD)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as requests:
            for _ in range(8):
                requests.start_soon(client.send, "c", "chat", "POST", "/x")
    assert peer.connections == 8
    await client.aclose()
    nursery.cancel_scope.cancel()


class BigBodyServer:
    """A raw HTTP/1.1 server answering ``{}`` to every request, but for POST /big: on
    connection number ``hold_on`` its body is left unread until ``release`` is set
    (``held`` says its head arrived), and on ``drop_on`` it is read whole and the
    connection dropped unanswered."""

    def __init__(self, *, hold_on: int, drop_on: int | None = None) -> None:
        self.hold_on = hold_on
        self.drop_on = drop_on
        self.held = trio.Event()
        self.release = trio.Event()
        self._connections = 0

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(partial(trio.serve_listeners, self._serve, listeners))
        return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def _serve(self, stream: trio.SocketStream) -> None:
        self._connections += 1
        number = self._connections
        connection = h11.Connection(h11.SERVER)
        target = b""
        async with stream:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    connection.receive_data(data)
                elif isinstance(event, h11.Request):
                    target = event.target
                    if target == b"/big" and number == self.hold_on:
                        self.held.set()
                        await self.release.wait()  # its body stays unread: the client's write waits
                elif isinstance(event, h11.EndOfMessage):
                    if target == b"/big" and number == self.drop_on:
                        return  # read whole, then dropped unanswered
                    await json_answer(b"{}")(stream, connection, 1)
                    connection.start_next_cycle()


BIG = b"x" * (32 << 20)
"""More than loopback's socket buffers hold: a write of it waits for the reader."""


async def assert_settle_waits_for(
    nursery: trio.Nursery, client: TargetClient, server: BigBodyServer, what: str
) -> None:
    """``settle`` does not return while ``server`` holds a body unread, and does once
    it reads it."""
    settled = trio.Event()

    async def settle() -> None:
        await client.settle()
        settled.set()

    nursery.start_soon(settle)
    for _ in range(5):  # its round trips, had it not waited, would be done by now
        await trio.testing.wait_all_tasks_blocked()
    assert not settled.is_set(), f"settled with {what} still in the harness"
    server.release.set()
    await settled.wait()


async def test_settle_waits_until_every_request_started_has_gone_out(
    nursery: trio.Nursery,
) -> None:
    # A scenario's settle lets the server's loop go round so that it takes in the
    # requests sent before; one still in the harness (a body the server has not
    # read yet, a connection still opening) must be out first, or the race it
    # sets up was never set up.
    server = BigBodyServer(hold_on=1)
    client = TargetClient(await server.start(nursery), request_timeout=HANG_GUARD)
    with trio.fail_after(HANG_GUARD):
        nursery.start_soon(partial(client.send, "c", "chat", "POST", "/big", raw_body=BIG))
        await assert_settle_waits_for(nursery, client, server, "a request's body")
    await client.aclose()
    nursery.cancel_scope.cancel()


async def test_settle_waits_for_a_request_resent_after_a_stale_connection(
    nursery: trio.Nursery,
) -> None:
    # The first attempt's body went out whole on a kept-alive connection the
    # server then dropped unanswered; the second, on a fresh connection, is
    # outgoing again until its body is written, and settle waits for it too.
    server = BigBodyServer(hold_on=2, drop_on=1)
    client = TargetClient(await server.start(nursery), request_timeout=HANG_GUARD)
    results: list[Observation] = []

    async def send_big() -> None:
        results.append(await client.send("c", "chat", "POST", "/big", raw_body=BIG))

    with trio.fail_after(HANG_GUARD):
        assert (await client.send("g", "get", "GET", "/a")).status == 200
        nursery.start_soon(send_big)
        await server.held.wait()
        await assert_settle_waits_for(nursery, client, server, "a resent request's body")
        while not results:
            await trio.testing.wait_all_tasks_blocked()
    assert results[0].retried_after is not None
    assert results[0].status == 200
    await client.aclose()
    nursery.cancel_scope.cancel()


async def test_each_failure_is_named_as_httpx_names_it(nursery: trio.Nursery) -> None:
    async def reset(stream: trio.SocketStream, connection: h11.Connection, number: int) -> bool:
        import socket

        stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4)
        )
        await stream.aclose()
        return False

    def raw(data: bytes) -> object:
        async def answer(stream: trio.SocketStream, connection: h11.Connection, n: int) -> bool:
            await stream.send_all(data)
            await stream.aclose()
            return False

        return answer

    cases = {
        "garbage": (raw(b"garbage\r\n\r\n"), "RemoteProtocolError"),
        "cut": (
            raw(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}"),
            "RemoteProtocolError: peer closed connection without sending complete message body",
        ),
        "closed": (
            raw(b""),
            "RemoteProtocolError: Server disconnected without sending a response.",
        ),
        "reset": (reset, "ReadError: socket connection broken: [Errno 104]"),
    }
    for name, (answer, says) in cases.items():
        peer = Peer(answer)  # type: ignore[arg-type]
        url = await nursery.start(peer.serve)
        client = TargetClient(url, request_timeout=HANG_GUARD)
        observation = await client.send("c", "chat", "POST", "/x", json_body={})
        assert observation.status is None, name
        assert observation.transport_error is not None
        assert observation.transport_error.startswith(says), (name, observation.transport_error)
        assert not observation.unreachable
        # No answer's head arrived except when the body was cut: only those are retried.
        assert (observation.retried_after is None) == (name == "cut"), name
        await client.aclose()
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = TargetClient(f"http://127.0.0.1:{port}", request_timeout=HANG_GUARD)
    refused = await client.send("c", "create", "POST", "/sessions")
    assert refused.unreachable
    assert refused.transport_error is not None
    assert refused.transport_error.startswith("ConnectError: all attempts to connect")
    nursery.cancel_scope.cancel()


async def test_a_server_that_never_answers_times_out_per_read(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def never(stream: trio.SocketStream, connection: h11.Connection, number: int) -> bool:
        await trio.sleep_forever()
        return False

    url = await nursery.start(Peer(never).serve)
    client = TargetClient(url, request_timeout=3.0)
    started = trio.current_time()
    observation = await client.send("c", "chat", "POST", "/x", json_body={})
    assert observation.transport_error == "no answer within 3 s"
    assert trio.current_time() - started == 3.0  # virtual time: the read's deadline
    nursery.cancel_scope.cancel()


async def test_a_stream_is_read_as_it_comes_and_its_connection_kept(
    nursery: trio.Nursery,
) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]}
    done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    events = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(done)}\n\ndata: [DONE]\n\n"

    async def stream(stream: trio.SocketStream, connection: h11.Connection, number: int) -> bool:
        headers = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]
        await send(
            stream,
            connection,
            h11.Response(status_code=200, headers=headers),
            h11.Data(data=events.encode()),
            h11.EndOfMessage(),
        )
        return True

    peer = Peer(stream)
    url = await nursery.start(peer.serve)
    client = TargetClient(url, request_timeout=HANG_GUARD)
    for _ in range(2):
        observation = await client.send_stream(
            "c", "/chat", {"stream": True, "messages": []}, StreamProgress()
        )
        assert observation.status == 200
        assert observation.stream is not None
        assert observation.stream.end.value == "done"
        assert observation.body["choices"][0]["message"]["content"] == "hi"
    assert peer.connections == 1
    await client.aclose()
    nursery.cancel_scope.cancel()
