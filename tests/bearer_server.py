"""A session server whose agents name their session with their API key, for tests.

Written apart from the reference, in the style of servers where the agent's
OpenAI API key *is* the session: the agent POSTs ``/v1/chat/completions`` with
``Authorization: Bearer <session id>``, and the first request that names a new
id creates the session (there is no ``POST /sessions``). The trainer reads and
deletes sessions at ``/sessions/{id}``. Its conventions
(``profiles/bearer-implicit.yaml``): bearer addressing, implicit creation,
``stream: true`` refused with 400, errors in the OpenAI shape.

It has exactly one planted safety bug, the one reported in the field as
hundreds of orphaned sessions an hour:

* resurrection: a DELETE forgets the session entirely, so a request that names
  the id afterwards (an agent that did not notice, a retry in flight) creates
  it again, as if it were new.

Everything else it does right: one lock per session held through the engine
call to the commit, a DELETE that cancels the turn in flight (410) and makes
queued turns answer 404, hang-ups that commit nothing, exact retries replayed,
conflicts refused with 409, engine failures retried.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_BODY = 8 * 1024 * 1024
ATTEMPTS = 3


@dataclass
class _Session:
    messages: list[dict[str, Any]] = field(default_factory=list)
    last_request: list[dict[str, Any]] | None = None
    last_answer: dict[str, Any] | None = None
    turns: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    in_flight: trio.CancelScope | None = None
    deleted: bool = False


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def _key(message: dict[str, Any]) -> tuple[Any, ...]:
    content = message.get("content") or None
    calls = message.get("tool_calls") or None
    return (
        message.get("role"),
        content,
        json.dumps(calls, sort_keys=True) if calls else None,
        message.get("tool_call_id"),
    )


def _valid(messages: Any) -> bool:
    if not isinstance(messages, list) or not messages:
        return False
    for message in messages:
        if not isinstance(message, dict):
            return False
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            return False
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            return False
        if not isinstance(message.get("tool_calls") or [], list):
            return False
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                return False
    return True


def _parse(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity, no number that overflows."""

    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    def number(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            raise ValueError(f"{text} overflows")
        return value

    return json.loads(raw, parse_constant=refuse, parse_float=number)


def create_bearer_app(upstream_url: str, *, fixed: bool = False) -> Starlette:
    """``fixed=True`` keeps a tombstone for every deleted id: the same server
    without its bug, which must get no safety failure at all."""
    sessions: dict[str, _Session] = {}
    tombstones: set[str] = set()
    engine = httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    async def call_engine(body: dict[str, Any]) -> dict[str, Any] | Response:
        failure = "no attempt"
        for attempt in range(ATTEMPTS):
            if attempt:
                await trio.sleep(0.01 * attempt)
            try:
                answer = await engine.post(f"{upstream_url}/chat/completions", json=body)
            except httpx.TransportError as error:
                failure = type(error).__name__
                continue
            if answer.status_code in (429, 503):
                failure = f"engine {answer.status_code}"
                continue
            if answer.status_code != 200:
                return _error(502, "upstream_error", f"the engine answered {answer.status_code}")
            try:
                completion = answer.json()
                choice = completion["choices"][0]
                message = choice["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                return _error(502, "upstream_error", "the engine's answer is not a completion")
            if choice.get("finish_reason") == "abort":
                failure = "aborted"
                continue
            if not isinstance(message, dict) or not _valid([message]):
                return _error(502, "upstream_error", "the engine's message is not valid")
            return dict(completion)
        return _error(502, "upstream_error", f"the engine failed: {failure}")

    async def chat(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return _error(401, "authentication_error", "the API key names the session")
        session_id = auth[7:].strip()
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _error(413, "request_too_large", "the body is over 8 MiB")
        try:
            body = _parse(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _error(400, "invalid_request", "the body is not JSON")
        if not isinstance(body, dict) or not _valid(body.get("messages")):
            return _error(400, "invalid_request", "messages must be a list of messages")
        if body.get("stream") is True:
            return _error(400, "invalid_request", "stream: true is not supported")
        messages: list[dict[str, Any]] = body["messages"]
        if session_id in tombstones:
            return _error(404, "session_not_found", "the session was deleted")
        # BUG (resurrection): unless fixed, a deleted session is forgotten, so its
        # id is "new" again and this creates it.
        session = sessions.setdefault(session_id, _Session())
        async with session.lock:
            if session.deleted:
                return _error(404, "session_not_found", "the session was deleted")
            sent = [_key(m) for m in messages]
            if session.last_request is not None and sent == [_key(m) for m in session.last_request]:
                return JSONResponse(session.last_answer)  # an exact retry: replayed
            committed = [_key(m) for m in session.messages]
            if (
                [_key(m) for m in messages[: len(committed)]] != committed
                or len(messages) <= len(committed)
                or messages[-1].get("role") == "assistant"
            ):
                return _error(409, "trajectory_conflict", "the request does not extend it")
            completion: dict[str, Any] | Response | None = None
            hung_up = False
            with trio.CancelScope() as turn:
                session.in_flight = turn
                async with trio.open_nursery() as nursery:

                    async def watch_disconnect() -> None:
                        nonlocal hung_up
                        while (await request.receive())["type"] != "http.disconnect":
                            pass
                        hung_up = True
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch_disconnect)
                    completion = await call_engine(body)
                    nursery.cancel_scope.cancel()
            session.in_flight = None
            if session.deleted:
                return _error(410, "session_deleted", "the session was deleted during the turn")
            if hung_up or completion is None:
                return Response(status_code=499)
            if isinstance(completion, Response):
                return completion
            session.messages = [*messages, completion["choices"][0]["message"]]
            session.last_request, session.last_answer = messages, completion
            session.turns += 1
            return JSONResponse(completion)

    async def session_resource(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        session = sessions.get(session_id)
        if session is None or session.deleted:
            return _error(404, "session_not_found", "no such session")
        if request.method == "DELETE":
            session.deleted = True
            if session.in_flight is not None:
                session.in_flight.cancel()
            del sessions[session_id]
            if fixed:
                tombstones.add(session_id)  # the bug is that this is not done
            return Response(status_code=204)
        state = {"session_id": session_id, "messages": session.messages}
        return JSONResponse({**state, "num_assistant": session.turns})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/healthz", health, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/sessions/{session_id}", session_resource, methods=["GET", "DELETE"]),
        ]
    )
