"""The exploration's cells, and which of them a server's profile allows; pure.

A cell is one interfering request placed at one phase of a turn's life, while
the engine behaves one way: ``held/delete/text`` is a DELETE landing while the
engine call of a plain text answer is held. ``plan`` says how the turn is
sent and what the engine does for it, or why the cell does not apply.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harness.model.profile import Profile

PHASES: dict[str, str] = {
    "received": "the turn is in the server (its body's last byte held back), before its "
    "engine call",
    "queued": "the turn waits behind another turn of its session, whose engine call is held",
    "held": "the turn's engine call is held",
    "retry-wait": "the engine failed once; the server waits before its retry",
    "streaming": "streaming: 2 chunks relayed, the engine holding the rest",
    "last-chunk": "the last content chunk relayed, the finishing chunk not yet sent",
    "finished": "the engine sent its finishing chunk, not yet the stream's end ([DONE])",
    "answered": "the turn was answered",
    "next-request": "the next turn is in the server (its body's last byte held back)",
}
"""Each phase is reached by a hold the harness controls (the engine's, or the
request body's last byte) and detected from the upstream's events and the
client's reads, never from timing."""

INTERFERERS: dict[str, str] = {
    "delete": "the session's end (DELETE)",
    "writer-same": "a second writer on the same history",
    "writer-divergent": "a second writer on an older history",
    "retry": "an exact retry of the turn",
    "get": "a read of the trajectory",
    "hangup": "the agent hangs up on the turn",
    "other-session": "a turn of another session",
    "delete-twice": "two DELETEs at once",
    "malformed": "a malformed request on the session (content: 123)",
}

BEHAVIOURS: dict[str, str] = {
    "text": "a text answer",
    "text-stream": "a streamed text answer",
    "tool-call": "a tool-call answer",
    "tool-call-stream": "a streamed tool-call answer",
    "503-then-ok": "503, then an answer on the retry",
    "abort-then-ok": "finish_reason abort, then an answer on the retry",
    "reset-then-ok": "the connection reset, then an answer on the retry",
    "cut-then-ok": "a stream cut after its first chunk, then a whole stream on a retry",
    "garbage": "an answer no client can parse, on every attempt",
}

STREAMED = frozenset({"text-stream", "tool-call-stream", "cut-then-ok"})
RELAY_PHASES = ("streaming", "last-chunk", "finished")

_FIRST_FAILURE: dict[str, list[Any]] = {
    "503-then-ok": [{"status": 503}],
    "abort-then-ok": ["abort"],
    "reset-then-ok": ["reset"],
    "cut-then-ok": [{"chunks": 3, "reset_after": 1}],
}
_SUCCESS_BY_PHASE: dict[str, dict[str, Any]] = {
    "held": {"chunks": 3, "hold_after": 0},
    "retry-wait": {"chunks": 3, "hold_after": 0},
    "streaming": {"chunks": 4, "hold_after": 2},
    "last-chunk": {"chunks": 3, "hold_after": 3},
    "finished": {"chunks": 3, "hold_after": 4},
}
CHUNKS_BEFORE_PHASE = {"streaming": 2, "last-chunk": 3, "finished": 3}
"""Content chunks the client has read when a relay phase is reached."""
ENGINE_PARTS_BEFORE_PHASE = {"streaming": 2, "last-chunk": 3, "finished": 4}
"""Parts the engine has sent (content chunks, then the finishing one) by then."""


@dataclass(frozen=True, order=True)
class Cell:
    phase: str
    interferer: str
    behaviour: str

    @property
    def name(self) -> str:
        return f"{self.phase}/{self.interferer}/{self.behaviour}"

    def describe(self) -> str:
        return (
            f"{INTERFERERS[self.interferer]}, when {PHASES[self.phase]}; "
            f"the engine: {BEHAVIOURS[self.behaviour]}"
        )


@dataclass(frozen=True)
class Plan:
    """How a cell's turn is sent and what the engine does for it."""

    script: list[Any]
    """The upstream script for the turn, in scenario syntax."""
    stream: bool
    failures: int
    """Engine attempts scripted to fail before the one the phase is placed on."""


def all_cells() -> list[Cell]:
    return [
        Cell(phase, interferer, behaviour)
        for phase in PHASES
        for interferer in INTERFERERS
        for behaviour in BEHAVIOURS
    ]


def select(cells: Iterable[Cell], patterns: Iterable[str]) -> list[Cell]:
    """The cells whose name matches any glob (``held/delete/*``, ``*/*/tool-call*``)."""
    chosen = list(patterns)
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in chosen)]


def unknown_patterns(patterns: Iterable[str]) -> list[str]:
    """Globs that match no cell at all (a typo, most likely)."""
    cells = all_cells()
    return [p for p in patterns if not select(cells, [p])]


def not_applicable(cell: Cell, profile: Profile) -> str | None:
    """Why the cell cannot exist on a server of this profile (None: it can)."""
    streamed = cell.behaviour in STREAMED
    if streamed and profile.streaming == "unsupported":
        return f"the profile {profile.name!r} declares no streaming"
    if cell.phase in RELAY_PHASES:
        if not streamed:
            return f"{BEHAVIOURS[cell.behaviour]} is not streamed: no chunk to place it after"
        if profile.streaming == "buffered":
            return (
                f"the profile {profile.name!r} declares buffered streaming: "
                "no chunk is relayed early"
            )
    if cell.phase == "retry-wait" and cell.behaviour not in (*_FIRST_FAILURE, "garbage"):
        return "the engine does not fail, so there is no retry to wait for"
    if cell.behaviour == "garbage" and cell.phase == "held":
        return "garbage is answered at once: there is no call to hold"
    if cell.interferer == "hangup" and cell.phase == "answered":
        return "nothing is in flight to hang up on once the turn was answered"
    return None


def plan(cell: Cell) -> Plan:
    """The turn's script; call only for an applicable cell."""
    tool_call = cell.behaviour.startswith("tool-call")
    if cell.behaviour == "garbage":
        return Plan(["garbage"], False, 0)
    failures = list(_FIRST_FAILURE.get(cell.behaviour, []))
    success = dict(_SUCCESS_BY_PHASE.get(cell.phase, {"chunks": 3}))
    if tool_call:
        success["tool_call"] = True
    return Plan([*failures, success], cell.behaviour in STREAMED, len(failures))
