"""What the server accepts as a chat-completion request, and what it passes on (no I/O).

``docs/contract.md`` ("What the server accepts") states these rules; this
module is their executable form. The body must be strict JSON
(``strictjson``), then:

* ``messages``: a non-empty list of message objects;
* each message's ``role`` is one of ``ROLES``; ``content`` is a string, null,
  or a non-empty list of typed content parts (``text`` parts carry a string
  ``text``; other part types are passed on as they are); ``name`` and
  ``tool_call_id`` are strings; ``tool_calls`` (assistant messages only) is a
  list of function calls whose ``arguments`` are strings;
* ``stream`` is a boolean (``true`` streams the answer as Server-Sent Events),
  ``stream_options`` an object, ``n`` is 1;
* every other key, top-level (``model``, ``tools``, ``temperature``,
  ``logprobs``, vendor extras) or in a message (``reasoning_content``), is
  passed to the upstream untouched: the engine judges its own parameters.

A refusal is ``InvalidRequest`` (400) whose ``param`` names the field, with the
message index: ``messages[3].content``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wire.errors import InvalidRequest

from . import strictjson
from .rules import ROLES

# Roles whose content must be present (not null); assistant content may be
# null alongside tool calls, as the OpenAI API allows.
_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})

# Content-part types whose payload has a known shape; other types (vendor
# multimodal parts such as ``video_url``) pass on as long as ``type`` is a string.
_PART_PAYLOAD = {
    "text": ("text", str),
    "refusal": ("refusal", str),
    "image_url": ("image_url", dict),
    "input_audio": ("input_audio", dict),
    "file": ("file", dict),
}


@dataclass(frozen=True)
class ChatRequest:
    body: dict[str, Any]
    """The request as the client sent it; this is what the upstream receives."""

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body["messages"]
        return messages

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


def read_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a strict-JSON object (of any API), or ``InvalidRequest``."""
    try:
        body = strictjson.loads(raw)
    except strictjson.JsonRefused as refused:
        raise InvalidRequest(f"the body is refused: {refused}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object; got {json_type(body)}")
    return body


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = read_json_object(raw)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            f"'messages' must be a non-empty list; got {json_type(messages)}", param="messages"
        )
    for index, message in enumerate(messages):
        check_message(message, f"messages[{index}]")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be a boolean; got {json_type(stream)}", param="stream")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise InvalidRequest(
            f"n must be 1 (a turn commits one answer); got {json_type(n)} {n!r}"[:200],
            param="n",
        )
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest(
            f"stream_options must be an object; got {json_type(options)}", param="stream_options"
        )
    return ChatRequest(body=body)


def check_message(message: Any, where: str) -> None:
    """Refuse a message the contract does not accept; ``where`` names it in the error."""
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object; got {json_type(message)}", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role) if isinstance(role, str) else json_type(role)
        raise InvalidRequest(
            f"{where}.role is {shown[:80]}; expected one of {sorted(ROLES)}", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None:
        if role in _CONTENT_REQUIRED:
            raise InvalidRequest(
                f"{where}.content is required for a {role} message", param=f"{where}.content"
            )
        if role == "assistant" and not message.get("tool_calls"):
            raise InvalidRequest(
                f"{where}.content is required for an assistant message without tool_calls",
                param=f"{where}.content",
            )
    elif isinstance(content, list):
        _check_parts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise InvalidRequest(
            f"{where}.content must be a string, null, or a list of content parts; "
            f"got {json_type(content)}",
            param=f"{where}.content",
        )
    for key in ("name", "tool_call_id"):
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(
                f"{where}.{key} must be a string; got {json_type(value)}", param=f"{where}.{key}"
            )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise InvalidRequest(
            f"{where}.tool_call_id is required for a tool message", param=f"{where}.tool_call_id"
        )
    if role == "function" and not isinstance(message.get("name"), str):
        raise InvalidRequest(
            f"{where}.name is required for a function message", param=f"{where}.name"
        )
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise InvalidRequest(
                f"{where}.tool_calls is only allowed on assistant messages (this is {role})",
                param=f"{where}.tool_calls",
            )
        _check_tool_calls(tool_calls, f"{where}.tool_calls")


def _check_parts(parts: list[Any], where: str) -> None:
    if not parts:
        raise InvalidRequest(f"{where} must not be an empty list", param=where)
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"{at} must be an object; got {json_type(part)}", param=at)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise InvalidRequest(f"{at}.type must be a string; got {json_type(kind)}", param=at)
        if kind in _PART_PAYLOAD:
            key, expected = _PART_PAYLOAD[kind]
            if not isinstance(part.get(key), expected):
                wanted = "a string" if expected is str else "an object"
                raise InvalidRequest(
                    f"{at}.{key} must be {wanted} in a {kind!r} part; "
                    f"got {json_type(part.get(key))}",
                    param=f"{at}.{key}",
                )


def _check_tool_calls(tool_calls: Any, where: str) -> None:
    if not isinstance(tool_calls, list):
        raise InvalidRequest(
            f"{where} must be a list of tool calls; got {json_type(tool_calls)}", param=where
        )
    for index, call in enumerate(tool_calls):
        at = f"{where}[{index}]"
        if not isinstance(call, dict):
            raise InvalidRequest(f"{at} must be an object; got {json_type(call)}", param=at)
        for key in ("id", "type"):
            if not isinstance(call.get(key), str):
                raise InvalidRequest(
                    f"{at}.{key} must be a string; got {json_type(call.get(key))}",
                    param=f"{at}.{key}",
                )
        if call["type"] != "function":
            raise InvalidRequest(
                f"{at}.type must be 'function'; got {call['type'][:40]!r}", param=f"{at}.type"
            )
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequest(
                f"{at}.function must be an object; got {json_type(function)}",
                param=f"{at}.function",
            )
        for key in ("name", "arguments"):
            if not isinstance(function.get(key), str):
                raise InvalidRequest(
                    f"{at}.function.{key} must be a string; got {json_type(function.get(key))}",
                    param=f"{at}.function.{key}",
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
