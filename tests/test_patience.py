"""The harness's patience clock: it runs with time while the harness keeps up, and
slows down while the event loop is too busy to look (``harness.run.patience``)."""

from __future__ import annotations

import trio
import trio.lowlevel
import trio.testing

from harness.run.patience import MOST_PER_TICK, HarnessClock


async def test_patience_runs_out_after_its_seconds_on_an_idle_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = HarnessClock()
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        started = trio.current_time()
        assert not await clock.within(2.0, trio.Event().wait)
        waited = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert 2.0 <= waited <= 2.0 + 2 * MOST_PER_TICK
    assert clock.lag == 0.0


async def test_what_comes_in_time_is_seen() -> None:
    clock = HarnessClock()
    arrived = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        nursery.start_soon(arrived.wait)
        arrived.set()
        assert await clock.within(2.0, arrived.wait)
        nursery.cancel_scope.cancel()


async def test_a_lagging_loop_stretches_patience_by_its_lag(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A task that hogs the loop: each of its turns takes a second of real time.
    clock = HarnessClock()
    answered = trio.Event()

    async def hog() -> None:
        while True:
            mock_clock.jump(1.0)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        nursery.start_soon(hog)
        started = trio.current_time()
        with trio.move_on_after(3.0):
            # Three seconds of real time were only a few turns of the loop: the
            # patience of 2 s has not run out in them.
            await clock.within(2.0, answered.wait)
            raise AssertionError("patience ran out while the loop lagged")
        answered.set()
        assert await clock.within(2.0, answered.wait)
        assert trio.current_time() - started >= 3.0
        assert clock.lag > 2.0
        nursery.cancel_scope.cancel()
