"""HTTP/1.1 to the LLM engine: keep-alive connections on trio sockets, spoken with h11.

Why not httpx here (the harness still uses it): at thousands of turns in
flight the engine client was most of the reference server's cost. httpx
and httpcore spent about 40% of a proxied turn's CPU, and about 15 KB of
memory for every turn held at the engine; httpcore's pool also scans every
connection it has on each request, so filling it with 10,000 turns took
time quadratic in their number. A session server needs much less than a
general client: one engine, POST only, no redirects, cookies or auth, one
turn per connection at a time. So ``EngineConnections`` is a stack of idle
connections: a turn takes the most recently used one, or opens its own,
and gives it back when its answer was read to the end (``benchmarks/
refserver_bench.py`` and ``benchmarks/scale_bench.py`` measure both).

Every turn may open its own connection, so no turn ever waits in a queue
here: how many turns run at once is decided by the server's admission
(``--max-turns-in-flight``), not by a pool limit. At most ``keepalive``
idle connections are kept, each for less than ``KEEPALIVE_EXPIRY`` seconds.

The engine is reached directly: proxy variables (``HTTP_PROXY``) are not
read. A connection a turn leaves before its answer ended (a DELETE, a
hang-up, a deadline) is closed at once, which is how the engine learns
that the work was abandoned.

This module is the boundary for the sockets' and h11's exceptions: they
leave it as ``EngineTransportError`` and nothing else.
"""

from __future__ import annotations

import re
import ssl
from collections import deque
from urllib.parse import urlsplit

import h11
import trio

from . import socket_io

READ_CHUNK = 65536
KEEPALIVE_EXPIRY = 5.0
"""Seconds an idle connection is kept: engines' servers close idle ones
themselves after a while (uvicorn after 5 s), and a dead one costs a retry."""

_FAILURES = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)
"""What a broken connection raises underneath (``ssl.SSLError`` is an ``OSError``)."""


_CLOSED_BEFORE_ANSWER = "the engine closed the connection before it answered"


class EngineTransportError(Exception):
    """The exchange with the engine failed below HTTP: no connection, a reset,
    a connection closed before the answer ended, or bytes that are not HTTP/1.1."""


