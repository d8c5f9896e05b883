"""The harness's HTTP/1.1 transport for httpx: h11 on trio sockets, no pool queue.

Why not httpx's own (httpcore): in a chaos run the harness was the bottleneck,
and httpx with httpcore was most of its CPU (issue 31: 56% of the samples,
the pool alone 24%). httpcore's pool checks every idle connection with a
``poll`` on each request, wraps every read and write in trace and timeout
context managers, and queues a request once its limit is reached: a request
queued in the harness looks like a server that waits. The harness needs much
less: HTTP/1.1 only, one request per connection at a time.

So ``H11Transport`` keeps a stack of idle connections per origin: a request
takes the most recently used one (after checking that one alone for a close
the server sent while it idled), or opens its own. It never waits for a
connection. It keeps at most ``keepalive`` idle ones, each for less than
``keepalive_expiry`` seconds.

It speaks httpx's language at its boundary, so everything above it (``TargetClient``,
``httpx_sse``, the reports) is unchanged: the same exceptions with the same
messages as httpcore's for the same failures (``ConnectError``, ``ReadError:
socket connection broken: ...``, ``RemoteProtocolError: Server disconnected
without sending a response.``), the ``trace`` extension's
``http11.send_request_headers.started`` as the request's first bytes go out,
per-read and per-write timeouts from the request's ``timeout`` extension, and
httpcore's habit of reading the answer after a failed write (a server may
answer 413 and close before it has read a large body).

This module is the boundary for trio's and h11's exceptions: they leave it as
httpx's ``TransportError`` subclasses and nothing else.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import h11
import httpx
import trio

READ_CHUNK = 65536
KEEPALIVE_EXPIRY = 5.0

Origin = tuple[bytes, bytes, int]
"""Scheme, host and port."""
_DEFAULT_PORT = {"http": 80, "https": 443}


def origin_of(url: httpx.URL) -> Origin:
    """Where ``url`` is served: its scheme, host and port (the default one if none)."""
    return (url.raw_scheme, url.raw_host, url.port or _DEFAULT_PORT.get(url.scheme, 80))


Trace = Callable[[str, dict[str, Any]], Awaitable[None]]


class _Connection:
    __slots__ = ("h11", "idle_since", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        plain = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        assert isinstance(plain, trio.SocketStream)
        self.socket = plain.socket

    def close(self) -> None:
        # Synchronous, so it happens even in a cancelled scope: the server sees
        # the hang-up at once.
        self.socket.close()


class H11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 for an ``httpx.AsyncClient``, and ``fetch`` without httpx's models;
    see the module's docstring."""

    def __init__(
        self,
        *,
        keepalive: int = 64,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._keepalive = keepalive
        self._keepalive_expiry = keepalive_expiry
        self._verify = verify
        self._tls: ssl.SSLContext | None = None
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._open: set[_Connection] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in _DEFAULT_PORT:
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{url.scheme}://'."
            )
        origin = origin_of(url)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        stream = request.stream
        content = request.content if isinstance(stream, httpx.ByteStream) else stream
        assert isinstance(content, bytes | AsyncIterable)
        connection, head = await self._exchange(
            origin,
            request.method.encode("ascii"),
            url.raw_path,
            request.headers.raw,
            content,
            timeouts,
            request.extensions.get("trace"),
        )
        return httpx.Response(
            status_code=head.status_code,
            headers=head.headers.raw_items(),
            stream=_ResponseStream(self, origin, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(head.reason)},
        )

    async def fetch(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        content: bytes | AsyncIterable[bytes],
        *,
        timeout: float | None,
        trace: Trace | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One exchange read to its end, without httpx's request and response models:
        the status, the headers (names lower-case) and the body as it came (no
        ``Content-Encoding`` is undone: ask for ``identity``). The same exceptions as
        through httpx; ``timeout`` bounds the connect, each write and each read."""
        timeouts = {"connect": timeout, "read": timeout, "write": timeout}
        connection, head = await self._exchange(
            origin, method, target, headers, content, timeouts, trace
        )
        body = _ResponseStream(self, origin, connection, timeout)
        try:
            parts = [part async for part in body]
        except BaseException:
            await body.aclose()
            raise
        return head.status_code, list(head.headers), b"".join(parts)

    async def _exchange(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        content: bytes | AsyncIterable[bytes],
        timeouts: dict[str, float | None],
        trace: Trace | None,
    ) -> tuple[_Connection, h11.Response]:
        """A connection, the request sent on it, and the answer's head read."""
        connection = await self._connection(origin, timeouts.get("connect"))
        try:
            if trace is not None:
                await trace("http11.send_request_headers.started", {})
            await _send(connection, method, target, headers, content, timeouts.get("write"))
            if trace is not None:
                await trace("http11.send_request_body.complete", {})
            read_timeout = timeouts.get("read")
            event = await _next_event(connection, read_timeout)
            while isinstance(event, h11.InformationalResponse):
                event = await _next_event(connection, read_timeout)
            if not isinstance(event, h11.Response):
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} for an answer")
            if trace is not None:
                await trace("http11.receive_response_headers.complete", {})
        except BaseException:
            self._discard(connection)
            raise
        return connection, event

    async def _connection(self, origin: Origin, timeout: float | None) -> _Connection:
        idle = self._idle.get(origin)
        if idle:
            now = trio.current_time()
            while idle and now - idle[0].idle_since >= self._keepalive_expiry:
                self._discard(idle.popleft())
            while idle:
                connection = idle.pop()
                # Readable while idle means the server closed it (or wrote junk).
                if not connection.socket.is_readable():
                    return connection
                self._discard(connection)
        scheme, host, port = origin
        hostname = host.decode("ascii")
        stream: trio.abc.Stream | None = None
        try:
            with _deadline(timeout) as deadline:
                stream = await trio.open_tcp_stream(hostname, port)
                if scheme == b"https":
                    tls = trio.SSLStream(stream, self._ssl_context(), server_hostname=hostname)
                    await tls.do_handshake()
                    stream = tls
        except (OSError, trio.BrokenResourceError) as error:
            raise httpx.ConnectError(str(error)) from None
        if deadline.cancelled_caught or stream is None:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise httpx.ConnectTimeout("timed out")
        connection = _Connection(stream)
        self._open.add(connection)
        return connection

    def _ssl_context(self) -> ssl.SSLContext:
        if self._tls is None:
            verify = self._verify
            if isinstance(verify, ssl.SSLContext):
                self._tls = verify
            else:
                self._tls = httpx.create_ssl_context(verify=verify)
                self._tls.set_alpn_protocols(["http/1.1"])
        return self._tls

    def _finished(self, origin: Origin, connection: _Connection) -> None:
        """An answer was read to its end: the connection is kept for the next request
        if both sides may go on (no ``Connection: close``) and there is room."""
        machine = connection.h11
        idle = self._idle.setdefault(origin, deque())
        both_done = machine.our_state is h11.DONE and machine.their_state is h11.DONE
        if both_done and len(idle) < self._keepalive:
            machine.start_next_cycle()
            connection.idle_since = trio.current_time()
            idle.append(connection)
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def aclose(self) -> None:
        for connection in list(self._open):
            self._discard(connection)
        self._idle.clear()


