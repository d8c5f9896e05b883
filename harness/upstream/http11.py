"""A small HTTP/1.1 server on trio sockets and h11, for the chaos upstream.

Why not hypercorn here: the chaos upstream must do what an ASGI app cannot.
It must drop a connection without answering (``reset``), and it must see the
exact moment the server under test hangs up on a held call, which is the
evidence that the server really stopped the LLM work. Owning the socket
gives both.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from wire.listening import BurstListener

MAX_BODY_BYTES = 64 * 1024 * 1024
READ_CHUNK = 65536


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: str = ""
    """The target's query string, without the ``?`` (the control routes read it)."""
    sent_after: float | None = None
    """A moment (``trio.current_time()``) before its client began sending it: the
    connection was seen empty then. See ``_Reader``."""


class _IoClock(trio.abc.Instrument):
    """When the event loop's last two waits for I/O began.

    A task woken by a socket runs in the batch that follows the wait that
    reported it; the wait before that one had found the socket not ready at some
    moment after it began. So the bytes it reads arrived after ``previous``,
    however long the batch took to come to the task (with thousands of tasks in
    one loop, milliseconds). Not when that wait returned: the process may be
    descheduled between the return and the reading of the clock, and bytes that
    arrive then are not in what it returned."""

    def __init__(self) -> None:
        self.previous = self.latest = trio.current_time()

    def before_io_wait(self, timeout: float) -> None:
        self.previous, self.latest = self.latest, trio.current_time()


class _Reader:
    """Reads a connection, and knows a moment before the bytes of each read arrived.

    Why: the chaos upstream's ``received`` time is when the loop came round to the
    request, which under load is milliseconds after it arrived. A leak judged on it
    ("the call started after the DELETE") was a false alarm when a call sent just
    before the DELETE was read just after it. ``arrived_after`` is certain instead:
    the last time the socket was seen empty (a read found nothing, or emptied it),
    or the last wait for I/O before the one that reported the bytes."""

    __slots__ = ("_clock", "_empty_at", "_socket", "arrived_after")

    def __init__(self, stream: trio.SocketStream, clock: _IoClock, empty_at: float) -> None:
        self._socket = stream.socket
        self._clock = clock
        self._empty_at = empty_at
        self.arrived_after = empty_at
        """For the bytes the last ``receive`` returned."""

    async def receive(self) -> bytes:
        """As ``SocketStream.receive_some``: ``b""`` at the end, trio's errors otherwise."""
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._socket
        while True:
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("the connection was closed")
            before = trio.current_time()
            try:
                data = os.read(sock.fileno(), READ_CHUNK)
            except BlockingIOError:
                self._empty_at = before
                await trio.lowlevel.wait_readable(sock)
                self._empty_at = max(self._empty_at, self._clock.previous)
                continue
            except OSError as error:
                raise trio.BrokenResourceError(f"socket connection broken: {error}") from None
            self.arrived_after = self._empty_at
            if len(data) < READ_CHUNK:
                self._empty_at = before  # it read all there was
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data


class Exchange:
    """One request on one connection, and the ways to answer it (or not)."""

    def __init__(self, stream: trio.SocketStream, connection: h11.Connection, request: HttpRequest):
        self._stream = stream
        self._connection = connection
        self.request = request
        self.closed = False

    async def respond(
        self, status: int, body: bytes, content_type: str = "application/json"
    ) -> None:
        headers = [("content-type", content_type), ("content-length", str(len(body)))]
        # One write for the whole answer: the server under test reads it at once.
        await self._send(
            h11.Response(status_code=status, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )

    async def start_stream(self, content_type: str = "text/event-stream") -> None:
        """Send the head of a chunked answer; ``send_part`` sends each part, ``end`` the end."""
        await self._send(h11.Response(status_code=200, headers=[("content-type", content_type)]))

    async def send_part(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def reset(self) -> None:
        """Close the connection at once, with a TCP RST and no answer."""
        # SO_LINGER with a zero timeout turns close() into an RST, which is
        # what a crashed engine or a dropped load-balancer connection looks like.
        self._stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4)
        )
        self.closed = True
        await self._stream.aclose()

    def hung_up_already(self) -> bool:
        """Whether the client's close (a FIN or a reset) has arrived, without waiting."""
        trio_socket = self._stream.socket
        if trio_socket.fileno() == -1:
            return True
        # A duplicate of the descriptor: trio's socket only reads asynchronously.
        with socket.fromfd(trio_socket.fileno(), trio_socket.family, trio_socket.type) as peek:
            try:
                return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True  # reset

    async def wait_for_hangup(self) -> None:
        """Return when the client closes the connection (it sent its whole request
        already), with a FIN or a reset."""
        try:
            while True:
                data = await self._stream.receive_some(READ_CHUNK)
                if not data:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # reset by the peer: hung up just the same

    async def _send(self, *events: h11.Event) -> None:
        payload = b"".join(self._connection.send(event) or b"" for event in events)
        if payload:
            await self._stream.send_all(payload)


Handler = Callable[[Exchange], Awaitable[None]]


async def serve_http11(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Accepted in bursts: a server whose turns each open an engine connection
    # connects by the thousand at once (see wire.listening).
    listeners = [
        BurstListener.taking_over(listener)
        for listener in await trio.open_tcp_listeners(port, host=host)
    ]
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    clock = _IoClock()
    trio.lowlevel.add_instrument(clock)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, handler, listener, clock, nursery)
            task_status.started(f"http://{shown_host}:{bound_port}")
    finally:
        trio.lowlevel.remove_instrument(clock)


async def _accept_loop(
    handler: Handler, listener: BurstListener, clock: _IoClock, nursery: trio.Nursery
) -> None:
    """``trio.serve_listeners`` for one listener, each connection with its reader."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                await trio.sleep(0.1)  # out of descriptors: as serve_listeners does
                continue
            reader = _Reader(stream, clock, listener.accepted_after)
            nursery.start_soon(_serve_connection, handler, stream, reader)


_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def _serve_connection(handler: Handler, stream: trio.SocketStream, reader: _Reader) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            request = await _read_request(reader, connection)
            if request is None:
                return
            exchange = Exchange(stream, connection, request)
            await handler(exchange)
            if exchange.closed or connection.our_state is not h11.DONE:
                return
            if connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _read_request(reader: _Reader, connection: h11.Connection) -> HttpRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    # Bytes left over from the last read (a pipelined request) came with it.
    sent_after = reader.arrived_after if connection.trailing_data[0] else None
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.receive()
            if sent_after is None:
                sent_after = reader.arrived_after
            connection.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return HttpRequest(
                method=head.method.decode(),
                path=head.target.decode().split("?", 1)[0],
                headers={k.decode().lower(): v.decode() for k, v in head.headers},
                body=bytes(body),
                query=head.target.decode().partition("?")[2],
                sent_after=sent_after,
            )
