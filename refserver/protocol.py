"""Parsing and checking the OpenAI chat-completion request body (no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .rules import ROLES


@dataclass(frozen=True)
class ChatRequest:
    body: dict[str, Any]
    """The request as the client sent it; this is what the upstream receives."""

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body["messages"]
        return messages


def parse_chat_request(raw: bytes) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{index}] must be an object", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{index}].role is {role!r}; expected one of {sorted(ROLES)}",
                param=f"messages[{index}].role",
            )
    if body.get("stream"):
        raise InvalidRequest(
            "stream: true is not supported by this server yet; send stream: false",
            param="stream",
        )
    return ChatRequest(body=body)
