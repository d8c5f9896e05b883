"""Streamed turns, without I/O: assembling chunks into an answer, and writing events.

A streamed turn (``stream: true``) is relayed chunk by chunk, and committed
once, when the engine's stream is complete (see ``docs/contract.md``,
"Streamed turns"). Everything that is a *decision* about a stream lives here,
as ``rules.py`` holds the session rules:

* ``StreamAssembler`` takes the engine's ``chat.completion.chunk`` objects in
  order and builds the answer a client assembles from them (content,
  reasoning and tool-call deltas), refusing chunks a client could not
  assemble. The committed answer is exactly what was relayed.
* ``StreamAssembler.finished`` says which chunks wait for the commit: the one
  that carries ``finish_reason``, and everything after it (a usage chunk), so
  that a client that has its last chunk knows the turn is committed.
* ``replay_chunks`` turns a stored completion back into chunks, for an exact
  retry that asks for a stream.
* ``EventReader`` reads the engine's Server-Sent Events from the bytes as they
  arrive (the WHATWG rules: any line ending, ``:`` comments, ``data`` lines
  joined; other fields are not needed here).
* ``event`` / ``DONE`` / ``error_event`` are the Server-Sent Events framing.
  An error after the stream began is a ``data:`` event whose object has an
  ``error`` member in the OpenAI shape (the OpenAI SDK raises it as
  ``APIError``); it is never followed by ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error_event(error_body: Mapping[str, Any]) -> bytes:
    """``error_body`` is ``{"error": {...}}``, as a non-streamed error's body."""
    return event(error_body)


