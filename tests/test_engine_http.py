"""The engine client (``refserver/transport/engine_http.py``) against a raw HTTP/1.1 peer.

The peer is a few lines on trio sockets, so each test decides exactly what the
engine does with its connection: answer and keep it, close it while idle,
cut an answer short, or send bytes that are not HTTP. Orders come from the
peer's own events, never from sleeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import h11
import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from refserver.transport.engine_http import (
    EngineConnections,
    EngineTransportError,
    base_url_problem,
)
from wire.streaming import EventReader

from .conftest import HANG_GUARD

Answer = Callable[[trio.SocketStream, h11.Connection, int], Awaitable[bool]]
"""What the peer does with request number N (from 1) on the connection it came on;
True if the connection stays open for the next request."""


class Peer:
    """A raw HTTP/1.1 server: counts connections and requests, answers with ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.bodies: list[bytes] = []
        self.heads: list[h11.Request] = []
        self.hung_up = trio.Event()
        """Set when the client closes a connection the peer was still reading."""

    async def serve(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.serve_listeners, self._connection, listeners))
            task_status.started(f"http://127.0.0.1:{port}/v1")

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        connection = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                body = b""
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            self.hung_up.set()
                            return
                        connection.receive_data(data)
                    elif isinstance(event, h11.Request):
                        self.heads.append(event)
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                self.requests += 1
                self.bodies.append(body)
                if not await self.answer(stream, connection, self.requests):
                    return
                connection.start_next_cycle()


async def send(stream: trio.SocketStream, connection: h11.Connection, *events: h11.Event) -> None:
    await stream.send_all(b"".join(connection.send(event) or b"" for event in events))


def json_answer(body: bytes) -> Answer:
    async def answer(stream: trio.SocketStream, connection: h11.Connection, number: int) -> bool:
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        await send(
            stream,
            connection,
            h11.Response(status_code=200, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )
        return True

    return answer


async def post(engine: EngineConnections, body: bytes = b"{}") -> tuple[int, bytes | None]:
    with trio.fail_after(HANG_GUARD):
        async with engine.post("/chat/completions", body) as response:
            return response.status, await response.read(1024)


async def test_an_answered_connection_is_kept_and_reused(nursery: trio.Nursery) -> None:
    peer = Peer(json_answer(b'{"ok": true}'))
    engine = EngineConnections(await nursery.start(peer.serve))
    for _ in range(3):
        assert await post(engine, b'{"n": 1}') == (200, b'{"ok": true}')
    assert (peer.connections, peer.requests, engine.idle) == (1, 3, 1)
    assert peer.bodies == [b'{"n": 1}'] * 3
    engine.close()
    nursery.cancel_scope.cancel()


async def test_a_connection_the_engine_closed_while_idle_is_not_reused(
    nursery: trio.Nursery,
) -> None:
    async def answer_then_close(
        stream: trio.SocketStream, connection: h11.Connection, number: int
    ) -> bool:
        await json_answer(b"{}")(stream, connection, number)
        await stream.aclose()  # no "connection: close": the client finds out itself
        return False

    peer = Peer(answer_then_close)
    engine = EngineConnections(await nursery.start(peer.serve))
    assert await post(engine) == (200, b"{}")
    with trio.fail_after(HANG_GUARD):
        while peer.connections == 1 and not _closed_by_peer(engine):  # noqa: ASYNC110
            await trio.sleep(0.001)  # the FIN crosses loopback; no event to wait on
    assert await post(engine) == (200, b"{}")  # no error: a fresh connection
    assert peer.connections == 2
    engine.close()
    nursery.cancel_scope.cancel()


def _closed_by_peer(engine: EngineConnections) -> bool:
    return all(c.socket().is_readable() for c in engine._idle)


async def test_an_idle_connection_past_its_expiry_is_closed(nursery: trio.Nursery) -> None:
    peer = Peer(json_answer(b"{}"))
    engine = EngineConnections(await nursery.start(peer.serve), keepalive_expiry=0.0)
    await post(engine)
    await post(engine)
    assert peer.connections == 2
    engine.close()
    nursery.cancel_scope.cancel()


async def test_at_most_keepalive_idle_connections_are_kept(nursery: trio.Nursery) -> None:
    peer = Peer(json_answer(b"{}"))
    engine = EngineConnections(await nursery.start(peer.serve), keepalive=2)
    async with trio.open_nursery() as turns:
        for _ in range(5):
            turns.start_soon(post, engine)
    assert peer.connections == 5  # each turn in flight had its own; none waited
    assert engine.idle == 2
    engine.close()
    nursery.cancel_scope.cancel()


async def test_a_turn_that_leaves_early_closes_its_connection_at_once(
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()

    async def head_then_hold(
        stream: trio.SocketStream, connection: h11.Connection, number: int
    ) -> bool:
        headers = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]
        await send(stream, connection, h11.Response(status_code=200, headers=headers))
        await release.wait()
        return False

    peer = Peer(head_then_hold)
    # The peer reads on after it answered, to see the hang-up.
    peer_answer = peer.answer

    async def answer_and_watch(
        stream: trio.SocketStream, connection: h11.Connection, number: int
    ) -> bool:
        async with trio.open_nursery() as inner:
            inner.start_soon(peer_answer, stream, connection, number)
            assert await stream.receive_some(1) == b""
            peer.hung_up.set()
            inner.cancel_scope.cancel()
        return False

    peer.answer = answer_and_watch
    engine = EngineConnections(await nursery.start(peer.serve))
    with trio.CancelScope() as turn:
        async with engine.post("/chat/completions", b"{}") as response:
            assert response.status == 200
            turn.cancel()  # a DELETE preempting the turn
            await response.next_part()
    with trio.fail_after(HANG_GUARD):
        await peer.hung_up.wait()
    assert engine.idle == 0
    release.set()
    nursery.cancel_scope.cancel()


async def test_a_refused_connection_is_a_transport_error_naming_the_cause() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = EngineConnections(f"http://127.0.0.1:{port}/v1")
    # The cause is what tells "refused" from "too many open files" (how the
    # descriptor leak at scale was found): trio keeps it under its own message.
    with pytest.raises(EngineTransportError, match=r"ConnectError.*Connection refused"):
        await post(engine)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"garbage\r\n\r\n", "RemoteProtocolError"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", "before its answer ended"),
        (b"", "closed the connection before it answered"),
    ],
    ids=["not-http", "cut-mid-body", "closed-before-answer"],
)
async def test_a_broken_answer_is_a_transport_error(
    nursery: trio.Nursery, raw: bytes, why: str
) -> None:
    async def broken(stream: trio.SocketStream, connection: h11.Connection, number: int) -> bool:
        await stream.send_all(raw)
        await stream.aclose()
        return False

    engine = EngineConnections(await nursery.start(Peer(broken).serve))
    with pytest.raises(EngineTransportError, match=why):
        await post(engine)
    assert engine.idle == 0
    nursery.cancel_scope.cancel()


