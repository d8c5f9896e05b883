"""Ctrl-C that always stops a command.

trio turns SIGINT into ``KeyboardInterrupt`` raised wherever Python happens to
be. When that is a weakref callback or a ``__del__`` (the garbage collector
runs them mid-run), Python prints "Exception ignored in ..." and drops it: a
long ``sessctl chaos`` went on, once in 17 tries, and ended VALID. Here SIGINT
is received by a task of the run instead, which raises ``KeyboardInterrupt``
at a checkpoint, where it always propagates: the CLI then exits 130.

A command that can stop gracefully passes a ``StopRequest``: the first Ctrl-C
sets it (no new scenario run or chaos operation starts; those under way finish,
and the reports are written from what finished, marked interrupted); the
second stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

Result = TypeVar("Result")


class StopRequest:
    """Set by the first Ctrl-C; asked by the work before it starts anything new."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


STOPPING = (
    "stopping: nothing new starts; what is under way finishes and the reports are "
    "written from it (Ctrl-C again to stop at once)"
)


def run_interruptibly(
    function: Callable[..., Awaitable[Result]], *args: Any, stop: StopRequest | None = None
) -> Result:
    """``trio.run(function, *args)``, stopped by SIGINT: at once (``KeyboardInterrupt``),
    or, given ``stop``, gracefully at the first and at once at the second."""
    return trio.run(_until_interrupted, function, args, stop)


async def _until_interrupted(
    function: Callable[..., Awaitable[Result]],
    args: tuple[Any, ...],
    stop: StopRequest | None,
) -> Result:
    if threading.current_thread() is not threading.main_thread():
        return await function(*args)  # signals reach only the main thread
    result: list[Result] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    if stop is None or stop.requested:
                        raise KeyboardInterrupt
                    stop.requested = True
                    print(STOPPING, file=sys.stderr, flush=True)

        nursery.start_soon(watch)
        result.append(await function(*args))
        nursery.cancel_scope.cancel()
    return result[0]
