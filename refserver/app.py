"""HTTP plumbing: routes, body limits, client-disconnect watching, error rendering.

No session rule lives here; handlers translate HTTP into ``SessionService``
calls and ``SessionServerError`` into OpenAI-shaped JSON.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import (
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    RequestTimeout,
    RouteNotFound,
    SessionServerError,
)
from .protocol import parse_chat_request
from .service import SessionService

logger = logging.getLogger("refserver")

# nginx's code for "client closed request": never seen by the client, but it
# makes the access log say what happened to a turn whose caller hung up.
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 8 * 1024 * 1024
    body_read_timeout: float = 30.0


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


def create_app(service: SessionService, limits: HttpLimits | None = None) -> ASGIApp:
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

    async def chat_completions(request: Request) -> Response:
        chat_request = parse_chat_request(await read_body(request, limits))
        response: Response | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, request.receive, nursery.cancel_scope)
            try:
                completion = await service.chat(request.path_params["session_id"], chat_request)
                response = JSONResponse(completion)
            except SessionServerError as error:
                response = error_response(error)
            nursery.cancel_scope.cancel()
        if response is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return response

    async def on_session_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SessionServerError)
        return error_response(exc)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error: SessionServerError
        if exc.status_code == 404:
            error = RouteNotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:
            error = InvalidRequest(str(exc.detail))
        return error_response(error, headers=dict(exc.headers or {}))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        if isinstance(exc, CLIENT_GONE):
            return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is there to read it
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        body: dict[str, Any] = {
            "error": {"type": "server_error", "code": "server_error", "message": "internal error"}
        }
        return JSONResponse(body, status_code=500)

    starlette = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/sessions", create_session, methods=["POST"]),
            Route("/sessions/{session_id}", session_resource, methods=["GET", "DELETE"]),
            Route("/sessions/{session_id}/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={
            SessionServerError: on_session_error,
            HTTPException: on_http_exception,
            Exception: on_unexpected,
        },
    )
    return _QuietWhenClientGone(starlette)


# A client that hangs up while its response is being written is not a server
# error. Hypercorn can even race its own EOF against our send, which surfaces
# as BusyResourceError.
CLIENT_GONE = (
    trio.BrokenResourceError,
    trio.BusyResourceError,
    trio.ClosedResourceError,
    ClientDisconnect,  # hung up while its body was still arriving
)


class _QuietWhenClientGone:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._app(scope, receive, send)
        except CLIENT_GONE:
            logger.debug("client went away while %s was answered", scope.get("path"))
