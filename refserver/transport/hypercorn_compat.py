"""hypercorn kept to the contract (its own answers, hang-ups), made leaner, and accepting in bursts.

1. A request hypercorn cannot parse (a malformed request line, headers over
   its size limit) is answered 400 or 431 with an *empty* body. The contract
   says every 4xx has the OpenAI error shape, so such answers get one.
2. ``Expect: 100-continue`` is answered ``100 Continue`` as soon as the
   headers arrive, so a client announcing a body over the limit is invited to
   send it, only to be refused with 413 afterwards. When the declared
   ``Content-Length`` is over the limit, the 100 is not sent: the app's 413
   is the answer, and the body is never read.

3. hypercorn writes an answer's head, its body and its end in three socket
   writes, each under a lock and a shielded cancel scope: about a tenth of a
   proxied turn's CPU (``benchmarks/refserver_bench.py``). The head of an
   answer with a ``Content-Length`` (every answer but a stream) is held and
   written with its body, and the empty write that ends such a body is
   skipped. A streamed answer's head is written at once, as before.

4. hypercorn tells an app that its client went away only as an
   ``http.disconnect`` message, so a handler that waits on the engine needs
   a second task, reading ``receive`` beside it, to notice: a task and a
   nursery for every turn in flight. Instead each request's scope carries a
   ``ClientGone`` (extension ``DISCONNECT``) that hypercorn's own connection
   task sets when the connection closes before the answer was sent; it
   cancels the scope the handler watches with. The message is still sent.

5. hypercorn's trio worker accepts with trio's ``SocketListener``: one
   connection per scheduler round, so thousands of agents connecting at once
   overflowed the kernel's accept queue and some were reset. ``serve`` is
   hypercorn's ``worker_serve`` for plain-TCP binds with ``BurstListener``
   (``wire/listening.py``) instead; everything after accept is hypercorn's,
   but for items 6, 7, 9, 11 and 12 (a subclass of its connection class).
6. When a client closes a kept-alive connection, hypercorn (0.18) does not
   close its side until the keep-alive timeout: the connection's task waits
   for its idle timer's task before closing. Agents that close after their
   answer left sockets in CLOSE-WAIT by the thousand, and at scale the server
   ran out of descriptors (``benchmarks/scale_bench.py``: 715 of 9,790 turns
   lost as 502, EMFILE on the engine connect). ``serve``'s connections close
   their socket as soon as their client has closed.
7. hypercorn's keep-alive timer is a task restarted after every answer (a
   lock, and ``nursery.start``): about 7% of a proxied turn's CPU in a profile.
   ``serve``'s connections keep it as a deadline on the read their task already
   waits in (``_IdleDeadline``). Idle connections still close at shutdown.

8. An answer sent before the request's body has arrived (a 404 or 405 for a
   route that reads no body, a 413 on the declared length) ends the
   connection, since the rest of the body would be read as the next request;
   hypercorn closed it without saying so, and a client that reused it lost its
   next request ("Server disconnected without sending a response": the local
   fuzz profile found it, a PUT with a body to an unknown path, then GET
   /healthz). Such an answer now carries ``Connection: close``.

9. A turn held at the engine keeps its agent's connection waiting, and at
   10,000 turns what a waiting connection costs is the server's memory. Its
   read is ``socket_io.receive`` (below trio's ``SocketStream`` layers), and
   its app's messages go through an ``_AppQueue`` instead of a trio memory
   channel: together about 3 KB less per turn (``tests/test_socket_io.py``,
   ``benchmarks/scale_bench.py``).

10. hypercorn formats the ``Date`` header anew for every answer (1% of a proxied
   turn's CPU in a profile). ``LeanConfig`` formats it once a second.

11. hypercorn writes under its connection's ``send_lock``, and trio's
   ``Lock.acquire`` yields to the scheduler even when the lock is free: every
   write waited a scheduler round before its bytes went out, behind every task
   made ready meanwhile. For a DELETE that was the turn it had just preempted:
   that turn unwound and answered its 410 before the 204 left (a trio
   ``Instrument`` showed the order; ``benchmarks/delete_bench.py`` the cost).
   ``serve``'s connections take a free lock without yielding and write at
   once: still cancellable before the write, as ``acquire`` is (after the
   write no round either: item 12). A write that finds the lock taken waits
   as before.

12. A request answered at once took five scheduler rounds (each an
   ``epoll_wait`` and a trip through trio's run loop): the connection task
   yielded after its read and after queueing the request for the app, the
   app after its write and after queueing ``http.disconnect``. trio's calls
   yield even when they did not wait. ``serve``'s connections read and write
   with ``socket_io`` and queue with ``_AppQueue``, which yield once if they
   wait and not again: two rounds, the connection task's and the app's
   (``tests/test_hypercorn_pin.py`` counts them; about a tenth of the server's
   CPU per request, ``benchmarks/request_cpu.py``).

13. hypercorn writes inside a shielded cancel scope, so that a cancelled app never
   leaves half an answer on the wire. Entering and leaving a trio cancel scope
   is costly (about 2% of the server's CPU in a chaos run, from py-spy). An answer
   that fits the socket's buffer, as nearly all do, is written synchronously
   (``socket_io.write_now``), where nothing can cancel it; only a wait for room
   is shielded, as before.

hypercorn has no hook for 1 to 4 and 8, so they are small wrappers around
methods of its HTTP/1.1 protocol and stream classes, active only on servers whose config
carries ``SESSCTL_LIMITS`` (others in the same process are untouched).
``tests/test_bad_input.py`` checks the first two over raw sockets, and every
test of the reference server goes through the third, so a hypercorn release
that renames these methods fails a test, not a user.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from itertools import chain
from math import inf
from typing import Any
from wsgiref.handlers import format_date_time

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Request, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import (
    ShutdownError,
    parse_socket_addr,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)
from starlette.types import ASGIApp

from wire.listening import BurstListener

from . import socket_io

SESSCTL_LIMITS = "sessctl_limits"
"""The attribute of a hypercorn ``Config`` that turns the wrappers on."""

_ERRORS = {
    400: ("invalid_request", "the request could not be parsed as HTTP/1.1"),
    431: ("request_header_fields_too_large", "the request's headers are too large"),
    505: ("http_version_not_supported", "the HTTP version is not supported"),
}
"""Status -> the OpenAI ``error.type`` and message of hypercorn's own refusals."""


