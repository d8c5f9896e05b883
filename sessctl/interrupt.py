"""Ctrl-C that always stops a command.

trio turns SIGINT into ``KeyboardInterrupt`` raised wherever Python happens to
be. When that is a weakref callback or a ``__del__`` (the garbage collector
runs them mid-run), Python prints "Exception ignored in ..." and drops it: a
long ``sessctl chaos`` went on, once in 17 tries, and ended VALID. Here SIGINT
is received by a task of the run instead, which raises ``KeyboardInterrupt``
at a checkpoint, where it always propagates: the CLI then exits 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

Result = TypeVar("Result")


def run_interruptibly(function: Callable[..., Awaitable[Result]], *args: Any) -> Result:
    """``trio.run(function, *args)``, stopped by SIGINT (``KeyboardInterrupt``)."""
    return trio.run(_until_interrupted, function, args)


async def _until_interrupted(
    function: Callable[..., Awaitable[Result]], args: tuple[Any, ...]
) -> Result:
    if threading.current_thread() is not threading.main_thread():
        return await function(*args)  # signals reach only the main thread
    result: list[Result] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    raise KeyboardInterrupt

        nursery.start_soon(watch)
        result.append(await function(*args))
        nursery.cancel_scope.cancel()
    return result[0]
