"""Messages as the checker compares them: any JSON value a server sends back.

The reference server compares messages with ``wire.rules.comparable``
after it has validated them, so it only ever meets well-formed ones. The
harness reads what a server *committed*, which may be anything: a role that is
a list, a message that is a number. ``message_key`` gives every JSON value a
hashable key that agrees with ``comparable`` on well-formed messages, so the
observer judges garbage (it differs from what was sent) instead of crashing
on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wire.rules import comparable

MessageKey = tuple[Any, ...]


def message_key(message: Any) -> MessageKey:
    """A hashable key: equal for messages the contract treats as the same."""
    if not isinstance(message, dict):
        return ("(not a message)", _frozen(message))
    key = comparable(message)
    try:
        hash(key)
    except TypeError:  # a list or an object where the contract has a string
        return tuple(_frozen(part) for part in key)
    return key


def keys_of(messages: Sequence[Any] | None) -> list[MessageKey]:
    return [message_key(m) for m in messages or []]


def first_divergence(left: Sequence[Any], right: Sequence[Any]) -> int | None:
    """Index of the first message that differs, or None if one is a prefix of the other."""
    for index, (a, b) in enumerate(zip(left, right, strict=False)):
        if message_key(a) != message_key(b):
            return index
    return None


def role_of(message: Any) -> Any:
    """A message's role, or None for a value that is not a message."""
    return message.get("role") if isinstance(message, dict) else None


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return ("(object)", tuple(sorted((str(k), _frozen(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return tuple(_frozen(item) for item in value)
    return value
