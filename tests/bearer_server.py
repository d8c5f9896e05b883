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
from dataclasses import dataclass, field
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .field_kit import Engine, chat_body, error, unless_hung_up


@dataclass
class _Session:
    messages: list[dict[str, Any]] = field(default_factory=list)
    last_request: list[dict[str, Any]] | None = None
    last_answer: dict[str, Any] | None = None
    turns: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    in_flight: trio.CancelScope | None = None
    deleted: bool = False


def _key(message: dict[str, Any]) -> tuple[Any, ...]:
    content = message.get("content") or None
    calls = message.get("tool_calls") or None
    return (
        message.get("role"),
        content,
        json.dumps(calls, sort_keys=True) if calls else None,
        message.get("tool_call_id"),
    )


def create_bearer_app(upstream_url: str, *, fixed: bool = False) -> Starlette:
    """``fixed=True`` keeps a tombstone for every deleted id: the same server
    without its bug, which must get no safety failure at all."""
    sessions: dict[str, _Session] = {}
    tombstones: set[str] = set()
    engine = Engine(upstream_url)

    async def chat(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return error(401, "authentication_error", "the API key names the session")
        session_id = auth[7:].strip()
        body = chat_body(await request.body())
        if isinstance(body, Response):
            return body
        messages: list[dict[str, Any]] = body["messages"]
        if session_id in tombstones:
            return error(404, "session_not_found", "the session was deleted")
        # BUG (resurrection): unless fixed, a deleted session is forgotten, so its
        # id is "new" again and this creates it.
        session = sessions.setdefault(session_id, _Session())
        async with session.lock:
            if session.deleted:
                return error(404, "session_not_found", "the session was deleted")
            sent = [_key(m) for m in messages]
            if session.last_request is not None and sent == [_key(m) for m in session.last_request]:
                return JSONResponse(session.last_answer)  # an exact retry: replayed
            committed = [_key(m) for m in session.messages]
            if (
                [_key(m) for m in messages[: len(committed)]] != committed
                or len(messages) <= len(committed)
                or messages[-1].get("role") == "assistant"
            ):
                return error(409, "trajectory_conflict", "the request does not extend it")
            completion: dict[str, Any] | Response | None = None
            with trio.CancelScope() as turn:
                session.in_flight = turn
                completion = await unless_hung_up(request, lambda: engine.complete(body))
            session.in_flight = None
            if session.deleted:
                return error(410, "session_deleted", "the session was deleted during the turn")
            if completion is None:  # the client hung up
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
            return error(404, "session_not_found", "no such session")
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
