"""Patience the harness can afford under its own load: seconds it was able to look.

A hold waits for the server to act (answer a DELETE, hang up on a call) for a
patience of 2 s, then lets go and records that the server did not act. That is
a judgment, and it must not be made while the harness itself was too busy to
notice the answer. With a thousand clients in one trio loop, every await is a
turn of a scheduler with hundreds of tasks in line: an answer that arrived in a
millisecond can take seconds to be read (``sessctl chaos --clients 500`` beside
two busy loops saw a DELETE take 4.5 s from its start to its reading, on a
server that answered it at once).

So patience is counted on ``HarnessClock``: a clock that runs with real time
while the harness's event loop keeps up, and slows down when it does not. It
advances at each tick of a task that sleeps ``TICK`` seconds by at most
``2 * TICK``, however late the tick: a loop that takes half a second to come
around to the ticker has looked only once in that half second. An idle harness
waits its 2 s; a saturated one waits as many turns of its loop as an idle one
makes in 2 s. A server that waits for the engine never answers at all, so the
verdict is the same, only later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

TICK = 0.05
"""Seconds between the clock's ticks."""

MOST_PER_TICK = 2 * TICK
"""The most one tick advances the clock, however late it came (a loop that lags
less than this is not held to be lagging)."""


class HarnessClock:
    """Seconds during which the harness was able to look (see the module docstring).

    ``run`` must be running (in the nursery of the workload that waits on it)."""

    def __init__(self) -> None:
        self.now = 0.0
        """Seconds counted so far."""
        self.lag = 0.0
        """Real seconds not counted (the loop came around too late to look)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        last = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep(TICK)
            now = trio.current_time()
            elapsed = now - last
            counted = min(elapsed, MOST_PER_TICK)
            self.now += counted
            self.lag += elapsed - counted
            last = now

    async def within(self, patience: float, waiting: Callable[[], Awaitable[object]]) -> bool:
        """Await ``waiting()`` for ``patience`` seconds of this clock: True if it
        returned. It may be called again after a timeout, so it must wait for a
        state (an event, a count), not for a change."""
        due = self.now + patience
        while True:
            left = due - self.now
            if left <= 0:
                return False
            # Real time runs at least as fast as this clock, so no wake-up comes
            # early; and none more often than the clock can move.
            with trio.move_on_after(max(left, TICK)):
                await waiting()
                return True
