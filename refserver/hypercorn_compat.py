"""Two answers hypercorn gives on its own kept to the contract, and its answers written at once.

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

hypercorn has no hook for any of these, so they are small wrappers around
methods of its HTTP/1.1 protocol and stream classes, active only on servers whose config
carries ``SESSCTL_LIMITS`` (others in the same process are untouched).
``tests/test_bad_input.py`` checks the first two over raw sockets, and every
test of the reference server goes through the third, so a hypercorn release
that renames these methods fails a test, not a user.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.protocol.events import Request, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

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
