"""The upstream's script language: markers, behaviours and events; no I/O.

The harness puts a marker ``[[sessctl:TAG]]`` in the last message of each chat
it sends, and gives each tag a script: a list of behaviours, one per call, the
last repeating. The chaos upstream (``chaos_upstream.py``) plays them and
records what happened as events. Scenario files name behaviours and events, so
the scenario model imports this module, never the server.
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

    def describe(self) -> str:
        if self.action is Action.DELAY:
            return f"delay {self.delay:g}s"
        if self.action is Action.STATUS:
            return f"status {self.status}"
        return str(self.action.value)


_SIMPLE_ACTIONS = {a.value: a for a in Action if a not in (Action.DELAY, Action.STATUS)}


def parse_behaviour(spec: object) -> Behaviour:
    """``"hold"``, ``{"delay": 0.5}``, ``{"status": 503}``, ... -> Behaviour."""
    if isinstance(spec, str) and spec in _SIMPLE_ACTIONS:
        return Behaviour(_SIMPLE_ACTIONS[spec])
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((key, value),) = spec.items()
        if key == "delay" and isinstance(value, int | float) and value >= 0:
            return Behaviour(Action.DELAY, delay=float(value))
        if key == "status" and isinstance(value, int) and 100 <= value <= 599:
            return Behaviour(Action.STATUS, status=value)
    raise ScriptError(
        f"unknown upstream behaviour {spec!r}; expected one of "
        f"{sorted(_SIMPLE_ACTIONS)}, {{delay: SECONDS}} or {{status: CODE}}"
    )


class EventKind(enum.Enum):
    RECEIVED = "received"
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
