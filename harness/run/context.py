"""What one run learned, shared by the runner (which writes it) and the checks
(which judge it). It lives here, below both, so neither imports the other's
module for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.model.profile import TrajectoryState
from harness.results import Observation


@dataclass
class RunContext:
    """What a run has learned so far: written by ``runner.py``, read by ``checks.py``."""

    sessions: dict[str, str] = field(default_factory=dict)
    """Session step name -> the server's session id."""
    latest_session: str | None = None
    session_of_step: dict[str, str] = field(default_factory=dict)
    """HTTP step id -> the session id it addressed."""
    views: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Session id -> the trajectory as this client last saw it committed."""
    sent_messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seen_before: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Chat step -> the trajectory its session had, as the harness last saw it
    committed, when the chat was sent (to tell a one-step rollback)."""
    observations: dict[str, Observation] = field(default_factory=dict)
    not_relayed: dict[str, str] = field(default_factory=dict)
    """Streamed chat step -> why the race on its stream could not be set up (the
    server buffers, or refuses to stream): the convention's label. How such a
    stream ends says nothing about safety."""
    engine_calls: dict[str, int] = field(default_factory=dict)
    """Chat step -> the calls the chaos upstream received for it, counted once the
    steps are done (a label counts the calls actually seen)."""
    reads: dict[str, TrajectoryState] = field(default_factory=dict)
    """Get step -> the trajectory it read, the profile's way (on a tree, every turn)."""
    final_trajectories: dict[str, TrajectoryState | None] = field(default_factory=dict)
    """Session id -> its trajectory at the end, or None if it no longer exists."""
    unreadable_finals: dict[str, Observation] = field(default_factory=dict)
    """Session id -> the final read that answered 2xx with no trajectory the
    profile can read: a turn answered 200 cannot be found in it."""
