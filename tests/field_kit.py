"""What the OpenAI-style test servers share, written apart from ``refserver``.

The test servers (``bearer_server.py``, ``tree_server.py``, ``third_party_server.py``)
stand for servers of the field, so none of them imports the reference server. The
plumbing they have in common lives here, once: reading a chat body, calling the
engine with retries, and noticing a client that hung up. What makes each server
itself (its addressing, its trajectory, its conventions and its bug) stays in its file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_BODY = 8 * 1024 * 1024
ATTEMPTS = 3

Result = TypeVar("Result")


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def well_formed(messages: Any) -> bool:
    """A non-empty list of messages with known roles and the right types."""
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


def parse_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity, no number that overflows."""

    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    def number(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            raise ValueError(f"{text} overflows")
        return value

    return json.loads(raw, parse_constant=refuse, parse_float=number)


def chat_body(raw: bytes) -> dict[str, Any] | JSONResponse:
    """The chat request in ``raw``, or the 4xx that refuses it (streams included)."""
    if len(raw) > MAX_BODY:
        return error(413, "request_too_large", "the body is over 8 MiB")
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return error(400, "invalid_request", "the body is not JSON")
    if not isinstance(body, dict) or not well_formed(body.get("messages")):
        return error(400, "invalid_request", "messages must be a list of messages")
    if body.get("stream") is True:
        return error(400, "invalid_request", "stream: true is not supported")
    return body


class Engine:
    """POST ``{upstream}/chat/completions``: connection errors, 429, 503 and aborts
    retried; anything else that is not a valid completion is a 502."""

    def __init__(self, upstream_url: str) -> None:
        self._url = f"{upstream_url}/chat/completions"
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    async def complete(self, body: dict[str, Any]) -> dict[str, Any] | JSONResponse:
        failure = "no attempt"
        for attempt in range(ATTEMPTS):
            if attempt:
                await trio.sleep(0.01 * attempt)
            try:
                answer = await self._client.post(self._url, json=body)
            except httpx.TransportError as failed:
                failure = type(failed).__name__
                continue
            if answer.status_code in (429, 503):
                failure = f"engine {answer.status_code}"
                continue
            if answer.status_code != 200:
                return error(502, "upstream_error", f"the engine answered {answer.status_code}")
            try:
                completion = answer.json()
                choice = completion["choices"][0]
                message = choice["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                return error(502, "upstream_error", "the engine's answer is not a completion")
            if choice.get("finish_reason") == "abort":
                failure = "aborted"
                continue
            if not well_formed([message]):
                return error(502, "upstream_error", "the engine's message is not valid")
            return dict(completion)
        return error(502, "upstream_error", f"the engine failed: {failure}")


async def unless_hung_up(request: Request, work: Callable[[], Awaitable[Result]]) -> Result | None:
    """``work``'s result, or None if it was stopped: the client hung up (hypercorn
    does not cancel a handler for that; the next ASGI message after the body says
    so), or a cancel scope around this call was cancelled."""
    result: Result | None = None
    async with trio.open_nursery() as nursery:

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_disconnect)
        result = await work()
        nursery.cancel_scope.cancel()
    return result