class EventReader:
    """The ``data`` of each Server-Sent Event in a byte stream, as its events complete.

    An event ends at a blank line; one with no ``data`` line is not an event
    (the WHATWG rule), so a keep-alive such as ``event: ping`` is skipped. A
    line may be split anywhere across parts, a ``\\r\\n`` included, and an event is
    read as soon as its blank line arrives.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self._after_cr = False

    def feed(self, part: bytes) -> list[bytes]:
        # A \r ends a line at once; a \n right after it (maybe in this part) is its other half.
        if not part:
            return []
        if self._after_cr and part.startswith(b"\n"):
            part = part[1:]
        buffer = self._pending + part
        self._after_cr = buffer.endswith(b"\r")
        lines = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._pending = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                self._data.append(value.removeprefix(b" "))
        return events


class ChunkRefused(ValueError):
    """A chunk that no client could assemble; says which field, and why."""


@dataclass
class _ToolCall:
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamAssembler:
    """The answer so far, built from the chunks in the order they came."""

    chunks: int = 0
    completion_id: str | None = None
    model: str | None = None
    created: int | None = None
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    extra_choice: dict[str, Any] = field(default_factory=dict)
    """Engine extras on the final choice (SGLang's ``matched_stop``), kept in the record."""

    def add(self, chunk: Any) -> None:
        """Take one chunk; ``ChunkRefused`` if it is not a chat.completion.chunk."""
        if not isinstance(chunk, dict):
            raise ChunkRefused(f"chunk {self.chunks + 1} is not a JSON object")
        self.chunks += 1
        where = f"chunk {self.chunks}"
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise ChunkRefused(f"{where} has no choices list")
        if isinstance(chunk.get("id"), str):
            self.completion_id = self.completion_id or chunk["id"]
        if isinstance(chunk.get("model"), str):
            self.model = self.model or chunk["model"]
        if isinstance(chunk.get("created"), int):
            self.created = self.created if self.created is not None else chunk["created"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in choices:
            if not isinstance(choice, dict):
                raise ChunkRefused(f"{where}: a choice is not an object")
            if choice.get("index", 0) != 0:
                raise ChunkRefused(f"{where}: choice {choice.get('index')!r}; a turn has one")
            self._add_choice(choice, where)

    def _add_choice(self, choice: dict[str, Any], where: str) -> None:
        if self.finish_reason is not None:
            raise ChunkRefused(f"{where}: a delta after finish_reason {self.finish_reason!r}")
        delta = choice.get("delta", {})
        if not isinstance(delta, dict):
            raise ChunkRefused(f"{where}: delta is not an object")
        role = delta.get("role")
        if role is not None and role != "assistant":
            raise ChunkRefused(f"{where}: delta.role is {role!r}, not 'assistant'")
        for key, parts in (("content", self.content), ("reasoning_content", self.reasoning)):
            text = delta.get(key)
            if text is not None and not isinstance(text, str):
                raise ChunkRefused(f"{where}: delta.{key} is not a string")
            if text:
                parts.append(text)
        calls = delta.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ChunkRefused(f"{where}: delta.tool_calls is not a list")
            for call in calls:
                self._add_tool_call(call, where)
        finish = choice.get("finish_reason")
        if finish is not None:
            if not isinstance(finish, str):
                raise ChunkRefused(f"{where}: finish_reason is not a string")
            self.finish_reason = finish
            self.extra_choice = {
                k: v
                for k, v in choice.items()
                if k not in ("index", "delta", "finish_reason", "logprobs")
            }

    def _add_tool_call(self, call: Any, where: str) -> None:
        if not isinstance(call, dict) or not isinstance(call.get("index"), int):
            raise ChunkRefused(f"{where}: a tool-call delta has no integer index")
        slot = self.tool_calls.setdefault(call["index"], _ToolCall())
        if isinstance(call.get("id"), str):
            slot.id = call["id"]
        if isinstance(call.get("type"), str):
            slot.type = call["type"]
        function = call.get("function") or {}
        if not isinstance(function, dict):
            raise ChunkRefused(f"{where}: a tool-call delta's function is not an object")
        name, arguments = function.get("name"), function.get("arguments")
        if name is not None and not isinstance(name, str):
            raise ChunkRefused(f"{where}: a tool call's name is not a string")
        if arguments is not None and not isinstance(arguments, str):
            raise ChunkRefused(f"{where}: a tool call's arguments are not a string")
        slot.name += name or ""
        if arguments:
            slot.arguments.append(arguments)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def message(self) -> dict[str, Any]:
        """The assistant message a client assembles from the chunks so far."""
        text = "".join(self.content)
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.name, "arguments": "".join(call.arguments)},
                }
                for _, call in sorted(self.tool_calls.items())
            ]
        elif message["content"] is None:
            message["content"] = ""
        return message

    def completion(self) -> dict[str, Any]:
        """The answer as a ``chat.completion``: what is committed and replayed."""
        completion: dict[str, Any] = {
            "id": self.completion_id or "chatcmpl-streamed",
            "object": "chat.completion",
            "created": self.created or 0,
            "model": self.model or "unknown",
            "choices": [
                {
                    "index": 0,
                    "message": self.message(),
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                    **self.extra_choice,
                }
            ],
        }
        if self.usage is not None:
            completion["usage"] = self.usage
        return completion


def replay_chunks(completion: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A stored completion as the chunks of a stream: the role, the content, each
    tool call whole, then the finish. Assembled, they give the stored message."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    base = {
        "id": completion.get("id", "chatcmpl-replay"),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", "unknown"),
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            **base,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    chunks = [chunk({"role": "assistant", "content": ""})]
    if message.get("reasoning_content"):
        chunks.append(chunk({"reasoning_content": message["reasoning_content"]}))
    if message.get("content"):
        chunks.append(chunk({"content": message["content"]}))
    for index, call in enumerate(message.get("tool_calls") or []):
        chunks.append(chunk({"tool_calls": [{"index": index, **call}]}))
    final = chunk({}, choice.get("finish_reason") or "stop")
    if completion.get("usage") is not None:
        final["usage"] = completion["usage"]
    chunks.append(final)
    return chunks