class _Connection:
    __slots__ = ("_plain", "h11", "idle_since", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self._plain = isinstance(stream, trio.SocketStream)

    def socket(self) -> trio.socket.SocketType:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream.socket

    async def receive(self) -> bytes:
        if self._plain:
            # Below SocketStream's layers, and trio's socket's own: a turn held
            # at the engine waits here, and each layer is memory per turn.
            return await socket_io.receive(self.socket(), READ_CHUNK)
        return bytes(await self.stream.receive_some(READ_CHUNK))

    async def send_all(self, data: bytes) -> None:
        if self._plain:
            # Yields only if it must wait: the read of the answer comes next.
            await socket_io.send_all(self.socket(), data)
            return
        await self.stream.send_all(data)

    def close(self) -> None:
        # Synchronous, so it happens even in a cancelled scope: the engine sees
        # the hang-up at once (that is how it learns its work was abandoned).
        self.socket().close()

    def reusable(self) -> bool:
        return self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE


class EngineResponse:
    """The engine's answer to one POST: its status and headers, then its body."""

    __slots__ = ("_connection", "headers", "status")

    def __init__(self, connection: _Connection, response: h11.Response) -> None:
        self._connection = connection
        self.status: int = response.status_code
        self.headers: dict[str, str] = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers
        }
        """Lower-case names (h11 lowers them); a repeated header keeps its last value."""

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None once it exceeds ``limit`` bytes (the rest unread)."""
        parts: list[bytes] = []
        size = 0
        while (part := await self.next_part()) is not None:
            size += len(part)
            if size > limit:
                return None
            parts.append(part)
        return b"".join(parts)

    async def next_part(self) -> bytes | None:
        """The next piece of the body as it arrives, or None at its end."""
        event = await _next_event(self._connection)
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise EngineTransportError(f"unexpected {type(event).__name__} in an answer")


class EngineExchange:
    """One POST on a connection of its own while it lasts.

    The connection goes back to the pool if the answer was read to its end,
    and is closed otherwise (left early, cancelled, or failed). A plain class,
    not a generator-based context manager: it holds no copy of the request
    while the engine works, and a turn held at the engine costs less.
    """

    __slots__ = ("_accept", "_body", "_connection", "_path", "_pool")

    def __init__(self, pool: EngineConnections, path: str, body: bytes, accept: str) -> None:
        self._pool = pool
        self._path = path
        self._body = body
        self._accept = accept
        self._connection: _Connection | None = None

    async def __aenter__(self) -> EngineResponse:
        connection = await self._pool._connection()
        self._connection = connection
        body, self._body = self._body, b""
        try:
            request = self._pool._request_head(self._path, len(body), self._accept)
            # One write for the head and the body.
            data = b"".join(
                connection.h11.send(event) or b""
                for event in (request, h11.Data(data=body), h11.EndOfMessage())
            )
            del request, body  # not kept while the engine works: a trajectory may be long
            try:
                await connection.send_all(data)
            except _FAILURES as failure:
                raise EngineTransportError(_describe(failure)) from None
            del data
            event = await _next_event(connection)
            while isinstance(event, h11.InformationalResponse):
                event = await _next_event(connection)
            if not isinstance(event, h11.Response):
                raise EngineTransportError(f"unexpected {type(event).__name__} for an answer")
        except BaseException:
            connection.close()
            raise
        return EngineResponse(connection, event)

    async def __aexit__(self, *failure: object) -> None:
        connection = self._connection
        assert connection is not None
        if failure[0] is None and _finished(connection):
            self._pool._put_back(connection)
        else:
            connection.close()


_HOST = re.compile(r"[A-Za-z0-9._~-]+|[0-9A-Fa-f:.]+")
"""A host name or an IPv4 address; or, as ``urlsplit`` gives it without brackets, IPv6."""


def base_url_problem(url: str, example: str = "http://127.0.0.1:30000/v1") -> str | None:
    """Why ``url`` cannot be a base URL (of an engine, or of a server under test), or None.

    Stricter than ``urlsplit``, which splits almost any string: what passes here
    is a URL that ``EngineConnections`` can reach and that httpx (the harness's
    client) parses the same way, so a bad one fails at its option, not mid-run."""
    if not url.isascii() or any(char.isspace() or not char.isprintable() for char in url):
        return f"{url!r} is not a URL: it has a space, a control or a non-ASCII character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return f"{url!r} is not a URL: {error}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host, such as {example}"
    if not _HOST.fullmatch(parts.hostname) or (port is None and parts.netloc.endswith(":")):
        return f"{url!r} is not a URL: {parts.netloc!r} is not a host[:port]"
    if parts.username is not None or parts.password is not None:
        # The engine client would drop them silently, and a target's would name
        # the target by them in every report.
        return f"{url!r} has a user or password in it; give the URL without them"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return f"{url!r} has a query or fragment; give the base URL only"
    return None


class EngineConnections:
    """Keep-alive connections to one engine (``base_url``'s scheme, host and port)."""

    def __init__(
        self,
        base_url: str,
        *,
        keepalive: int = 256,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        problem = base_url_problem(base_url)
        if problem is not None:
            raise ValueError(problem)
        parts = urlsplit(base_url)
        assert parts.hostname is not None
        https = parts.scheme == "https"
        self._tls = (ssl_context or ssl.create_default_context()) if https else None
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = (host if default_port else f"{host}:{self._port}").encode()
        self.base_path = parts.path.rstrip("/")
        self._keepalive = keepalive
        self._keepalive_expiry = keepalive_expiry
        self._connect_timeout = connect_timeout
        self._idle: deque[_Connection] = deque()

    @property
    def idle(self) -> int:
        """Idle connections kept open for reuse."""
        return len(self._idle)

    def post(self, path: str, body: bytes, *, accept: str = "application/json") -> EngineExchange:
        """POST ``body`` (JSON) to ``base_path + path``: ``async with`` gives the answer
        once its head arrived. See ``EngineExchange`` for what becomes of the connection."""
        return EngineExchange(self, path, body, accept)

    def _put_back(self, connection: _Connection) -> None:
        if len(self._idle) < self._keepalive:
            connection.idle_since = trio.current_time()
            self._idle.append(connection)
        else:
            connection.close()

    def _request_head(self, path: str, length: int, accept: str) -> h11.Request:
        return h11.Request(
            method="POST",
            target=(self.base_path + path).encode(),
            headers=[
                (b"host", self._host_header),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % length),
                (b"accept", accept.encode()),
                (b"user-agent", b"sessctl-refserver"),
            ],
        )

    async def _connection(self) -> _Connection:
        now = trio.current_time()
        while self._idle and now - self._idle[0].idle_since >= self._keepalive_expiry:
            self._idle.popleft().close()
        while self._idle:
            connection = self._idle.pop()
            # Readable while idle means the engine closed it (or wrote junk).
            if connection.reusable() and not connection.socket().is_readable():
                return connection
            connection.close()
        try:
            with trio.fail_after(self._connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
                if self._tls is not None:
                    tls = trio.SSLStream(stream, self._tls, server_hostname=self._host)
                    await tls.do_handshake()
                    stream = tls
        except trio.TooSlowError:
            raise EngineTransportError(
                f"ConnectTimeout: no connection to {self._host}:{self._port} "
                f"within {self._connect_timeout:g} s"
            ) from None
        except _FAILURES as failure:
            raise EngineTransportError(f"ConnectError: {_describe(failure)}") from None
        return _Connection(stream)

    def close(self) -> None:
        """Close the idle connections (turns in flight close their own)."""
        while self._idle:
            self._idle.pop().close()


async def _next_event(connection: _Connection) -> object:
    """h11's next event of the answer, reading as needed; an early close is an error."""
    closed = False
    waiting_for_head = connection.h11.their_state is h11.SEND_RESPONSE
    try:
        while (event := connection.h11.next_event()) is h11.NEED_DATA:
            data = await connection.receive()
            closed = not data
            connection.h11.receive_data(data)
    except h11.RemoteProtocolError as error:
        if not closed:
            raise EngineTransportError(_describe(error)) from None
        if waiting_for_head:
            raise EngineTransportError(_CLOSED_BEFORE_ANSWER) from None
        raise EngineTransportError(
            f"the engine closed the connection before its answer ended ({error})"
        ) from None
    except _FAILURES as failure:
        raise EngineTransportError(_describe(failure)) from None
    if isinstance(event, h11.ConnectionClosed):
        raise EngineTransportError(_CLOSED_BEFORE_ANSWER)
    return event


def _finished(connection: _Connection) -> bool:
    """Whether the answer ended, counting what is already received but not read (a
    stream's caller stops at ``[DONE]``, and its end usually came in the same packet);
    if it did, the connection is ready for the next request."""
    try:
        while connection.h11.their_state is h11.SEND_BODY:
            if connection.h11.next_event() is h11.NEED_DATA:
                return False
        if connection.h11.their_state is not h11.DONE or connection.h11.our_state is not h11.DONE:
            return False
        connection.h11.start_next_cycle()
    except h11.ProtocolError:
        return False
    return True


def _describe(failure: BaseException) -> str:
    described = f"{type(failure).__name__}: {failure or 'connection failed'}"
    # trio's "all attempts to connect ... failed" keeps the reasons in its cause.
    reasons = failure.__cause__
    if isinstance(reasons, BaseExceptionGroup):
        described += " (" + "; ".join(sorted({str(reason) for reason in reasons.exceptions})) + ")"
    return described