DISCONNECT = "sessctl.disconnect"
"""The ASGI scope extension holding the request's ``ClientGone``."""


class ClientGone:
    """Set when the request's client hangs up before its answer was sent.

    ``watch`` names the cancel scope to cancel then (one at a time). When the
    hang-up is noticed inside the watching task itself (hypercorn notices a
    broken connection while the handler writes to it), the scope is not
    cancelled under hypercorn's feet: ``check`` cancels it once the write
    returned.
    """

    __slots__ = ("_scope", "_task", "gone")

    def __init__(self) -> None:
        self.gone = False
        self._scope: trio.CancelScope | None = None
        self._task: trio.lowlevel.Task | None = None

    def watch(self, scope: trio.CancelScope | None) -> None:
        self._scope = scope
        self._task = trio.lowlevel.current_task() if scope is not None else None
        self.check()

    def set(self) -> None:
        self.gone = True
        if self._task is not trio.lowlevel.current_task():
            self.check()

    def check(self) -> None:
        if self.gone and self._scope is not None:
            self._scope.cancel()


class LeanConfig(Config):
    """hypercorn's config, with the ``Date`` of its answers formatted once a second (item 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.include_date_header = False  # this class adds it
        self._date: tuple[int, bytes] = (-1, b"")

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, format_date_time(second).encode("ascii"))
        return [(b"date", self._date[1]), *super().response_headers(protocol)]


@dataclass(frozen=True)
class ProtocolLimits:
    max_body_bytes: int


def enable(config: Config, limits: ProtocolLimits) -> None:
    """Turn the wrappers on for servers started with ``config``."""
    _install()
    setattr(config, SESSCTL_LIMITS, limits)


def _limits(protocol: H11Protocol | HTTPStream) -> ProtocolLimits | None:
    limits = getattr(protocol.config, SESSCTL_LIMITS, None)
    return limits if isinstance(limits, ProtocolLimits) else None


def error_body(status_code: int) -> bytes:
    error_type, message = _ERRORS.get(status_code, _ERRORS[400])
    return json.dumps(
        {"error": {"type": error_type, "code": error_type, "message": message}}
    ).encode()


def _declared_length_over(protocol: H11Protocol, limit: int) -> bool:
    scope: dict[str, Any] | None = getattr(protocol.stream, "scope", None)
    if not scope:
        return False
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return value.isdigit() and int(value) > limit
    return False


_HELD_HEAD = "_sessctl_held_head"
"""The attribute of an ``H11Protocol`` holding an answer's head until its body."""


