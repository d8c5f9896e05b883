"""HTTP plumbing: routes, body limits, client-disconnect watching, error rendering.

No session rule lives here; handlers translate HTTP into ``SessionService``
calls and ``SessionServerError`` into OpenAI-shaped JSON.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import secrets
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wire import anthropic
from wire.errors import (
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    RequestTimeout,
    RouteNotFound,
    ServerBusy,
    SessionServerError,
)
from wire.protocol import ChatRequest, parse_chat_request
from wire.streaming import error_event

from .service import SessionService
from .transport.hypercorn_compat import DISCONNECT, ClientGone

logger = logging.getLogger("refserver")
access_logger = logging.getLogger("refserver.access")

# nginx's code for "client closed request": never seen by the client, but it
# makes the access log say what happened to a turn whose caller hung up.
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 8 * 1024 * 1024
    body_read_timeout: float = 30.0
    max_turns_in_flight: int = 10_000
    """Chat requests admitted at once (queued on a session lock or at the upstream);
    one more is refused at once with 503 server_busy rather than queued unseen."""


def error_response(error: SessionServerError, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


async def read_body(request: Request, limits: HttpLimits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BodyTooLarge(f"the body exceeds the {limits.max_body_bytes}-byte limit")
    chunks: list[bytes] = []
    size = 0
    # Slow senders must not hold a connection (and memory) open forever.
    with trio.move_on_after(limits.body_read_timeout):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise BodyTooLarge(f"the body exceeds the {limits.max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)
    raise RequestTimeout(f"the body did not arrive within {limits.body_read_timeout:g} s")


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    # Hypercorn does not cancel a handler whose client went away; once the
    # body has been read, the next ASGI message can only be http.disconnect.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class until_client_leaves:
    """The block is cancelled if the request's client hangs up; yields ``check``,
    to call after each write to the client.

    On the reference server (hypercorn with ``hypercorn_compat``) the request's
    ``ClientGone`` cancels the block, so a turn held at the engine costs no task
    of its own; a hang-up found while the block itself wrote is acted on by
    ``check``. Elsewhere (an app served without the reference server's limits)
    a watcher task reads ``http.disconnect``. A class, not
    ``@asynccontextmanager``: it is entered on every turn, and contextlib's
    generator machinery was about 2% of a proxied turn's CPU.
    """

    __slots__ = ("_cancel_scope", "_gone", "_nursery", "_nursery_manager", "_receive")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        gone = scope.get("extensions", {}).get(DISCONNECT)
        self._gone = gone if isinstance(gone, ClientGone) else None
        self._receive = receive
        self._cancel_scope = trio.CancelScope()
        self._nursery_manager: contextlib.AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Callable[[], None]:
        if self._gone is not None:
            self._cancel_scope.__enter__()
            self._gone.watch(self._cancel_scope)
            return self._gone.check
        self._nursery_manager = trio.open_nursery()
        self._nursery = nursery = await self._nursery_manager.__aenter__()
        nursery.start_soon(_cancel_on_disconnect, self._receive, nursery.cancel_scope)
        return lambda: None

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._gone is not None:
            self._gone.watch(None)
            return self._cancel_scope.__exit__(kind, error, tb)
        assert self._nursery is not None
        assert self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()
        return bool(await self._nursery_manager.__aexit__(kind, error, tb))


def create_app(
    service: SessionService,
    limits: HttpLimits | None = None,
    *,
    access_log: bool = False,
    parse: Callable[[bytes], ChatRequest] = parse_chat_request,
) -> ServerBoundary:
    limits = limits or HttpLimits()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def create_session(request: Request) -> Response:
        await read_body(request, limits)  # drained and size-checked, content ignored
        return JSONResponse({"session_id": service.create()}, status_code=201)

    async def session_resource(request: Request) -> Response:
        # One route for both methods, so a 405 lists every allowed method.
        session_id = request.path_params["session_id"]
        if request.method == "DELETE":
            await service.delete(session_id)
            return Response(status_code=204)
        return JSONResponse(service.get(session_id))

    turns = trio.CapacityLimiter(limits.max_turns_in_flight)

    async def turn(
        request: Request, parse_turn: Callable[[bytes], ChatRequest], spelling: Spelling
    ) -> Response:
        """One chat turn, in whichever API ``spelling`` writes (errors included)."""
        try:
            chat_request = parse_turn(await read_body(request, limits))
            try:
                turns.acquire_nowait()
            except trio.WouldBlock:
                raise ServerBusy(
                    f"{limits.max_turns_in_flight} turns are in flight (--max-turns-in-flight); "
                    "nothing was done: retry later"
                ) from None
        except SessionServerError as error:
            return spelling.error_response(error)
        if chat_request.stream:
            # The turn runs as the response is sent; it releases the slot.
            return StreamedTurn(
                service, request.path_params["session_id"], chat_request, turns.release, spelling
            )
        try:
            return await run_chat(request, chat_request, spelling)
        finally:
            turns.release()

    async def run_chat(request: Request, chat_request: ChatRequest, spelling: Spelling) -> Response:
        response: Response | None = None
        async with until_client_leaves(request.scope, request.receive):
            try:
                completion = await service.chat(request.path_params["session_id"], chat_request)
                response = spelling.answer(completion)
            except SessionServerError as error:
                response = spelling.error_response(error)
        if response is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return response

    async def chat_completions(request: Request) -> Response:
        return await turn(request, parse, OpenAISpelling())

    async def messages(request: Request) -> Response:
        # Anthropic's Messages API on the same session core: errors in its shape.
        return await turn(request, anthropic.parse_messages_request, AnthropicSpelling())

    router = Router(
        [
            Route("/healthz", {"GET": healthz}),
            Route("/sessions", {"POST": create_session}),
            Route("/sessions/{session_id}", {"GET": session_resource, "DELETE": session_resource}),
            Route("/sessions/{session_id}/v1/chat/completions", {"POST": chat_completions}),
            Route("/sessions/{session_id}/v1/messages", {"POST": messages}),
        ]
    )
    return ServerBoundary(router, access_log=access_log, turns=turns)


Handler = Callable[[Request], Awaitable[Response]]


class Route:
    """A path with ``{name}`` parameters (one path segment each) and its handlers by method."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path))
        self.pattern = re.compile(pattern)
        # As HTTP has it: a resource that answers GET answers HEAD.
        self.handlers = {"HEAD": handlers["GET"], **handlers} if "GET" in handlers else handlers


class Router:
    """The routes, matched by hand, and ``SessionServerError`` rendered as its answer.

    Starlette's application (its router, middleware stack and exception
    handlers) cost about a tenth of a proxied turn's CPU and a frame or more
    per layer for every turn in flight; the server needs five routes. An
    unknown path is 404 ``not_found`` and a known one with another method 405
    ``method_not_allowed`` with ``Allow``; a trailing slash is a 404, never a
    redirect (one would be built from the request's Host header). Anything
    else a handler raises is a bug of ours, left to ``ServerBoundary``.
    """

    def __init__(self, routes: list[Route]) -> None:
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            await _refuse_websocket(scope, send)
            return
        method, path = scope["method"], scope["path"]
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is not None:
                break
        else:
            await error_response(RouteNotFound(f"no route {method} {path}"))(scope, receive, send)
            return
        handler = route.handlers.get(method)
        if handler is None:
            refusal = MethodNotAllowed(f"{method} is not allowed on {path}")
            allowed = {"allow": ", ".join(route.handlers)}
            await error_response(refusal, headers=allowed)(scope, receive, send)
            return
        scope["path_params"] = match.groupdict()
        try:
            response = await handler(Request(scope, receive))
        except SessionServerError as error:
            response = error_response(error)
        await response(scope, receive, send)


async def _refuse_websocket(scope: Scope, send: Send) -> None:
    """No route speaks WebSocket: a handshake is refused before it is accepted, with
    a 400 in the OpenAI shape where the server can send one (else hypercorn's 403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    error = InvalidRequest(f"{scope['path']} does not speak WebSocket; use HTTP")
    body = json.dumps(error.to_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send(
        {"type": "websocket.http.response.start", "status": error.status_code, "headers": headers}
    )
    await send({"type": "websocket.http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: say so, so hypercorn does not log its absence."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


HEAD_WRITE_TIMEOUT = 5.0
"""Seconds the head of a streamed answer may take to write, shielded from cancellation."""

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    # Proxies such as nginx would otherwise buffer the stream.
    (b"x-accel-buffering", b"no"),
]


class Spelling(Protocol):
    """How a turn is written on the wire in one API: the session core answers
    with the engine's completion, or relays its chunks (OpenAI's ``data:``
    events); an API spells answers, events and errors its way."""

    def answer(self, completion: dict[str, Any]) -> Response: ...

    def events(self, data: bytes) -> list[bytes]: ...

    def error_event(self, error: SessionServerError) -> bytes: ...

    def error_response(self, error: SessionServerError) -> Response: ...


class OpenAISpelling:
    def answer(self, completion: dict[str, Any]) -> Response:
        return JSONResponse(completion)

    def events(self, data: bytes) -> list[bytes]:
        return [data]

    def error_event(self, error: SessionServerError) -> bytes:
        return error_event(error.to_body())

    def error_response(self, error: SessionServerError) -> Response:
        return error_response(error)


class AnthropicSpelling:
    """Anthropic's Messages API: a ``message``, its events (``anthropic.EventWriter``),
    and its error shape."""

    def __init__(self) -> None:
        self._writer = anthropic.EventWriter()
        self._finish_reason: str | None = None

    def events(self, data: bytes) -> list[bytes]:
        payload = data.removeprefix(b"data: ").strip()
        if payload == b"[DONE]":
            return self._writer.finish(self._finish_reason)
        chunk = json.loads(payload)  # the upstream client checked it already
        for choice in chunk.get("choices") or []:
            self._finish_reason = choice.get("finish_reason") or self._finish_reason
        return self._writer.chunk(chunk)

    def answer(self, completion: dict[str, Any]) -> Response:
        return JSONResponse(anthropic.to_message(completion))

    def error_event(self, error: SessionServerError) -> bytes:
        return anthropic.error_event(error)

    def error_response(self, error: SessionServerError) -> Response:
        return JSONResponse(anthropic.error_body(error), status_code=error.status_code)


class StreamedTurn(Response):
    """A streamed chat turn, run as the response is sent.

    Until the first event, the turn can still fail as any turn does, with its
    HTTP status and a JSON error. Once the first event is out (status 200), a
    failure ends the stream with an error event and no ``[DONE]``. A client
    that hangs up cancels the turn, as for a non-streamed one.
    """

    def __init__(
        self,
        service: SessionService,
        session_id: str,
        chat_request: ChatRequest,
        release: Callable[[], None],
        spelling: Spelling,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self._service = service
        self._session_id = session_id
        self._chat_request = chat_request
        self._release = release
        self._spelling = spelling

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._run(scope, receive, send)
        finally:
            self._release()

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        checks: list[Callable[[], None]] = []  # the hang-up check, once the turn runs

        spelling = self._spelling

        async def relay(data: bytes) -> None:
            for spelled in spelling.events(data):
                await write(spelled)

        async def write(data: bytes) -> None:
            nonlocal started
            if not started:
                started = True
                # Shielded: hypercorn moves its own state to "response" only after
                # the head is written, so a DELETE or hang-up cancelling that write
                # would leave it sending a 500 head into a started response (and
                # crash the connection's task). A head is a few hundred bytes.
                with trio.CancelScope(shield=True) as head:
                    head.deadline = trio.current_time() + HEAD_WRITE_TIMEOUT
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                    )
            await send({"type": "http.response.body", "body": data, "more_body": True})
            for check in checks:
                check()  # a hang-up hypercorn found during this write

        async with until_client_leaves(scope, receive) as check_client:
            checks.append(check_client)
            try:
                tail = await self._service.chat_stream(self._session_id, self._chat_request, relay)
            except SessionServerError as error:
                if not started:
                    await spelling.error_response(error)(scope, receive, send)
                else:
                    await send({"type": "http.response.body", "body": spelling.error_event(error)})
            else:
                for data in tail:
                    await relay(data)
                await send({"type": "http.response.body", "body": b""})


# A client that hangs up while its response is being written is not a server
# error. Hypercorn can even race its own EOF against our send, which surfaces
# as BusyResourceError.
CLIENT_GONE = (
    trio.BrokenResourceError,
    trio.BusyResourceError,
    trio.ClosedResourceError,
    ClientDisconnect,  # hung up while its body was still arriving
)


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", "-"))


def internal_error_body(request_id: str) -> dict[str, Any]:
    return {
        "error": {
            "type": "server_error",
            "code": "server_error",
            "message": f"internal error (request {request_id}; the server log has its line)",
            "request_id": request_id,
        }
    }


class ServerBoundary:
    """The outermost ASGI layer: request ids, the access log, and the last resort.

    Every request gets an id (``x-request-id`` on the answer). An exception
    that escapes everything below is a bug of ours: it becomes a 500 in the
    OpenAI shape (if nothing was sent yet) and one log line with the request
    id and where it was raised, and it goes no further, so hypercorn does not
    log a second traceback. ``unexpected`` counts them; the fuzz suite asserts
    that their log line never appears. A client that hung up mid-answer is not an error at all.
    """

    def __init__(
        self, app: ASGIApp, *, access_log: bool, turns: trio.CapacityLimiter | None = None
    ) -> None:
        self._app = app
        self._access_log = access_log
        # Unique per server run, not secret: a counter costs no system call per
        # request (``secrets`` read the kernel's random source for each).
        self._id_prefix = secrets.token_hex(3)
        self._request_numbers = itertools.count(1)
        self._turns = turns
        self.unexpected = 0
        self.requests_in_flight = 0
        """HTTP requests being answered (a full collection waits for none)."""
        self.requests_started = 0
        """HTTP requests ever begun (a full collection waits for a lull)."""

    @property
    def turns_in_flight(self) -> int:
        """Chat turns admitted and not yet ended (the garbage collector's cue)."""
        return 0 if self._turns is None else int(self._turns.borrowed_tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = f"{self._id_prefix}{next(self._request_numbers):06x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status: int | None = None
        sent_bytes = 0
        started_at = trio.current_time()

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        self.requests_in_flight += 1
        self.requests_started += 1
        try:
            await self._app(scope, receive, send_with_id)
        except CLIENT_GONE:
            logger.debug(
                "request %s: the client went away while %s was answered", request_id, scope["path"]
            )
        except Exception as error:
            self.unexpected += 1
            logger.error(
                "request %s: unexpected %s at %s on %s %s: %s",
                request_id,
                type(error).__name__,
                _where(error),
                scope["method"],
                scope["path"],
                str(error)[:200],
            )
            logger.debug("request %s: traceback", request_id, exc_info=error)
            if status is None:
                status = 500
                body = json.dumps(internal_error_body(request_id)).encode()
                with contextlib.suppress(*CLIENT_GONE):
                    await send_with_id(
                        {
                            "type": "http.response.start",
                            "status": 500,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                            ],
                        }
                    )
                    await send_with_id({"type": "http.response.body", "body": body})
        finally:
            self.requests_in_flight -= 1
            if self._access_log:
                client = scope.get("client") or ("-", 0)
                access_logger.info(
                    '%s:%s "%s %s %s" %s %dB %.3fs %s',
                    client[0],
                    client[1],
                    scope["method"],
                    scope["path"],
                    scope.get("http_version", "1.1"),
                    status if status is not None else "-",
                    sent_bytes,
                    trio.current_time() - started_at,
                    request_id,
                )


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
