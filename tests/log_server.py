"""A session server where every call is a record, for tests.

Written apart from the reference, in the style of RL rollout servers that log
every LLM call of an agent (the trajectory is rebuilt by the trainer later):

* ``POST /sessions`` answers 201 ``{"session_id"}``; the agent's base URL is
  ``/sessions/{id}/v1``;
* every chat is sent to the engine and recorded, whatever its history:
  concurrent chats all run, an exact retry is a second record, a divergent
  request is one more record; nothing is refused for its history;
* ``GET /sessions/{id}`` lists the records (``{"request": {"messages"},
  "response": <completion>}``); ``DELETE`` cancels the calls in flight (410) and
  a deleted session answers 404;
* ``stream: true`` is refused with 400.

Its one planted bug, unless ``fixed``: a call whose request equals the last
record's is recorded in its place (a "dedupe" of retries), so an exact retry
answered 200 is one record where there were two calls.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .field_kit import Engine, chat_body, error, unless_hung_up


@dataclass
class _Log:
    records: list[dict[str, Any]] = field(default_factory=list)
    in_flight: set[trio.CancelScope] = field(default_factory=set)
    closed: bool = False


def create_log_app(upstream_url: str, *, fixed: bool = False) -> Starlette:
    logs: dict[str, _Log] = {}
    engine = Engine(upstream_url)

    async def create(request: Request) -> Response:
        session_id = secrets.token_hex(16)
        logs[session_id] = _Log()
        return JSONResponse({"session_id": session_id}, status_code=201)

    async def chat(request: Request) -> Response:
        log = logs.get(request.path_params["session_id"])
        if log is None:
            return error(404, "session_not_found", "no such session")
        body = chat_body(await request.body())
        if isinstance(body, Response):
            return body
        completion: dict[str, Any] | Response | None = None
        with trio.CancelScope() as call:
            log.in_flight.add(call)
            completion = await unless_hung_up(request, lambda: engine.complete(body))
        log.in_flight.discard(call)
        if log.closed:
            return error(410, "session_deleted", "the session was deleted during the call")
        if completion is None:
            return Response(status_code=499)  # the client hung up: nothing recorded
        if isinstance(completion, Response):
            return completion
        record = {"request": {"messages": body["messages"]}, "response": completion}
        last = log.records[-1] if log.records else None
        same = last is not None and json.dumps(last["request"]) == json.dumps(record["request"])
        # BUG (dedupe): unless fixed, a retry of the last call replaces its record.
        if same and not fixed:
            log.records[-1] = record
        else:
            log.records.append(record)
        return JSONResponse(completion)

    async def session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        log = logs.get(session_id)
        if log is None:
            return error(404, "session_not_found", "no such session")
        if request.method == "DELETE":
            log.closed = True
            for call in log.in_flight:
                call.cancel()
            del logs[session_id]
            return Response(status_code=204)
        return JSONResponse({"session_id": session_id, "records": log.records})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/healthz", health, methods=["GET"]),
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{session_id}", session, methods=["GET", "DELETE"]),
            Route("/sessions/{session_id}/v1/chat/completions", chat, methods=["POST"]),
        ]
    )
