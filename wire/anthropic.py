"""The Anthropic Messages API on the session core, without I/O: translation only.

A Messages turn is a chat turn in another spelling. The request is translated
into the chat request the session core already knows, and the trajectory is
kept in that one form, so the rules (validation, exact retry, conflicts), the
lock, the cancel scope and the commit point are exactly those of
``rules.py``, ``service.py`` and ``streaming.py``:

* ``system`` (a string or text blocks) becomes the first, ``system`` message;
* a ``user`` message's ``text`` blocks become a user message; its
  ``tool_result`` blocks become ``tool`` messages (before any text, in order);
* an ``assistant`` message's ``text`` blocks become its content, its
  ``tool_use`` blocks its ``tool_calls`` (``input`` as JSON ``arguments``);
* ``tools`` (``name``, ``description``, ``input_schema``) become function tools,
  ``max_tokens`` stays, ``stop_sequences`` becomes ``stop``, ``temperature``,
  ``top_p`` and ``top_k`` pass on; the rest of Anthropic's options are refused.

The engine's answer is translated back into a ``message`` (``text`` and
``tool_use`` blocks, ``stop_reason``, ``usage``), and a streamed answer into
Anthropic's events (``message_start``, ``content_block_*``, ``message_delta``,
``message_stop``). An error is ``{"type": "error", "error": {...}}`` with
Anthropic's error type and the session's own in ``sessctl_type``; in a stream,
an ``error`` event, never followed by ``message_stop``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wire.errors import InvalidRequest, SessionServerError

from .protocol import ChatRequest, check_message, read_json_object

_PASSED_ON = ("temperature", "top_p", "top_k")
_KNOWN = {
    "model",
    "messages",
    "system",
    "max_tokens",
    "stream",
    "tools",
    "tool_choice",
    "stop_sequences",
    "metadata",
    *_PASSED_ON,
}

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    410: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def error_body(error: SessionServerError) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(error.status_code, "api_error")
    return {
        "type": "error",
        "error": {
            "type": kind,
            "message": error.message,
            "sessctl_type": error.error_type,
            **error.details,
        },
    }


def parse_messages_request(raw: bytes) -> ChatRequest:
    """A Messages request as the chat request the session core runs; ``InvalidRequest``
    names the field (``messages[2].content[0]``) when it cannot be one."""
    body = read_json_object(raw)
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise InvalidRequest(f"unsupported fields: {', '.join(unknown)}", param=unknown[0])
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream")
    messages = [*_system(body.get("system")), *_messages(body.get("messages"))]
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("stop_sequences") is not None:
        chat["stop"] = body["stop_sequences"]
    for key in _PASSED_ON:
        if key in body:
            chat[key] = body[key]
    for index, message in enumerate(messages):
        check_message(message, f"messages[{index}]")
    return ChatRequest(body=chat)


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if isinstance(system, list) and all(_is_block(b, "text") for b in system):
        return [{"role": "system", "content": "".join(b["text"] for b in system)}]
    raise InvalidRequest("system must be a string or a list of text blocks", param="system")


def _is_block(block: Any, kind: str) -> bool:
    return isinstance(block, dict) and block.get("type") == kind


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    translated: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"{where} must have role user or assistant", param=where)
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            # As Anthropic's API does: a message is its role and content, nothing else.
            raise InvalidRequest(
                f"{where}: unsupported fields {', '.join(extra)}", param=f"{where}.{extra[0]}"
            )
        content = message.get("content")
        if isinstance(content, str):
            translated.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise InvalidRequest(
                f"{where}.content must be a string or a list of blocks", param=f"{where}.content"
            )
        if message["role"] == "assistant":
            translated.append(_assistant(content, where))
        else:
            translated.extend(_user(content, where))
    return translated


def _text_of(blocks: list[Any], where: str) -> str:
    texts: list[str] = []
    for number, block in enumerate(blocks):
        if not _is_block(block, "text") or not isinstance(block.get("text"), str):
            raise InvalidRequest(
                f"{where}.content[{number}] must be a text block here",
                param=f"{where}.content[{number}]",
            )
        texts.append(block["text"])
    return "".join(texts)


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    text = _text_of([b for b in blocks if not _is_block(b, "tool_use")], where)
    calls = []
    for number, block in enumerate(blocks):
        if not _is_block(block, "tool_use"):
            continue
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise InvalidRequest(
                f"{where}.content[{number}]: a tool_use block needs a string id and name",
                param=f"{where}.content[{number}]",
            )
        arguments = json.dumps(block.get("input", {}), sort_keys=True)
        function = {"name": block["name"], "arguments": arguments}
        calls.append({"id": block["id"], "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    elif not text:
        message["content"] = ""
    return message


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    rest: list[Any] = []
    for number, block in enumerate(blocks):
        if not _is_block(block, "tool_result"):
            rest.append(block)
            continue
        if not isinstance(block.get("tool_use_id"), str):
            raise InvalidRequest(
                f"{where}.content[{number}]: a tool_result block needs a string tool_use_id",
                param=f"{where}.content[{number}]",
            )
        content = block.get("content", "")
        if isinstance(content, list):
            content = _text_of(content, f"{where}.content[{number}]")
        if not isinstance(content, str):
            raise InvalidRequest(
                f"{where}.content[{number}].content must be text",
                param=f"{where}.content[{number}]",
            )
        results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": content})
    if rest:
        results.append({"role": "user", "content": _text_of(rest, where)})
    return results


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    translated = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools[{index}] needs a string name", param=f"tools[{index}]")
        function = {
            "name": tool["name"],
            "description": tool.get("description", ""),
            "parameters": tool.get("input_schema", {"type": "object"}),
        }
        translated.append({"type": "function", "function": function})
    return translated


def to_message(completion: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's ``chat.completion`` as an Anthropic ``message``."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    blocks: list[dict[str, Any]] = []
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        blocks.append(_tool_use(call))
    usage = completion.get("usage") or {}
    return {
        "id": f"msg_{str(completion.get('id', 'x')).removeprefix('chatcmpl-')}",
        "type": "message",
        "role": "assistant",
        "model": completion.get("model", "unknown"),
        "content": blocks,
        "stop_reason": STOP_REASONS.get(choice.get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
        },
    }


def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        arguments = {"_raw": function.get("arguments")}
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": function.get("name"),
        "input": arguments,
    }


SESSION_TYPES_AS_ANTHROPIC = {
    "invalid_request": "invalid_request_error",
    "trajectory_conflict": "invalid_request_error",
    "session_not_found": "not_found_error",
    "not_found": "not_found_error",
    "session_deleted": "not_found_error",
    "request_too_large": "request_too_large",
    "upstream_error": "api_error",
    "upstream_timeout": "api_error",
    "server_shutting_down": "overloaded_error",
    "server_busy": "overloaded_error",
}
"""The session's error types, as an Anthropic-API server that does not say more
spells them (the reference server says more, in ``sessctl_type``)."""


def chat_to_messages(body: Mapping[str, Any]) -> dict[str, Any]:
    """A chat request as the Messages request that translates back into it: the
    inverse of ``parse_messages_request``, for clients (the harness) that build
    turns in chat form and speak to a Messages API."""
    system = [m for m in body.get("messages", []) if m.get("role") == "system"]
    turns = [m for m in body.get("messages", []) if m.get("role") != "system"]
    request: dict[str, Any] = {
        "model": body.get("model", "unknown"),
        "max_tokens": body.get("max_tokens", 256),
        "messages": _as_anthropic(turns),
    }
    if system:
        request["system"] = "".join(str(m.get("content") or "") for m in system)
    if body.get("stream") is not None:
        request["stream"] = body["stream"]
    if body.get("tools"):
        request["tools"] = [
            {
                "name": tool["function"]["name"],
                "description": tool["function"].get("description", ""),
                "input_schema": tool["function"].get("parameters", {"type": "object"}),
            }
            for tool in body["tools"]
        ]
    return request


def _as_anthropic(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            results.append(
                {
                    "type": "tool_result",
                    "tool_use_id": message.get("tool_call_id"),
                    "content": message.get("content") or "",
                }
            )
            continue
        if role == "user" and results:
            text = {"type": "text", "text": message.get("content") or ""}
            out.append({"role": "user", "content": [*results, text]})
            results = []
            continue
        if results:
            out.append({"role": "user", "content": results})
            results = []
        if role == "assistant" and message.get("tool_calls"):
            blocks: list[dict[str, Any]] = []
            if message.get("content"):
                blocks.append({"type": "text", "text": message["content"]})
            blocks += [_tool_use(call) for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": role, "content": message.get("content") or ""})
    if results:
        out.append({"role": "user", "content": results})
    return out


def messages_to_chat(messages: list[Any]) -> list[Any]:
    """A trajectory that may be in Anthropic's form, in chat form: messages with
    ``tool_use`` or ``tool_result`` blocks are translated, the rest kept as they are
    (text blocks compare equal to their text already)."""
    out: list[Any] = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        kinds = {block.get("type") for block in content if isinstance(block, dict)}
        try:
            if message.get("role") == "assistant" and "tool_use" in kinds:
                out.append(_assistant(content, f"messages[{index}]"))
                continue
            if message.get("role") == "user" and "tool_result" in kinds:
                out.extend(_user(content, f"messages[{index}]"))
                continue
        except InvalidRequest:
            pass
        out.append(message)
    return out


def message_to_chat(message: Mapping[str, Any]) -> dict[str, Any] | None:
    """An Anthropic ``message`` as the assistant message of a chat (None if it is not one)."""
    blocks = message.get("content")
    if message.get("type") != "message" or not isinstance(blocks, list):
        return None
    try:
        return _assistant(blocks, "the message")
    except InvalidRequest:
        return None


def event(kind: str, payload: Mapping[str, Any]) -> bytes:
    data = json.dumps({"type": kind, **payload}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def error_event(error: SessionServerError) -> bytes:
    body = error_body(error)
    return event("error", {"error": body["error"]})


@dataclass
class EventWriter:
    """The engine's chat chunks, as Anthropic's events: one writer per streamed turn."""

    started: bool = False
    block: int = -1
    """Index of the content block being written (-1: none open)."""
    open_kind: str | None = None
    tool_blocks: dict[int, int] = field(default_factory=dict)
    """Tool-call index in the chunks -> its content block index."""
    output_tokens: int = 0

    def chunk(self, chunk: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if not self.started:
            self.started = True
            message = {
                "id": f"msg_{str(chunk.get('id', 'x')).removeprefix('chatcmpl-')}",
                "type": "message",
                "role": "assistant",
                "model": chunk.get("model", "unknown"),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            out.append(event("message_start", {"message": message}))
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self.output_tokens = int(usage.get("completion_tokens") or 0)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._open("text", {"type": "text", "text": ""})
                text_delta = {"type": "text_delta", "text": delta["content"]}
                out.append(event("content_block_delta", {"index": self.block, "delta": text_delta}))
            for call in delta.get("tool_calls") or []:
                out += self._tool_call_delta(call)
        return out

    def _open(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        if self.open_kind == kind and kind == "text":
            return []
        out = self._close()
        self.block += 1
        self.open_kind = kind
        out.append(event("content_block_start", {"index": self.block, "content_block": block}))
        return out

    def _close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [event("content_block_stop", {"index": self.block})]

    def _tool_call_delta(self, call: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        if index not in self.tool_blocks:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": {},
            }
            out += self._open(f"tool {index}", block)
            self.tool_blocks[index] = self.block
        if function.get("arguments"):
            json_delta = {"type": "input_json_delta", "partial_json": function["arguments"]}
            out.append(
                event(
                    "content_block_delta", {"index": self.tool_blocks[index], "delta": json_delta}
                )
            )
        return out

    def finish(self, finish_reason: str | None) -> list[bytes]:
        """After the commit: close the last block, say why it stopped, and stop."""
        out = self._close()
        delta = {
            "stop_reason": STOP_REASONS.get(finish_reason or "stop", "end_turn"),
            "stop_sequence": None,
        }
        out.append(
            event("message_delta", {"delta": delta, "usage": {"output_tokens": self.output_tokens}})
        )
        out.append(event("message_stop", {}))
        return out


@dataclass
class MessageAssembler:
    """Anthropic's events, as a client assembles them into a ``message``: the
    inverse of ``EventWriter``, for clients (the harness) reading a Messages stream."""

    chunks: int = 0
    """Deltas, tool-use starts and the final ``message_delta``: the engine's chunks."""
    finished: bool = False
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    partial_json: dict[int, list[str]] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None

    def add(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Take one event; True if it counts as a chunk of the answer."""
        index = data.get("index", 0)
        if kind == "message_start" and isinstance(data.get("message"), Mapping):
            self.base = dict(data["message"])
        elif kind == "content_block_start" and isinstance(data.get("content_block"), Mapping):
            block = dict(data["content_block"])
            self.blocks[index] = block
            if block.get("type") == "tool_use":
                self.chunks += 1
                return True
        elif kind == "content_block_delta" and isinstance(data.get("delta"), Mapping):
            delta = data["delta"]
            block = self.blocks.setdefault(index, {"type": "text", "text": ""})
            if delta.get("type") == "text_delta":
                block["text"] = str(block.get("text", "")) + str(delta.get("text", ""))
            elif delta.get("type") == "input_json_delta":
                self.partial_json.setdefault(index, []).append(str(delta.get("partial_json", "")))
            self.chunks += 1
            return True
        elif kind == "message_delta":
            delta = data.get("delta")
            self.stop_reason = delta.get("stop_reason") if isinstance(delta, Mapping) else None
            self.finished = True
            self.chunks += 1
            return True
        return False

    def message(self) -> dict[str, Any]:
        content = []
        for index, block in sorted(self.blocks.items()):
            if block.get("type") == "tool_use" and index in self.partial_json:
                try:
                    block = {**block, "input": json.loads("".join(self.partial_json[index]))}
                except ValueError:
                    block = {**block, "input": {"_raw": "".join(self.partial_json[index])}}
            content.append(block)
        return {**self.base, "type": "message", "content": content, "stop_reason": self.stop_reason}
