"""A session server with the shape of the seed's server (radixark/miles), for tests.

Written apart from the reference, as that server is: one lock per session held
from validation across the engine call to the commit (so no phantom commit can
happen on it), a GET that returns records (``{"records": [{"request",
"response"}]}``), only tool results may follow an answer, errors that are plain
strings (``{"error": "..."}``), 400 for a request that does not extend the
trajectory, engine failures passed to the agent, ``stream: true`` refused. Its
conventions are those of ``profiles/records-tool-400.yaml``.

And the breakage seen on that server, each a switch of ``Faults``:

* ``refuse_null_tool_content`` (on by default, as on the server): an engine
  answer with tool calls and ``content: null`` is refused with a 502 quoting
  the server's own message, because it was built on an SGLang that sends "";
* ``first_chat_fails``: the first chat of every session is refused with a 502,
  whatever it is (the pre-flight's second try on a session succeeds);
* ``commits_garbage``: what it commits for a user message has a list for its
  role (``{"role": ["user"]}``);
* ``refuse_tool_calls``: any engine answer with a tool call is refused (a 502),
  whatever its content: with tool results the only turns it takes after an
  answer, no second turn can ever be committed;
* ``rollback_before_engine``: a request that replaces the last turn (a one-step
  rollback) drops that turn before the engine is called, and an engine failure
  then loses a turn already answered 200 (the defect missed in the field);
* ``big_body_blocks``: a body over 8 MiB blocks the event loop for that many
  seconds before the 413, as a synchronous parse does;
* ``content_length_bug``: the answer to a chat that offered tools claims 4
  bytes more than it sends, as a server that forwards the engine's
  Content-Length over a tool call it re-rendered does: a malformed answer.

None of these is a race: a verdict on this server must name them by cause,
never under a scenario's headline property.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refserver.server import serve_asgi

from .field_kit import Engine, chat_body, unless_hung_up

NULL_CONTENT_REFUSAL = (
    "assistant message content is None, when tool call parser failed SGLang should still "
    "return an empty content rather than None. Please check your modification."
)


@dataclass(frozen=True)
class Faults:
    refuse_null_tool_content: bool = True
    first_chat_fails: bool = False
    commits_garbage: bool = False
    content_length_bug: bool = False
    refuse_tool_calls: bool = False
    rollback_before_engine: bool = False
    big_body_blocks: float = 0.0
    """Seconds a body over 8 MiB blocks the event loop (a synchronous parse) before
    the 413: no other request is served meanwhile."""


@dataclass
class _Session:
    records: list[dict[str, Any]] = field(default_factory=list)
    chats: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    in_flight: trio.CancelScope | None = None
    deleted: bool = False


def _plain_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _key(message: Any) -> str:
    if not isinstance(message, dict):
        return json.dumps(message)
    wanted = {k: message.get(k) for k in ("role", "content", "tool_calls", "tool_call_id")}
    wanted["content"] = wanted["content"] or None
    return json.dumps(wanted, sort_keys=True)


def _path(record: dict[str, Any]) -> list[Any]:
    return [*record["request"]["messages"], record["response"]["choices"][0]["message"]]


def _extends(messages: list[Any], committed: list[Any]) -> bool:
    head = [_key(m) for m in messages[: len(committed)]]
    return len(messages) > len(committed) and head == [_key(m) for m in committed]


def create_lockstep_app(upstream_url: str, faults: Faults = Faults()) -> Starlette:
    sessions: dict[str, _Session] = {}
    engine = Engine(upstream_url)

    async def create(request: Request) -> Response:
        session_id = secrets.token_hex(16)
        sessions[session_id] = _Session()
        return JSONResponse({"session_id": session_id})

    async def chat(request: Request) -> Response:
        session = sessions.get(request.path_params["session_id"])
        if session is None or session.deleted:
            return _plain_error(404, "session not found")
        raw = await request.body()
        if faults.big_body_blocks and len(raw) > 8 * 1024 * 1024:
            time.sleep(faults.big_body_blocks)  # noqa: ASYNC251 (the whole server waits: the fault)
        body = chat_body(raw)
        if isinstance(body, Response):
            return _plain_error(body.status_code, json.loads(bytes(body.body))["error"]["message"])
        messages: list[dict[str, Any]] = body["messages"]
        async with session.lock:  # held across the engine call: no phantom commit here
            if session.deleted:
                return _plain_error(404, "session not found")
            session.chats += 1
            if faults.first_chat_fails and session.chats == 1:
                return _plain_error(502, "engine warm-up failed for this session")
            committed = _path(session.records[-1]) if session.records else []
            rewound = _path(session.records[-2]) if len(session.records) >= 2 else []
            if (
                faults.rollback_before_engine
                and len(session.records) >= 2
                and _extends(messages, rewound)
                and not _extends(messages, committed)
            ):
                # A request that replaces the last turn: rolled back at once, before
                # the engine is called, and not restored if the engine then fails.
                session.records.pop()
                committed = rewound
            new = messages[len(committed) :]
            if [_key(m) for m in messages[: len(committed)]] != [_key(m) for m in committed]:
                return _plain_error(400, "the request does not extend the trajectory")
            if not new or (committed and any(m.get("role") != "tool" for m in new)):
                return _plain_error(400, "only tool results may follow an answer")
            completion: dict[str, Any] | Response | None = None
            with trio.CancelScope() as turn:
                session.in_flight = turn
                completion = await unless_hung_up(request, lambda: engine.complete(body))
            session.in_flight = None
            if session.deleted:
                return _plain_error(410, "session deleted during the turn")
            if completion is None:
                return Response(status_code=499)
            if isinstance(completion, Response):
                return _plain_error(completion.status_code, "the engine failed")
            answer = completion["choices"][0]["message"]
            if (
                faults.refuse_null_tool_content
                and answer.get("tool_calls")
                and (answer.get("content") is None)
            ):
                return _plain_error(502, NULL_CONTENT_REFUSAL)
            if faults.refuse_tool_calls and answer.get("tool_calls"):
                return _plain_error(502, "tool calls are not supported by this deployment")
            stored = [dict(m) for m in messages]
            if faults.commits_garbage:
                for message in stored:
                    if message.get("role") == "user":
                        message["role"] = [message["role"]]
            session.records.append({"request": {"messages": stored}, "response": completion})
            if faults.content_length_bug and body.get("tools"):
                rendered = json.dumps(completion).encode()
                return Response(
                    rendered,
                    media_type="application/json",
                    headers={"content-length": str(len(rendered) + 4)},
                )
            return JSONResponse(completion)

    async def session_resource(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        session = sessions.get(session_id)
        if session is None or session.deleted:
            return _plain_error(404, "session not found")
        if request.method == "DELETE":
            session.deleted = True
            if session.in_flight is not None:
                session.in_flight.cancel()
            del sessions[session_id]
            return Response(status_code=204)
        return JSONResponse({"session_id": session_id, "records": session.records})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{session_id}/v1/chat/completions", chat, methods=["POST"]),
            Route("/sessions/{session_id}", session_resource, methods=["GET", "DELETE"]),
        ]
    )


async def serve_lockstep(
    upstream_url: str,
    faults: Faults = Faults(),
    *,
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve it on loopback; ``task_status.started`` gets its base URL."""
    await serve_asgi(
        create_lockstep_app(upstream_url, faults), "127.0.0.1", port, task_status=task_status
    )


def main() -> None:
    """``python -m tests.lockstep_server UPSTREAM PORT [FAULT ...]``: a process of its
    own, as the CLI tests run it."""
    import sys

    upstream, port, *names = sys.argv[1:]
    faults = Faults(**{name: True for name in names if not name.startswith("no-")})
    if "no-refuse_null_tool_content" in names:
        faults = Faults(**{**faults.__dict__, "refuse_null_tool_content": False})
    trio.run(partial(serve_lockstep, upstream, faults, port=int(port)))


if __name__ == "__main__":
    main()