async def test_an_answer_over_the_limit_is_refused_and_the_next_turn_is_served(
    nursery: trio.Nursery,
) -> None:
    peer = Peer(json_answer(b"x" * 5000))
    engine = EngineConnections(await nursery.start(peer.serve))
    async with engine.post("/chat/completions", b"{}") as response:
        assert await response.read(1000) is None
    assert await post(engine) == (200, None)
    nursery.cancel_scope.cancel()


def test_a_base_url_must_be_http_with_a_host() -> None:
    with pytest.raises(ValueError, match="not an http"):
        EngineConnections("ftp://engine/v1")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("notaurl", "not an http(s) URL with a host"),
        ("http://[::1", "not a URL: Invalid IPv6 URL"),
        ("http://engine:99999/v1", "not a URL: Port out of range"),
        ("http://engine:x/v1", "not a URL: Port could not be cast"),
        ("http://engine:/v1", "'engine:' is not a host[:port]"),
        ("http://en gine/v1", "has a space"),
        ("http://engine/v1\n", "a control"),
        ("http://\u00e9ngine/v1", "non-ASCII"),
        ("http://127.0.0.1:30000/v1", None),
        ("http://user:pw@engine/v1", "a user or password"),
        ("http://engine/v1?x=1", "query or fragment"),
        ("http://engine/v1#", "query or fragment"),
        ("http://en%67ine/v1", "is not a host[:port]"),
        ("http://[::1]:8000/v1", None),
        ("https://engine.example/v1", None),
    ],
)
def test_a_bad_base_url_is_named_for_what_is_wrong(url: str, says: str | None) -> None:
    problem = base_url_problem(url)
    if says is None:
        assert problem is None
    else:
        assert problem is not None
        assert says in problem, problem


URL_PIECE = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)


@given(
    scheme=st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
    host=st.one_of(st.sampled_from(["engine", "127.0.0.1", "[::1]", "a.b-c", ""]), URL_PIECE),
    port=st.one_of(st.none(), st.integers(-1, 70000).map(str), URL_PIECE),
    path=st.one_of(st.sampled_from(["", "/v1", "/v1/"]), URL_PIECE.map(lambda p: "/" + p)),
    tail=st.sampled_from(["", "?", "#x", "?a=b"]),
)
def test_a_base_url_that_passes_means_one_host_to_the_engine_client_and_httpx(
    scheme: str, host: str, port: str | None, path: str, tail: str
) -> None:
    # The server reaches its engine with EngineConnections; the harness reaches
    # a target with httpx. One check guards both, so what it lets through must
    # mean the same host and port to each.
    url = f"{scheme}://{host}{'' if port is None else ':' + port}{path}{tail}"
    if base_url_problem(url) is not None:
        return
    engine = EngineConnections(url)
    parsed = httpx.URL(url)
    assert parsed.scheme in ("http", "https")
    default_port = 443 if parsed.scheme == "https" else 80
    assert (parsed.host, parsed.port or default_port) == (engine._host, engine._port)


LINE = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=8)
EVENTS = st.lists(
    st.lists(LINE, min_size=1, max_size=3),
    min_size=1,
    max_size=5,
)


@given(EVENTS, st.sampled_from(["\n", "\r\n", "\r"]), st.lists(st.integers(0, 400), max_size=8))
def test_events_read_the_same_however_the_bytes_are_split(
    events: list[list[str]], newline: str, cuts: list[int]
) -> None:
    stream = "".join(
        f": a comment{newline}event: ping{newline}{newline}"
        + "".join(f"data: {line}{newline}" for line in lines)
        + newline
        for lines in events
    ).encode()
    reader = EventReader()
    read: list[bytes] = []
    start = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        read += reader.feed(stream[start:cut])
        start = max(start, cut)
    assert read == ["\n".join(lines).encode() for lines in events]
