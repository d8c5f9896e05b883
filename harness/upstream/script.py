"""The upstream's script language: markers, behaviours and events; no I/O.

The harness puts a marker ``[[sessctl:TAG]]`` in the last message of each chat
it sends, and gives each tag a script: a list of behaviours, one per call, the
last repeating. A streamed call can be cut, held or spoiled after chunk k
(``{chunks: 4, hold_after: 2}``). The chaos upstream (``chaos_upstream.py``)
plays them and records what happened as events (``sent`` once per chunk).
Scenario files name behaviours and events, so the scenario model imports this
module, never the server.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.errors import ScriptError

MARKER_PATTERN = re.compile(r"\[\[sessctl:([A-Za-z0-9_.:/-]+)\]\]")


def marker(tag: str) -> str:
    return f"[[sessctl:{tag}]]"


class Action(enum.Enum):
    RESPOND = "respond"
    DELAY = "delay"
    HOLD = "hold"
    STATUS = "status"
    ABORT = "abort"
    RESET = "reset"
    HANG = "hang"
    GARBAGE = "garbage"


@dataclass(frozen=True)
class Behaviour:
    action: Action = Action.RESPOND
    delay: float = 0.0
    status: int = 0
    chunks: int = 3
    """A streamed answer's chunks of text (or tool-call arguments), before the finishing one."""
    after: int | None = None
    """Stream ``after`` chunks, then do ``action`` (hold, reset, garbage or hang) there;
    ``chunks + 1``: after the finishing chunk, before the stream's end (``[DONE]``);
    None: the action comes before the first chunk (or before a whole answer)."""
    chunk_delay: float = 0.0
    """Seconds between a streamed answer's chunks."""
    tool_call: bool = False
    """Answer with a tool call even if the request offered no tools."""

    def describe(self) -> str:
        if self.action is Action.DELAY:
            text = f"delay {self.delay:g}s"
        elif self.action is Action.STATUS:
            text = f"status {self.status}"
        elif self.after is not None:
            text = f"{self.action.value} after chunk {self.after}"
        else:
            text = str(self.action.value)
        extras = [
            f"{self.chunks} chunks" if self.chunks != 3 else "",
            f"{self.chunk_delay:g}s between chunks" if self.chunk_delay else "",
            "tool call" if self.tool_call else "",
        ]
        return ", ".join([text, *filter(None, extras)])


_SIMPLE_ACTIONS = {a.value: a for a in Action if a not in (Action.DELAY, Action.STATUS)}
_AFTER_ACTIONS = {
    f"{a.value}_after": a for a in (Action.HOLD, Action.RESET, Action.GARBAGE, Action.HANG)
}
_STREAM_KEYS = {"chunks", "chunk_delay", "tool_call", *_AFTER_ACTIONS}


def parse_behaviour(spec: object) -> Behaviour:
    """``"hold"``, ``{"delay": 0.5}``, ``{"status": 503}``,
    ``{"chunks": 4, "hold_after": 2}``, ... -> Behaviour."""
    if isinstance(spec, str) and spec in _SIMPLE_ACTIONS:
        return Behaviour(_SIMPLE_ACTIONS[spec])
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((key, value),) = spec.items()
        if key == "delay" and isinstance(value, int | float) and value >= 0:
            return Behaviour(Action.DELAY, delay=float(value))
        if key == "status" and isinstance(value, int) and 100 <= value <= 599:
            return Behaviour(Action.STATUS, status=value)
    if isinstance(spec, Mapping) and spec and set(spec) <= _STREAM_KEYS:
        return _parse_stream_behaviour(spec)
    raise ScriptError(
        f"unknown upstream behaviour {spec!r}; expected one of "
        f"{sorted(_SIMPLE_ACTIONS)}, {{delay: SECONDS}}, {{status: CODE}}, or a stream "
        f"such as {{chunks: 4, hold_after: 2}} (keys: {', '.join(sorted(_STREAM_KEYS))})"
    )


def _parse_stream_behaviour(spec: Mapping[Any, Any]) -> Behaviour:
    def count(key: str, default: int, low: int) -> int:
        value = spec.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 10_000:
            raise ScriptError(f"{key} must be an integer from {low} to 10000; got {value!r}")
        return value

    chunks = count("chunks", 3, 1)
    afters = [key for key in _AFTER_ACTIONS if key in spec]
    if len(afters) > 1:
        raise ScriptError(f"give at most one of {', '.join(sorted(_AFTER_ACTIONS))}")
    action, after = Action.RESPOND, None
    if afters:
        action, after = _AFTER_ACTIONS[afters[0]], count(afters[0], 0, 0)
        if after > chunks + 1:
            raise ScriptError(
                f"{afters[0]}: {after} is past the stream's {chunks} chunks and its "
                f"finishing chunk ({chunks + 1}: after the finish, before [DONE])"
            )
    delay = spec.get("chunk_delay", 0.0)
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 60:
        raise ScriptError(f"chunk_delay must be 0 to 60 seconds; got {delay!r}")
    tool_call = spec.get("tool_call", False)
    if not isinstance(tool_call, bool):
        raise ScriptError(f"tool_call must be true or false; got {tool_call!r}")
    return Behaviour(
        action, chunks=chunks, after=after, chunk_delay=float(delay), tool_call=tool_call
    )


class EventKind(enum.Enum):
    RECEIVED = "received"
    SENT = "sent"
    """One chunk of a streamed answer was sent (count: N waits for chunk N)."""
    ANSWERED = "answered"
    CANCELLED = "cancelled"
    DROPPED = "dropped"


@dataclass(frozen=True)
class StepEvent:
    tag: str
    kind: EventKind
    call: int
    """1 for the tag's first call, 2 for its first retry, ..."""
    at: float
    """trio.current_time() when it happened."""
    behaviour: str
    sent_after: float | None = None
    """``received``: a moment before the server began sending the call (the
    connection was seen empty then); ``at`` is when the upstream came round to it."""


def tag_of(body: Mapping[str, Any]) -> str | None:
    """The marker tag in the request's messages, the last message first."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if isinstance(content, str):
            found = MARKER_PATTERN.findall(content)
            if found:
                return str(found[-1])
    return None
