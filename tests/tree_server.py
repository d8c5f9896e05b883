"""A session server whose trajectories are trees, for tests.

Written apart from the reference, in the style of RL rollout servers that keep
every branch an agent explores: a turn whose history leaves the path last
committed does not conflict, it starts a branch from where it diverges, and two
writers at once both commit, as siblings. Its conventions
(``profiles/tree-turns.yaml``):

* ``POST /sessions`` answers 200 with ``{"id": ...}``; the health route is ``/health``;
* ``GET /sessions/{id}`` shows only the active path (the branch committed last),
  with no count of turns; ``GET /sessions/{id}/turns`` lists every committed turn
  as a record (``{"request": {"messages"}, "response": <completion>}``);
* a request whose history names an answer the session never gave is refused
  with 409 ``trajectory_conflict``; an exact retry of any turn replays its answer;
* a deleted session answers 410 ``session_closed`` (it was reclaimed); an id it
  never had, 404;
* ``stream: true`` is refused with 400.

It has exactly one planted safety bug, a split read-modify-write of the tree:

* a turn reads the list of turns before its engine call and writes that list,
  plus itself, back after it; a sibling committed meanwhile is overwritten. Both
  writers got 200, and one of the turns is in no branch.

Everything else it does right: a DELETE cancels every turn in flight on the
session (410) at once, hang-ups commit nothing, engine failures are retried.
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
class _Tree:
    records: list[dict[str, Any]] = field(default_factory=list)
    """Every committed turn: its request's messages and the engine's completion."""
    in_flight: set[trio.CancelScope] = field(default_factory=set)
    closed: bool = False


def _key(messages: list[dict[str, Any]]) -> str:
    """A path, compared by what the agent can see of each message."""
    return json.dumps(
        [(m.get("role"), m.get("content") or None, m.get("tool_calls") or None) for m in messages],
        sort_keys=True,
    )


def _path(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [*record["request"]["messages"], record["response"]["choices"][0]["message"]]


def create_tree_app(upstream_url: str, *, fixed: bool = False) -> Starlette:
    """``fixed=True`` appends each turn to the tree as it is at the commit: the
    same server without its bug, which must get no safety failure at all."""
    trees: dict[str, _Tree] = {}
    reclaimed: set[str] = set()
    engine = Engine(upstream_url)

    def find(session_id: str) -> _Tree | Response:
        if session_id in reclaimed:
            return error(410, "session_closed", "the session was reclaimed")
        tree = trees.get(session_id)
        return tree if tree is not None else error(404, "session_not_found", "no such session")

    async def create(request: Request) -> Response:
        session_id = secrets.token_hex(12)
        trees[session_id] = _Tree()
        return JSONResponse({"id": session_id})

    async def chat(request: Request) -> Response:
        # The body first, as frameworks do: hypercorn crashes the server if the
        # client hangs up mid-body while an answer is being written.
        raw = await request.body()
        found = find(request.path_params["session_id"])
        if isinstance(found, Response):
            return found
        tree = found
        body = chat_body(raw)
        if isinstance(body, Response):
            return body
        messages: list[dict[str, Any]] = body["messages"]
        if messages[-1].get("role") == "assistant":
            return error(409, "trajectory_conflict", "the request ends with an answer")
        for record in tree.records:
            if _key(record["request"]["messages"]) == _key(messages):
                return JSONResponse(record["response"])  # an exact retry: replayed
        answered = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if answered:
            history = _key(messages[: answered[-1] + 1])
            if all(_key(_path(record)) != history for record in tree.records):
                return error(409, "trajectory_conflict", "the history names an unknown answer")
        # BUG (split read-modify-write): unless fixed, the turns are read here,
        # before the engine call, and written back after it.
        before = list(tree.records)
        completion: dict[str, Any] | Response | None = None
        with trio.CancelScope() as turn:
            tree.in_flight.add(turn)
            completion = await unless_hung_up(request, lambda: engine.complete(body))
        tree.in_flight.discard(turn)
        if tree.closed:
            return error(410, "session_closed", "the session was closed during the turn")
        if completion is None:  # the client hung up
            return Response(status_code=499)
        if isinstance(completion, Response):
            return completion
        record = {"request": {"messages": messages}, "response": completion}
        tree.records = [*(tree.records if fixed else before), record]
        return JSONResponse(completion)

    async def session_resource(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        found = find(session_id)
        if isinstance(found, Response):
            return found
        if request.method == "DELETE":
            found.closed = True
            for turn in found.in_flight:
                turn.cancel()
            del trees[session_id]
            reclaimed.add(session_id)
            return Response(status_code=204)
        active = _path(found.records[-1]) if found.records else []
        return JSONResponse({"id": session_id, "messages": active})

    async def turns(request: Request) -> Response:
        found = find(request.path_params["session_id"])
        if isinstance(found, Response):
            return found
        return JSONResponse({"records": found.records})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{session_id}", session_resource, methods=["GET", "DELETE"]),
            Route("/sessions/{session_id}/turns", turns, methods=["GET"]),
            Route("/sessions/{session_id}/v1/chat/completions", chat, methods=["POST"]),
        ]
    )
