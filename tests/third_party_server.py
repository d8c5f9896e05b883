"""A session server in the style of a widely forked third-party one, for tests.

It differs from docs/contract.md in its conventions (profiles/records-tool-400.yaml):
create answers 200, the health route is /health, GET returns records, only tool
messages may follow an assistant turn, an exact retry regenerates (except of
the first turn, which it refuses with 400), rejections are 400 with
plain-string errors, malformed JSON gets a 500, ``stream: true`` gets a "fake
stream" (the whole answer in one chunk once the engine is done), and messages
are checked by a pydantic model the FastAPI way:
ill-typed fields get 422 with ``detail``, while lax coercions pass
(``stream: "false"`` is false, a missing ``content`` is null). Like any server
on Python's ``json``, it reads NaN and lone surrogates and then fails to send
them on: a 500, which is a convention, not a commit.

It talks to an SGLang engine the way RL servers do: it asks for logprobs,
prompt token ids and ``meta_info``, and answers 502 if the engine's answer
lacks ``choices[0].meta_info.output_token_logprobs`` or
``choices[0].prompt_token_ids`` (run it with the chaos upstream's sglang
flavour). Upstream failures are passed to the agent, not retried: a 503 or 429
as it came, an abort as 503, a broken connection as 502; the state is unchanged.

And the breakage of real deployments, which the harness must survive without
an ERROR: ``serve_third_party`` puts it behind a front that drops a kept-alive
connection, without a word, when the next request arrives after a 500 (a
crashed worker); and a body over the limit blocks the event loop for a while
before the 413 (a synchronous parse).

It has exactly three planted safety bugs, the ones seen in the field:

1. phantom commit: the lock is released during the upstream call, and a commit
   that finds the state moved on is skipped while its caller still gets 200;
2. queued chats proceed after DELETE: nothing re-checks the session after the wait;
3. in-flight turn not preempted: DELETE removes the session at once without
   cancelling the turn, which later gets 200 for a turn that is never recorded.

Everything else it does right: client disconnects, body limits, no commit of a
failed turn.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import httpx
import trio
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refserver.server import serve_asgi

from .field_kit import unless_hung_up

MAX_BODY = 8 * 1024 * 1024
BLOCKING_PARSE_SECONDS = 1.0
"""How long an oversized body blocks the event loop before its 413."""


class _Function(BaseModel):
    name: str
    arguments: str


class _ToolCall(BaseModel):
    id: str
    type: str
    function: _Function


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[_Message]
    stream: bool = False


@dataclass
class _Session:
    records: list[dict[str, Any]] = field(default_factory=list)
    lock: trio.Lock = field(default_factory=trio.Lock)

    def committed(self) -> list[Any]:
        if not self.records:
            return []
        last = self.records[-1]
        return [*last["request"]["messages"], last["response"]["choices"][0]["message"]]


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _same(a: list[Any], b: list[Any]) -> bool:
    keys = ("role", "content", "tool_calls", "tool_call_id", "name")
    return len(a) == len(b) and all(
        {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}
        for x, y in zip(a, b, strict=True)
    )


def create_third_party_app(upstream_url: str) -> Starlette:
    sessions: dict[str, _Session] = {}
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    async def create(request: Request) -> Response:
        session_id = secrets.token_hex(16)
        sessions[session_id] = _Session()
        return JSONResponse({"session_id": session_id})  # 200, not 201

    async def session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if session_id not in sessions:
            return _error(404, "session not found")
        if request.method == "DELETE":
            del sessions[session_id]  # BUG 3: the turn in flight is not cancelled
            return Response(status_code=204)
        return JSONResponse({"session_id": session_id, "records": sessions[session_id].records})

    async def call_upstream(body: dict[str, Any]) -> tuple[dict[str, Any] | None, Response]:
        """One attempt: a failure goes back to the agent as it came (pass-through)."""
        forwarded = {
            **body,
            "stream": False,  # it streams by buffering (see chat)
            "logprobs": True,
            "return_prompt_token_ids": True,
            "return_meta_info": True,
        }
        try:
            answer = await client.post(f"{upstream_url}/chat/completions", json=forwarded)
        except httpx.TransportError:
            return None, _error(502, "the engine is unreachable")
        if answer.status_code in (429, 503):
            return None, _error(answer.status_code, "the engine is busy; retry")
        if answer.status_code != 200:
            return None, _error(502, f"the engine answered {answer.status_code}")
        try:
            completion = answer.json()
            choice = completion["choices"][0]
            if choice["finish_reason"] == "abort":
                return None, _error(503, "generation aborted (weights updating); retry")
            # What the trainer needs from every turn, SGLang's way.
            logprobs = [float(entry[0]) for entry in choice["meta_info"]["output_token_logprobs"]]
            prompt_ids = [int(token) for token in choice["prompt_token_ids"]]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, _error(502, "cannot parse the engine's answer")
        completion["rollout"] = {"prompt_ids": prompt_ids, "logprobs": logprobs}
        return dict(completion), Response()

    async def chat(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            time.sleep(BLOCKING_PARSE_SECONDS)  # noqa: ASYNC251 - the planted event-loop block
            return _error(413, "request too large")
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            # A 500 on malformed JSON, as seen in the field (the front then drops
            # the connection: see serve_third_party).
            return _error(500, "internal server error")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        if any(m.get("role") not in ("system", "user", "assistant", "tool") for m in messages):
            return _error(400, "unknown role")
        try:
            stream = _ChatBody.model_validate(body).stream
        except ValidationError as invalid:
            detail = json.loads(invalid.json(include_url=False, include_input=False))
            return JSONResponse({"detail": detail}, status_code=422)
        session_id = request.path_params["session_id"]
        state = sessions.get(session_id)
        if state is None:
            return _error(404, "session not found")

        async with state.lock:  # BUG 2: nobody re-checks the session after this wait
            committed = state.committed()
            last_request = state.records[-1]["request"]["messages"] if state.records else None
            if last_request is not None and _same(last_request, messages):
                if len(state.records) == 1:
                    return _error(400, "the first turn cannot be retried")
                state.records.pop()  # an exact retry is a rollback: regenerate the turn
                committed = state.committed()
            elif not _same(committed, messages[: len(committed)]) or len(messages) <= len(
                committed
            ):
                return _error(400, "trajectory conflict")
            new = messages[len(committed) :]
            if committed and any(m.get("role") != "tool" for m in new):
                return _error(400, "only tool messages may follow an assistant message")
            expected_records = len(state.records)
        # BUG 1: the lock is released for the upstream call.
        called = await unless_hung_up(request, lambda: call_upstream(body))
        if called is None:
            return Response(status_code=499)  # the client hung up: nothing committed
        completion, failure = called
        if completion is None:
            return failure
        async with state.lock:
            if len(state.records) == expected_records:
                state.records.append({"request": body, "response": completion})
            # else: "stale state, skipping update", and the 200 goes out anyway
        if stream:
            return Response(_fake_stream(completion), media_type="text/event-stream")
        return JSONResponse(completion)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{session_id}", session, methods=["GET", "DELETE"]),
            Route("/sessions/{session_id}/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def _fake_stream(completion: dict[str, Any]) -> bytes:
    """A "fake stream": the whole answer in one chunk once it is all there, then [DONE]."""
    choice = completion["choices"][0]
    chunk = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "choices": [
            {"index": 0, "delta": choice["message"], "finish_reason": choice["finish_reason"]}
        ],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"


async def serve_third_party(
    upstream_url: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """The app on hypercorn, behind a front that behaves like a crashed worker:
    after relaying a 500 on a connection, it drops that connection, without
    ``Connection: close``, when the next request arrives on it."""
    async with trio.open_nursery() as nursery:
        backend: str = await nursery.start(
            partial(serve_asgi, create_third_party_app(upstream_url), "127.0.0.1", 0)
        )
        backend_port = int(backend.rsplit(":", 1)[1])
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, partial(_front, backend_port), listeners)
        task_status.started(f"http://127.0.0.1:{port}")


async def _front(backend_port: int, client: trio.SocketStream) -> None:
    crashed = trio.Event()
    async with client, await trio.open_tcp_stream("127.0.0.1", backend_port) as server:

        async def to_server() -> None:
            while data := await client.receive_some(65536):
                if crashed.is_set():
                    nursery.cancel_scope.cancel()  # drop it: no answer, no warning
                    return
                await server.send_all(data)
            nursery.cancel_scope.cancel()

        async def to_client() -> None:
            while data := await server.receive_some(65536):
                if data.startswith(b"HTTP/1.1 500 "):
                    crashed.set()
                await client.send_all(data)
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(to_server)
                nursery.start_soon(to_client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side hung up (a nursery raises it in a group)
