"""When CPython's cyclic garbage collector examines the whole heap: when no turn waits.

No I/O: the process's ``gc`` state is all this module touches.

CPython runs a full collection whenever its oldest generation has grown by a
quarter, and a full collection examines every tracked object. At 9,790 turns
held at the engine (about 1.7 million objects) one stopped the server for over a
second, 16 times on the way there, and a DELETE waited through it (issue 31).
The server does not need those collections: a turn, a connection, a session
leave no reference cycle when they end (``tests/test_collector.py`` drives every
path), so reference counting frees them the moment they end. Young collections
(of objects that die young) stay as CPython runs them: they are short.

So, while a server runs:

- what start-up built is examined once, then frozen (``gc.freeze``): no later
  collection looks at it again;
- CPython's own full collections are off (its oldest generation's threshold
  is out of reach);
- ``check`` runs every ``CHECK_EVERY`` seconds. Objects that reached the oldest
  generation since the last check are frozen once they number ``STEP``: that
  is not a collection (a list splice), and it keeps what a check counts small;
- everything frozen is thawed and examined (one full collection, then frozen
  again) in a lull (no request in flight and none begun since the last check)
  once the frozen objects have grown by a quarter since the last thaw:
  CPython's own rule, moved to an idle moment (with only "no turn in flight",
  9,790 session creates before a ramp were paused four times, once for 416 ms);
- and, however busy, once the frozen objects exceed ``FORCED_GROWTH`` times
  what the last thaw kept plus ``PER_TURN`` objects per turn in flight. Only a
  leak (a cycle that a path the tests miss left among frozen objects) or
  sessions piling up without a single idle moment get there; what a leak can
  hold stays bounded by that, at the price of one pause in proportion to the
  heap. The count of frozen objects is CPython's own (``gc.get_freeze_count``,
  which walks the list: about 13 ms at 2 million), so it is taken only when a
  cheaper upper bound (every object ever frozen) says a thaw may be due.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

CHECK_EVERY = 0.25
"""Seconds between checks (the server's collector task)."""

STEP = 50_000
"""Objects in the oldest generation, not yet frozen, that a check freezes."""

IDLE_GROWTH = 0.25
"""Growth of the frozen objects since the last thaw, as a share of what it kept,
at which an idle server examines them again (CPython's own threshold)."""

FORCED_GROWTH = 4.0
"""The frozen objects, as a multiple of what the last thaw kept, at which a busy
server examines them anyway (with ``PER_TURN`` per turn in flight on top)."""

PER_TURN = 1_000
"""Frozen objects allowed per turn in flight before a busy server thaws: a turn
held at the engine keeps about 170 alive, so a ramp to 10,000 turns never forces one."""

FLOOR = 200_000
"""The least 'what the last thaw kept' is taken as: a small heap is not thawed
after every handful of turns."""

NEVER = 1_000_000_000
"""An oldest-generation threshold no server reaches: CPython's full collections off."""


@dataclass(frozen=True)
class Checked:
    """What one ``check`` did (for the tests and the benchmark's probe)."""

    froze: int = 0
    """Objects frozen without a collection."""
    thawed: bool = False
    forced: bool = False
    """The thaw came with turns in flight."""


class Collector:
    """The policy above, for one process: ``install`` once, ``check`` periodically.

    Several servers in one process (the tests) share it: it is installed by the
    first and removed with the last, each of whom calls ``install``/``uninstall``.
    """

    def __init__(
        self,
        *,
        step: int = STEP,
        idle_growth: float = IDLE_GROWTH,
        forced_growth: float = FORCED_GROWTH,
        per_turn: int = PER_TURN,
        floor: int = FLOOR,
    ) -> None:
        self.step = step
        self.idle_growth = idle_growth
        self.forced_growth = forced_growth
        self.per_turn = per_turn
        self.floor = floor
        self._users = 0
        self._thresholds = gc.get_threshold()
        self.kept_at_thaw = 0
        """Objects the last thaw's full collection kept (then frozen)."""
        self.frozen_bound = 0
        """At least the objects frozen now: every object frozen since the last exact
        count (freed ones included), added to that count."""
        self.thaws = 0

    def install(self) -> None:
        self._users += 1
        if self._users == 1:
            self._thresholds = gc.get_threshold()
            young, middle, _ = self._thresholds
            gc.set_threshold(young, middle, NEVER)
            self.thaw()  # what start-up built: examined once, then frozen

    def uninstall(self) -> None:
        self._users -= 1
        if self._users == 0:
            gc.set_threshold(*self._thresholds)
            gc.unfreeze()  # back to CPython's own schedule, with nothing kept

    @property
    def installed(self) -> bool:
        return self._users > 0

    def check(self, in_flight: int, *, idle: bool | None = None) -> Checked:
        """Freeze what has grown old, and thaw if one is due (see the module docstring).
        ``in_flight``: turns in flight; ``idle``: no request is being answered
        (by default, when no turn is in flight)."""
        if not self.installed:
            return Checked()
        froze = 0
        grown = len(gc.get_objects(generation=2))
        if grown >= self.step:
            gc.freeze()
            froze = grown
            self.frozen_bound += grown
        idle = in_flight == 0 if idle is None else idle and in_flight == 0
        if self._due(in_flight, idle, self.frozen_bound):
            exact = gc.get_freeze_count()
            self.frozen_bound = exact
            if self._due(in_flight, idle, exact):
                self.thaw()
                return Checked(froze, thawed=True, forced=not idle)
        return Checked(froze)

    def _due(self, in_flight: int, idle: bool, frozen: int) -> bool:
        kept = max(self.kept_at_thaw, self.floor)
        if idle:
            return frozen >= (1 + self.idle_growth) * kept
        return frozen >= self.forced_growth * kept + self.per_turn * in_flight

    def thaw(self) -> int:
        """Examine everything (one full collection), then freeze what is left;
        returns the objects collected."""
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.kept_at_thaw = self.frozen_bound = gc.get_freeze_count()
        self.thaws += 1
        return collected


COLLECTOR = Collector()
"""The process's one collector policy (``gc`` state is the process's)."""
