"""hypercorn_compat._AppQueue: the app's messages, as hypercorn's memory channel carried them."""

from __future__ import annotations

import trio
import trio.testing

from refserver.transport.hypercorn_compat import _AppQueue


async def test_messages_come_out_in_order_and_get_waits_for_one() -> None:
    queue = _AppQueue(limit=10)
    got: list[str] = []

    async def consume(count: int) -> None:
        for _ in range(count):
            got.append(await queue.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        for message in ("a", "b", "c"):
            await queue.put(message)
    assert got == ["a", "b", "c"]


async def test_put_waits_while_the_queue_is_full() -> None:
    # hypercorn's flow control: a body arriving faster than the app reads it
    # stops the connection's reads at max_app_queue_size messages.
    queue = _AppQueue(limit=2)
    put: list[int] = []

    async def produce() -> None:
        for number in range(4):
            await queue.put(number)
            put.append(number)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.testing.wait_all_tasks_blocked()
        assert put == [0, 1]  # the third waits
        assert await queue.get() == 0
        await trio.testing.wait_all_tasks_blocked()
        assert put == [0, 1, 2]
        assert [await queue.get() for _ in range(3)] == [1, 2, 3]
    assert put == [0, 1, 2, 3]


async def test_a_cancelled_wait_leaves_the_queue_working() -> None:
    queue = _AppQueue(limit=1)
    with trio.move_on_after(0):
        await queue.get()
    await queue.put("first")
    with trio.move_on_after(0) as blocked:
        await queue.put("dropped")
    assert blocked.cancelled_caught
    assert await queue.get() == "first"
    await queue.put("second")
    assert await queue.get() == "second"
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.put("never")  # a checkpoint first, as the channel's send
    assert scope.cancelled_caught
    with trio.move_on_after(0) as empty:
        await queue.get()
    assert empty.cancelled_caught  # "never" was not put


async def test_a_get_cancelled_while_it_waited_leaves_the_next_get_working() -> None:
    # An app that watches for a hang-up, stops watching, then reads again
    # (Starlette's StreamingResponse after a handler's own watcher): the first
    # wait left its event behind, and the second get must wait on it, not fail.
    queue = _AppQueue(limit=2)
    async with trio.open_nursery() as nursery:
        watcher = trio.CancelScope()

        async def watch() -> None:
            with watcher:
                await queue.get()

        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        watcher.cancel()
        await trio.testing.wait_all_tasks_blocked()
        got: list[str] = []

        async def read() -> None:
            got.append(await queue.get())

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await queue.put("http.disconnect")
    assert got == ["http.disconnect"]


async def test_a_put_cancelled_while_it_waited_leaves_the_next_put_working() -> None:
    queue = _AppQueue(limit=1)
    await queue.put("full")
    with trio.move_on_after(1) as blocked:  # virtual clock: nothing else runs
        await queue.put("dropped")
    assert blocked.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.put, "next")
        await trio.testing.wait_all_tasks_blocked()
        assert await queue.get() == "full"
    assert await queue.get() == "next"