class _ResponseStream(httpx.AsyncByteStream):
    """A response's body as it arrives; the connection goes back to the pool if the
    body was read to its end, and is closed otherwise."""

    def __init__(
        self,
        transport: H11Transport,
        origin: Origin,
        connection: _Connection,
        timeout: float | None,
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while not isinstance(
            event := await _next_event(connection, self._timeout), h11.EndOfMessage
        ):
            if not isinstance(event, h11.Data):
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in an answer")
            yield bytes(event.data)
        self._connection = None
        self._transport._finished(self._origin, connection)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        # A stream's reader stops at ``[DONE]``, and the end of the body usually
        # came in the same packet: then the connection is as good as read to its end.
        if _ended_in_what_was_read(connection):
            self._transport._finished(self._origin, connection)
        else:
            self._transport._discard(connection)


def _ended_in_what_was_read(connection: _Connection) -> bool:
    """Whether the rest of the answer, to its end, is already received (a close
    otherwise: the server would go on writing into the next exchange)."""
    machine = connection.h11
    try:
        while machine.their_state is h11.SEND_BODY:
            if machine.next_event() is h11.NEED_DATA:
                return False
    except h11.ProtocolError:
        return False
    return machine.their_state is h11.DONE


def _deadline(timeout: float | None) -> trio.CancelScope:
    """A scope that gives up after ``timeout`` seconds (``cancelled_caught`` then says
    so): ``trio.fail_after`` without its generator, which costs on every read."""
    if timeout is None:
        return trio.CancelScope()
    return trio.CancelScope(deadline=trio.current_time() + timeout)


async def _send(
    connection: _Connection,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    content: bytes | AsyncIterable[bytes],
    timeout: float | None,
) -> None:
    """The head and the body, the head with the body's first part in one write.
    A failed write is not raised: the answer is read all the same, as httpcore does
    (a server may answer and close before it has read the whole body)."""
    machine = connection.h11
    try:
        pending = (
            machine.send(h11.Request(method=method, target=target, headers=list(headers))) or b""
        )
        if isinstance(content, bytes):
            # The common case, the whole body at hand: one write for all.
            if content:
                pending += machine.send(h11.Data(data=content)) or b""
            pending += machine.send(h11.EndOfMessage()) or b""
            await _write(connection, pending, timeout)
            return
        async for part in content:
            if part:
                pending += machine.send(h11.Data(data=part)) or b""
                await _write(connection, pending, timeout)
                pending = b""
        pending += machine.send(h11.EndOfMessage()) or b""
        await _write(connection, pending, timeout)
    except httpx.WriteError:
        pass
    except h11.LocalProtocolError as error:
        raise httpx.LocalProtocolError(str(error)) from None


async def _write(connection: _Connection, data: bytes, timeout: float | None) -> None:
    try:
        with _deadline(timeout) as deadline:
            await connection.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        raise httpx.WriteError(str(error)) from None
    if deadline.cancelled_caught:
        raise httpx.WriteTimeout("timed out")


async def _next_event(connection: _Connection, timeout: float | None) -> Any:
    """h11's next event of the answer, reading as needed."""
    machine = connection.h11
    try:
        while (event := machine.next_event()) is h11.NEED_DATA:
            data = None
            try:
                with _deadline(timeout):
                    data = await connection.stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise httpx.ReadError(str(error)) from None
            if data is None:
                raise httpx.ReadTimeout("timed out")
            if not data and machine.their_state is h11.SEND_RESPONSE:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            machine.receive_data(bytes(data))
    except h11.RemoteProtocolError as error:
        raise httpx.RemoteProtocolError(str(error)) from None
    return event
