"""What a load run's workers are told, as JSON: both sides of the process line read it.

The master hands it to every worker inside Locust's own spawn message (a custom
option), so a worker on another machine needs nothing but the master's address.
No I/O, no trio, no gevent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from harness.errors import UsageError

PATIENCE = 2.0
"""Seconds a held engine call waits for the server to act (a DELETE to be
answered, a hung-up call to be stopped) before it is released anyway, as in
chaos mode: a conforming server acts in milliseconds whatever the hold does."""

RACES = ("chat", "retry", "read", "second-writer", "delete-in-flight", "hangup")
"""What a turn of a session's life can be:

* ``chat``: a turn that extends what the agent saw (its engine call may be
  delayed, refused 503 once, reset once, or answered with a tool call);
* ``retry``: the last request sent again, exactly;
* ``read``: a GET of the trajectory;
* ``second-writer``: a turn held at the engine while a second turn, built on the
  same trajectory, is sent on the same session;
* ``delete-in-flight``: a turn held at the engine while the session is ended
  (the session's life ends there);
* ``hangup``: a turn held at the engine whose client hangs up."""

DEFAULT_MIX = {
    "chat": 50.0,
    "retry": 8.0,
    "read": 15.0,
    "second-writer": 10.0,
    "delete-in-flight": 7.0,
    "hangup": 10.0,
}


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the agents do: the same on both sides of the process line (the run's
    ``LoadSetup`` and the workers' ``LoadSettings`` are each one of these and more)."""

    flavor: str = "openai"
    seed: int = 1
    request_timeout: float = 30.0
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    turns: tuple[int, int] = (2, 6)
    """The least and most turns of one session's life."""
    fault_rate: float = 0.2
    """The share of plain chats whose engine call gets a fault."""
    think: float = 0.0
    """Seconds an agent waits between its requests (Locust's ``wait_time``)."""
    stream_ratio: float = 0.3
    """The share of chats sent with ``stream: true`` (OpenAI-speaking profiles)."""
    real_engine: bool = False
    """The server is wired to a real engine, not the chaos upstream: no scripts, no
    holds, no engine events; the races are placed by timing alone, and only what
    needs none of those is judged (linearizability, durability, success after a
    DELETE)."""
    model: str = "sessctl-load"
    """The ``model`` of every chat (a real engine wants its own)."""

    def workload(self) -> dict[str, Any]:
        """This workload's fields alone, to build the other side's settings from."""
        return {f.name: getattr(self, f.name) for f in fields(Workload)}


@dataclass(frozen=True, kw_only=True)
class LoadSettings(Workload):
    target: str
    """The session server's URL, as the workers reach it."""
    upstream: str
    """The chaos upstream's OpenAI base URL (``.../v1``), as the workers reach it:
    they script its calls and time their operations on its clock. Several, comma
    separated, where the server spreads its calls over them (``engine_urls``)."""
    profile: dict[str, Any]
    """The target's profile, as JSON (a worker elsewhere has no profile file)."""
    run_id: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LoadSettings:
        data = json.loads(text)
        data["turns"] = tuple(data["turns"])
        return cls(**data)


def clock_offset(read: Callable[[], float], probes: int = 7) -> tuple[float, float]:
    """Another process's clock (``read()`` asks it) minus this one's ``time.monotonic()``,
    taken at the shortest of ``probes`` round trips; and half that round trip, how far
    the offset may be off."""
    best: tuple[float, float] | None = None
    for _ in range(probes):
        before = time.monotonic()
        now = read()
        after = time.monotonic()
        if best is None or after - before < best[0]:
            best = (after - before, now - (before + after) / 2)
    assert best is not None
    return best[1], best[0] / 2


def engine_urls(text: str) -> list[str]:
    """``--engine``: one base URL, or several separated by commas."""
    return [url.strip().rstrip("/") for url in text.split(",") if url.strip()]


def parse_mix(text: str) -> dict[str, float]:
    """``chat=5,read=2``: the relative weights of each kind of turn (those not named: 0)."""
    mix = dict.fromkeys(RACES, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, weight = part.partition("=")
        name = name.strip()
        if name not in mix or not equals:
            raise UsageError(
                f"--mix: {part!r} is not NAME=WEIGHT with NAME one of {', '.join(RACES)}"
            )
        try:
            mix[name] = float(weight)
        except ValueError:
            raise UsageError(
                f"--mix: the weight of {name} must be a number, not {weight!r}"
            ) from None
        if not mix[name] >= 0:
            raise UsageError(f"--mix: the weight of {name} must be 0 or more")
    if not any(mix.values()):
        raise UsageError("--mix: at least one kind of turn needs a weight above 0")
    return mix
