"""A session server on Anthropic's Messages API, for tests.

Written apart from the reference, in the style of servers that give agents an
Anthropic base URL (``/sessions/{id}``) and run an OpenAI-compatible engine
behind it: a Messages turn is translated into a chat completion, the engine's
answer (or its stream) back into a ``message`` (or Anthropic's events). The
trajectory is kept, and shown by GET, in Anthropic's form. Its profile is
``profiles/anthropic-messages.yaml``: the reference's conventions over that API.

It has exactly one planted safety bug:

* DELETE mid-stream: a DELETE removes the session but does not stop a turn
  that is streaming; the stream runs on to its end, the client gets a whole
  answer and ``message_stop``, and the turn is then silently not committed
  (and the engine worked on for a deleted session).

Everything else it does right: a DELETE stops a non-streamed turn (410),
queued turns answer 404, hang-ups commit nothing, exact retries replay, a
conflict is 409, engine failures are retried before the first token.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx_sse
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ATTEMPTS = 3
STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


@dataclass
class _Session:
    messages: list[dict[str, Any]] = field(default_factory=list)
    last_request: list[dict[str, Any]] | None = None
    last_answer: dict[str, Any] | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    turn: trio.CancelScope | None = None
    streaming: bool = False
    deleted: bool = False


class _Refused(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def response(self) -> JSONResponse:
        body = {"type": "error", "error": {"type": self.kind, "message": self.message}}
        return JSONResponse(body, status_code=self.status)

    def event(self) -> bytes:
        body = {"type": "error", "error": {"type": self.kind, "message": self.message}}
        return f"event: error\ndata: {json.dumps(body)}\n\n".encode()


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _text_start(index: int) -> bytes:
    return _sse(
        "content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}
    )


def _text_delta(index: int, text: str) -> bytes:
    return _sse(
        "content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": text}}
    )


def _json_delta(index: int, partial: str) -> bytes:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return _sse("content_block_delta", {"index": index, "delta": delta})


def _stop(reason: str | None) -> list[bytes]:
    end = {"delta": {"stop_reason": reason}, "usage": {"output_tokens": 0}}
    return [_sse("message_delta", end), _sse("message_stop", {})]


def _to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """The engine's request: Anthropic's messages as chat messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("system"), str):
        messages.append({"role": "system", "content": body["system"]})
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        texts = "".join(b.get("text", "") for b in content if b.get("type") == "text")
        calls = [
            {"id": b["id"], "type": "function",
             "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}}
            for b in content if b.get("type") == "tool_use"
        ]  # fmt: skip
        for block in content:
            if block.get("type") == "tool_result":
                messages.append(
                    {"role": "tool", "tool_call_id": block["tool_use_id"],
                     "content": block.get("content", "")}
                )  # fmt: skip
        if calls:
            messages.append({"role": "assistant", "content": texts or None, "tool_calls": calls})
        elif texts or message["role"] == "assistant":
            messages.append({"role": message["role"], "content": texts})
    tools = [
        {"type": "function", "function": {"name": t["name"], "parameters": t.get("input_schema")}}
        for t in body.get("tools") or []
    ]
    request: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if tools:
        request["tools"] = tools
    return request


def _to_message(completion: dict[str, Any]) -> dict[str, Any]:
    choice = completion["choices"][0]
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        arguments = json.loads(call["function"]["arguments"] or "{}")
        content.append(
            {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
             "input": arguments}
        )  # fmt: skip
    return {
        "id": f"msg_{secrets.token_hex(8)}",
        "type": "message",
        "role": "assistant",
        "model": completion.get("model", "engine"),
        "content": content,
        "stop_reason": STOP.get(choice.get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }


def _valid(body: Any) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("max_tokens"), int):
        return False
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    for message in messages:
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            return False
        if message.get("role") not in ("user", "assistant"):
            return False
        if not isinstance(message.get("content"), str | list):
            return False
        if isinstance(message["content"], list) and not all(
            isinstance(b, dict) and b.get("type") in ("text", "tool_use", "tool_result")
            for b in message["content"]
        ):
            return False
    return isinstance(body.get("stream", False), bool)


def _key(messages: list[dict[str, Any]]) -> str:
    """Messages compared as content, whether text is a string or text blocks."""
    normal = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            texts = "".join(b.get("text", "") for b in content if b.get("type") == "text")
            others = [b for b in content if b.get("type") != "text"]
            content = [texts, others] if others else texts
        normal.append([message["role"], content])
    return json.dumps(normal, sort_keys=True)


def create_messages_app(upstream_url: str) -> Starlette:
    sessions: dict[str, _Session] = {}
    engine = httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    async def create(request: Request) -> Response:
        session_id = secrets.token_hex(16)
        sessions[session_id] = _Session()
        return JSONResponse({"session_id": session_id}, status_code=201)

    async def session_resource(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        session = sessions.get(session_id)
        if session is None:
            return _Refused(404, "not_found_error", "no such session").response()
        if request.method == "DELETE":
            del sessions[session_id]
            session.deleted = True
            # BUG: a streaming turn is left to run to its end.
            if session.turn is not None and not session.streaming:
                session.turn.cancel()
            return Response(status_code=204)
        turns = sum(1 for m in session.messages if m["role"] == "assistant")
        return JSONResponse(
            {"session_id": session_id, "messages": session.messages, "num_assistant": turns}
        )

    def admit(session_id: str, body: dict[str, Any]) -> tuple[_Session, str]:
        """Under the lock: "replay", "extend", or a refusal raised."""
        session = sessions.get(session_id)
        if session is None or session.deleted:
            raise _Refused(404, "not_found_error", "no such session")
        messages = body["messages"]
        if session.last_request is not None and _key(messages) == _key(session.last_request):
            return session, "replay"
        committed = session.messages
        if (
            _key(messages[: len(committed)]) != _key(committed)
            or len(messages) <= len(committed)
            or messages[-1]["role"] == "assistant"
        ):
            raise _Refused(409, "invalid_request_error", "the request does not extend the session")
        return session, "extend"

    async def complete(body: dict[str, Any]) -> dict[str, Any]:
        failure = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                await trio.sleep(0.01 * attempt)
            try:
                answer = await engine.post(f"{upstream_url}/chat/completions", json=body)
            except httpx.TransportError as error:
                failure = type(error).__name__
                continue
            if answer.status_code in (429, 503):
                failure = str(answer.status_code)
                continue
            try:
                completion: dict[str, Any] = answer.json()
                finish = completion["choices"][0]["finish_reason"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise _Refused(502, "api_error", "the engine's answer is unreadable") from None
            if answer.status_code != 200:
                raise _Refused(502, "api_error", f"the engine answered {answer.status_code}")
            if finish == "abort":
                failure = "abort"
                continue
            return completion
        raise _Refused(502, "api_error", f"the engine failed: {failure}")

    async def messages_route(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > 8 * 1024 * 1024:
            return _Refused(413, "request_too_large", "over 8 MiB").response()
        try:
            body = json.loads(raw)
        except ValueError:
            return _Refused(400, "invalid_request_error", "not JSON").response()
        if not _valid(body):
            return _Refused(400, "invalid_request_error", "not a Messages request").response()
        session_id = request.path_params["session_id"]
        if body.get("stream"):
            return StreamingResponse(stream_turn(session_id, body), media_type="text/event-stream")
        session = sessions.get(session_id)
        if session is None:
            return _Refused(404, "not_found_error", "no such session").response()
        async with session.lock:
            try:
                session, decision = admit(session_id, body)
                if decision == "replay":
                    return JSONResponse(session.last_answer)
                completion = None
                with trio.CancelScope() as turn:
                    session.turn = turn
                    async with trio.open_nursery() as nursery:

                        async def watch() -> None:
                            while (await request.receive())["type"] != "http.disconnect":
                                pass
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(watch)
                        completion = await complete(_to_openai(body))
                        nursery.cancel_scope.cancel()
                session.turn = None
                if session.deleted:
                    raise _Refused(410, "not_found_error", "the session was deleted")
                if completion is None:
                    return Response(status_code=499)  # the client hung up
            except _Refused as refused:
                return refused.response()
            answer = _to_message(completion)
            session.messages = [
                *body["messages"],
                {"role": "assistant", "content": answer["content"]},
            ]
            session.last_request, session.last_answer = body["messages"], answer
            return JSONResponse(answer)

    async def stream_turn(session_id: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        session = sessions.get(session_id)
        if session is None:
            yield _Refused(404, "not_found_error", "no such session").event()
            return
        async with session.lock:
            try:
                session, decision = admit(session_id, body)
            except _Refused as refused:
                yield refused.event()
                return
            if decision == "replay":
                for data in _whole_message_events(session.last_answer or {}):
                    yield data
                return
            session.streaming = True
            try:
                text, finish, relayed = "", "stop", 0
                calls: dict[int, dict[str, str]] = {}
                for attempt in range(ATTEMPTS):
                    try:
                        async for item in _engine_events(engine, upstream_url, _to_openai(body)):
                            if isinstance(item, tuple):
                                text, calls, finish = item
                            else:
                                relayed += 1
                                yield item
                        break
                    except (httpx.TransportError, _Retry) as failure:
                        if relayed or attempt == ATTEMPTS - 1:
                            yield _Refused(502, "api_error", f"the stream broke: {failure}").event()
                            return
                        await trio.sleep(0.01)
            finally:
                session.streaming = False
            if session.deleted:
                # "Too late to stop it": the client already has the whole answer.
                for data in _stop(STOP.get(finish, "end_turn")):
                    yield data
                return
            content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            for call in calls.values():
                arguments = json.loads(call["arguments"] or "{}")
                block = {"type": "tool_use", "id": call["id"], "name": call["name"]}
                content.append({**block, "input": arguments})
            reason = STOP.get(finish, "end_turn")
            answer: dict[str, Any] = {
                "id": f"msg_{secrets.token_hex(8)}",
                "type": "message",
                "role": "assistant",
                "model": "engine",
                "content": content,
                "stop_reason": STOP.get(finish, "end_turn"),
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            session.messages = [*body["messages"], {"role": "assistant", "content": content}]
            session.last_request, session.last_answer = body["messages"], answer
            for data in _stop(reason):
                yield data

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/healthz", health, methods=["GET"]),
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{session_id}", session_resource, methods=["GET", "DELETE"]),
            Route("/sessions/{session_id}/v1/messages", messages_route, methods=["POST"]),
        ]
    )


class _Retry(Exception):
    pass


async def _engine_events(
    engine: httpx.AsyncClient, upstream_url: str, request: dict[str, Any]
) -> AsyncIterator[bytes | tuple[str, dict[int, dict[str, str]], str]]:
    """The engine's stream as Anthropic events (bytes), then one tuple with the
    assembled text, tool calls and finish reason (no message_delta yet)."""
    text = ""
    calls: dict[int, dict[str, str]] = {}
    finish = "stop"
    started = False
    block_open: str | None = None
    index = -1
    async with httpx_sse.aconnect_sse(
        engine, "POST", f"{upstream_url}/chat/completions", json={**request, "stream": True}
    ) as source:
        if source.response.status_code in (429, 503):
            raise _Retry(str(source.response.status_code))
        if source.response.status_code != 200:
            raise _Retry(f"status {source.response.status_code}")
        done = False
        async for sse in source.aiter_sse():
            if sse.data.strip() == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(sse.data)
            except ValueError:
                raise _Retry("garbage") from None
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                finish = choice.get("finish_reason") or finish
                if finish == "abort":
                    raise _Retry("abort")
                if not started:
                    started = True
                    message: dict[str, Any] = {
                        "id": "msg",
                        "type": "message",
                        "role": "assistant",
                        "model": "engine",
                        "content": [],
                        "stop_reason": None,
                        "usage": {"input_tokens": 0, "output_tokens": 0},
                    }
                    yield _sse("message_start", {"message": message})
                if delta.get("content"):
                    if block_open != "text":
                        index += 1
                        block_open = "text"
                        yield _text_start(index)
                    text += delta["content"]
                    yield _text_delta(index, delta["content"])
                for call in delta.get("tool_calls") or []:
                    slot = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                    function = call.get("function") or {}
                    if call.get("id"):
                        slot["id"] = call["id"]
                        slot["name"] = function.get("name") or ""
                        index += 1
                        block_open = f"tool {call['index']}"
                        block = {"type": "tool_use", "id": slot["id"], "name": slot["name"]}
                        start = {"index": index, "content_block": {**block, "input": {}}}
                        yield _sse("content_block_start", start)
                    if function.get("arguments"):
                        slot["arguments"] += function["arguments"]
                        yield _json_delta(index, function["arguments"])
        if not done:
            raise _Retry("the stream ended without [DONE]")
    if block_open is not None:
        yield _sse("content_block_stop", {"index": index})
    yield (text, calls, finish)


def _whole_message_events(answer: dict[str, Any]) -> list[bytes]:
    events = [_sse("message_start", {"message": {**answer, "content": []}})]
    for index, block in enumerate(answer.get("content") or []):
        if block["type"] == "text":
            events += [_text_start(index), _text_delta(index, block["text"])]
        else:
            events.append(_sse("content_block_start", {"index": index, "content_block": block}))
        events.append(_sse("content_block_stop", {"index": index}))
    return events + _stop(answer.get("stop_reason"))