def _closing(response: h11.Response) -> h11.Response:
    """The answer with ``Connection: close`` (item 8)."""
    headers = [*response.headers, (b"connection", b"close")]
    return h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)


def _has_length(response: h11.Response) -> bool:
    return any(name == b"content-length" for name, _value in response.headers)


_installed = False


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    original_error: Callable[[H11Protocol, int], Awaitable[None]] = H11Protocol._send_error_response
    original_send: Callable[[H11Protocol, Any], Awaitable[None]] = H11Protocol._send_h11_event

    async def send_error_response(self: H11Protocol, status_code: int) -> None:
        # Only where no request was parsed (a bad request line, headers too
        # large): then nothing else can be writing on this connection. Later
        # errors (a broken body) race the app's own answer; hypercorn's
        # empty reply is left to handle those.
        if _limits(self) is None or self.connection.our_state is not h11.IDLE:
            await original_error(self, status_code)
            return
        body = error_body(status_code)
        headers = chain(
            [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
            self.config.response_headers("h11"),
        )
        events = (
            h11.Response(status_code=status_code, headers=list(headers)),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )
        # One write: h11's state moves synchronously, the bytes go out at once.
        data = b"".join(self.connection.send(event) or b"" for event in events)
        await self.send(RawData(data=data))

    async def send_h11_event(self: H11Protocol, event: Any) -> None:
        limits = _limits(self)
        if limits is None:
            await original_send(self, event)
            return
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 100 and _declared_length_over(self, limits.max_body_bytes):
                return  # the app answers 413 instead; the client never sends the body
            await original_send(self, event)
            return
        if isinstance(event, h11.Response) and self.connection.their_state is h11.SEND_BODY:
            event = _closing(event)
        try:
            data = self.connection.send(event) or b""
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return  # as hypercorn does: the client already broke the exchange
        if isinstance(event, h11.Response) and _has_length(event):
            setattr(self, _HELD_HEAD, data)
            return
        held: bytes = getattr(self, _HELD_HEAD, b"")
        if held:
            setattr(self, _HELD_HEAD, b"")
            data = held + data
        if data:
            await self.send(RawData(data=data))

    original_handle: Callable[[HTTPStream, Any], Awaitable[None]] = HTTPStream.handle

    async def handle(self: HTTPStream, event: Any) -> None:
        if _limits(self) is None:
            await original_handle(self, event)
            return
        if isinstance(event, StreamClosed) and not self.closed:
            scope: dict[str, Any] = getattr(self, "scope", {})
            gone = scope.get("extensions", {}).get(DISCONNECT)
            # CLOSED: the answer was sent, and this is the connection moving on.
            if isinstance(gone, ClientGone) and self.state is not ASGIHTTPState.CLOSED:
                gone.set()
        await original_handle(self, event)
        if isinstance(event, Request) and not self.closed:
            # The app's task is spawned but has not run yet: it finds this.
            self.scope["extensions"][DISCONNECT] = ClientGone()  # type: ignore[assignment]

    HTTPStream.handle = handle  # type: ignore[method-assign]
    H11Protocol._send_error_response = send_error_response  # type: ignore[method-assign]
    H11Protocol._send_h11_event = send_h11_event  # type: ignore[method-assign]


class _Context(WorkerContext):
    """hypercorn's worker context, knowing its live connections (to close idle ones at shutdown)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.connections: weakref.WeakSet[_Connection] = weakref.WeakSet()

    async def close_idle_connections(self) -> None:
        await self.terminated.set()
        for connection in list(self.connections):
            connection.idle_task.terminated()


class _IdleDeadline:
    """hypercorn's keep-alive timer as a deadline on its connection's read (item 7).

    hypercorn restarts a task for the timer after every answer (``TrioSingleTask``:
    a lock, and ``nursery.start`` of a new task), about 7% of a proxied turn's CPU.
    Here ``restart`` and ``stop`` only move the deadline of the read the
    connection's own task already waits in. Same methods, same meaning.
    """

    __slots__ = ("_connection", "deadline", "read_scope")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.deadline = inf
        self.read_scope: trio.CancelScope | None = None

    def _set(self, deadline: float) -> None:
        self.deadline = deadline
        if self.read_scope is not None:
            self.read_scope.deadline = deadline

    async def restart(self, task_group: object, action: object) -> None:
        config, context = self._connection.config, self._connection.context
        closing_now = context.terminated.is_set()
        self._set(-inf if closing_now else trio.current_time() + config.keep_alive_timeout)

    async def stop(self) -> None:
        self._set(inf)

    def terminated(self) -> None:
        """Shutting down: an idle connection closes now, a busy one after its answer."""
        if self.deadline != inf:
            self._set(-inf)


class _AppQueue:
    """What hypercorn's connection puts for its app (the body, ``http.disconnect``) (item 9).

    hypercorn opens a trio memory channel per request, about 1.7 KB that a
    turn held at the engine keeps; this is a list and, only while one side
    waits, an event. The same behaviour: ``put`` waits while ``limit``
    messages are queued, and both are cancellable before they act, as the
    channel's are. Unlike the channel's, they yield to the scheduler only
    when they wait (item 12): the connection task that puts yields in its
    next read, the app that gets in its answer's write or its next wait.
    """

    __slots__ = ("_limit", "_messages", "_ready", "_space")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._messages: list[Any] = []
        self._ready: trio.Event | None = None
        self._space: trio.Event | None = None

    async def put(self, message: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(self._messages) >= self._limit:
            # Not ``or``: a trio.Event refuses to be a bool. One left by a put
            # that was cancelled while it waited is shared, not replaced.
            if self._space is None:
                self._space = trio.Event()
            await self._space.wait()
        self._messages.append(message)
        if self._ready is not None:
            self._ready.set()
            self._ready = None

    async def get(self) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._messages:
            if self._ready is None:
                self._ready = trio.Event()
            await self._ready.wait()
        message = self._messages.pop(0)
        if self._space is not None:
            self._space.set()
            self._space = None
        return message


class _TaskGroup(TaskGroup):
    """hypercorn's per-connection task group, its app's messages in an ``_AppQueue``
    (items 9 and 12)."""

    async def spawn_app(
        self, app: Any, config: Config, scope: Any, send: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        queue = _AppQueue(config.max_app_queue_size)
        assert self._nursery is not None
        run_sync, run = trio.to_thread.run_sync, trio.from_thread.run
        self._nursery.start_soon(_handle, app, config, scope, queue.get, send, run_sync, run)
        return queue.put


class _Connection(TCPServer):
    """hypercorn's connection task: its keep-alive timer a deadline, not a task (item 7),
    closing at once when its client closed (item 6), waiting leaner (item 9), and
    writing without a scheduler round first (item 11) or after (item 12)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.idle_task: _IdleDeadline = _IdleDeadline(self)  # type: ignore[assignment]
        self.context.connections.add(self)  # type: ignore[attr-defined]

    async def run(self) -> None:
        # hypercorn's TCPServer.run (0.18) for a plain-TCP stream (serve accepts
        # no other), with the lighter task group.
        socket = self.stream.socket
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with _TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = ProtocolWrapper(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    False,
                    client,
                    server,
                    self.protocol_send,
                    "http/1.1",
                )
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()
            # A connection is a knot of cycles (its protocol sends through this
            # object's bound method, its deadline points back): untied, a closed
            # connection goes by reference counting, not by a garbage collection
            # (about 24 objects each), and never outlives a gc.freeze (collector.py).
            # A closed connection is no longer one shutdown closes.
            self.context.connections.discard(self)  # type: ignore[attr-defined]
            for knot in ("protocol", "idle_task", "_task_group"):
                vars(self).pop(knot, None)

    async def protocol_send(self, event: Any) -> None:
        # hypercorn's TCPServer.protocol_send (0.18), but a free lock is taken
        # without a scheduler round before the write (item 11).
        if not isinstance(event, RawData) or self.send_lock.locked():
            await super().protocol_send(event)
            return
        # Lock.acquire is this, then acquire_nowait, then the scheduler round
        # left out here; and the write yields only if it has to wait (item 12).
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_lock.acquire_nowait()
        socket = self.stream.socket
        try:
            # hypercorn shields its writes. Most answers fit the socket's buffer and
            # go out at once, synchronously, where nothing can cancel them; only a
            # wait for room needs the shield (item 13).
            sent = socket_io.write_now(socket, event.data)
            if sent < len(event.data):
                with trio.CancelScope(shield=True):
                    await socket_io.send_all(socket, event.data[sent:])
        # OSError: a reset or a closed socket, where SocketStream raised
        # BrokenResourceError or ClosedResourceError.
        except (OSError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()

    async def _read_data(self) -> None:
        idle = self.idle_task
        socket = self.stream.socket
        while True:
            data: bytes | None = None
            with trio.CancelScope(deadline=idle.deadline) as scope:
                idle.read_scope = scope
                try:
                    if self.config.read_timeout is None:  # the default: no generator per read
                        data = await socket_io.receive(socket, MAX_RECV)
                    else:
                        with trio.fail_after(self.config.read_timeout):
                            data = await socket_io.receive(socket, MAX_RECV)
                # OSError: a reset, as SocketStream would have raised it (BrokenResourceError).
                except (OSError, trio.ClosedResourceError, trio.TooSlowError):
                    break
                finally:
                    idle.read_scope = None
            if data is None:
                # Kept alive this long with no request: close, as hypercorn's
                # _idle_timeout does (shielded: the close must finish).
                with trio.CancelScope(shield=True):
                    await self._initiate_server_close()
                return
            await self.protocol.handle(RawData(data))
            if not data:
                break  # the client closed: nothing keeps this task now (item 6)
        await self.protocol.handle(Closed())


async def serve(
    app: ASGIApp,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve`` for plain-TCP binds, accepting in bursts (item 5).

    The same steps as hypercorn's ``worker_serve`` (0.18): lifespan, listen,
    serve until the trigger, then a graceful deadline for connections left.
    """
    config.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)  # type: ignore[arg-type]
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = _Context()
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            if sockets.secure_sockets or sockets.quic_sockets:
                raise ValueError("sessctl serves plain HTTP only (no certfile, no QUIC)")
            listeners: list[BurstListener] = []
            binds: list[str] = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(BurstListener(sock))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            state = ConnectionState(lifespan_state.copy())
            handler = partial(_Connection, wrapped, config, context, state)
            task_status.started(binds)
            try:
                async with trio.open_nursery() as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    serving = partial(trio.serve_listeners, handler_nursery=server_nursery)
                    nursery.start_soon(serving, handler, listeners)
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                await context.close_idle_connections()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
