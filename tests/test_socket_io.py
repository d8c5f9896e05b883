"""socket_io: trio's SocketType.recv and SocketStream.send_all, their outcomes and checkpoints,
for less memory and fewer scheduler rounds."""

from __future__ import annotations

import contextlib
import gc
import socket
import struct
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from refserver.transport.socket_io import receive, send_all, write_now

from .conftest import TaskSteps


def tcp_pair() -> tuple[trio.socket.SocketType, socket.socket]:
    """A connected TCP pair on loopback: the trio end, and the peer's plain socket."""
    server = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(server.getsockname()[:2])
    ours, _ = server.accept()
    server.close()
    ours.setblocking(False)
    return trio.socket.from_stdlib_socket(ours), peer


async def test_it_waits_for_the_bytes_then_gives_them() -> None:
    ours, peer = tcp_pair()
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _append(got, receive(ours, 100)))
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # waiting
        peer.sendall(b"hello")
    assert got == [b"hello"]
    peer.sendall(b"x" * 50)
    assert await receive(ours, 10) == b"x" * 10  # at most max_bytes
    peer.close()
    assert await receive(ours, 100) == b"x" * 40
    assert await receive(ours, 100) == b""  # the end of the stream
    ours.close()


async def test_a_reset_is_the_stdlib_oserror() -> None:
    ours, peer = tcp_pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with linger 0: an RST
    with pytest.raises(ConnectionResetError):
        await receive(ours, 100)
    ours.close()


async def test_closing_the_socket_wakes_a_waiting_read() -> None:
    ours, peer = tcp_pair()
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await receive(ours, 100)

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        ours.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        await receive(ours, 100)  # closed before: EBADF, as the stdlib says
    peer.close()


async def test_a_cancelled_read_loses_nothing_whether_or_not_it_waits() -> None:
    ours, peer = tcp_pair()
    peer.sendall(b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        await receive(ours, 100)  # a checkpoint first, as trio's recv: nothing is read
    assert scope.cancelled_caught
    assert await receive(ours, 100) == b"ready"
    with trio.move_on_after(0) as waited:
        await receive(ours, 100)  # cancelled while it waits
    assert waited.cancelled_caught
    peer.sendall(b"later")
    assert await receive(ours, 100) == b"later"
    ours.close()
    peer.close()


async def test_each_call_yields_once_whether_or_not_it_waits() -> None:
    # trio's recv and send yield after the system call even when they waited
    # already: two scheduler rounds where one is a checkpoint (hypercorn_compat
    # item 12). A write the socket takes at once does not yield at all: its
    # caller reaches a schedule point of its own straight after.
    ours, peer = tcp_pair()

    async def read_ready() -> None:
        assert await receive(ours, 100) == b"ready"

    async def read_waiting() -> None:
        assert await receive(ours, 100) == b"later"

    async def write_at_once() -> None:
        await send_all(ours, b"at once")

    for task, before in ((read_ready, b"ready"), (read_waiting, b""), (write_at_once, b"")):
        if before:
            peer.sendall(before)
        counted = TaskSteps(task.__name__)
        trio.lowlevel.add_instrument(counted)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(task)
                if task is read_waiting:
                    await trio.testing.wait_all_tasks_blocked()
                    peer.sendall(b"later")
        finally:
            trio.lowlevel.remove_instrument(counted)
        resumes = counted.steps[task.__name__] - 1  # after the step that started it
        assert resumes == (0 if task is write_at_once else 1), task.__name__
    assert peer.recv(100) == b"at once"
    ours.close()
    peer.close()


async def test_send_all_writes_everything_waiting_while_the_buffer_is_full() -> None:
    ours, peer = tcp_pair()
    data = bytes(range(256)) * 40_000  # 10 MB: more than both sockets' buffers
    sent = trio.Event()

    async def write() -> None:
        await send_all(ours, data)
        sent.set()

    received = bytearray()
    peer.setblocking(False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()  # waiting for room
        while len(received) < len(data):
            with contextlib.suppress(BlockingIOError):
                received += peer.recv(1 << 20)
            await trio.testing.wait_all_tasks_blocked()
    assert sent.is_set()
    assert received == data
    ours.close()
    peer.close()


async def test_a_write_to_a_reset_connection_is_the_stdlib_oserror() -> None:
    ours, peer = tcp_pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with linger 0: an RST
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        await send_all(ours, b"x" * 100)
    ours.close()


async def test_a_write_waiting_for_room_can_be_cancelled() -> None:
    # As trio's send_all: a peer that never reads must not hang the writer
    # (the engine's request, an answer to an agent that stopped reading).
    ours, peer = tcp_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all, ours, b"x" * 20_000_000)
        await trio.testing.wait_all_tasks_blocked()  # the buffers are full: it waits
        nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught
    ours.close()
    peer.close()


async def test_a_cancelled_write_writes_nothing() -> None:
    ours, peer = tcp_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_all(ours, b"never")  # a checkpoint first, as trio's send_all
    assert scope.cancelled_caught
    await send_all(ours, b"sent")
    assert peer.recv(100) == b"sent"
    ours.close()
    peer.close()


async def test_write_now_takes_what_the_buffer_takes_and_never_waits() -> None:
    # Synchronous: hypercorn_compat writes an answer with it outside any shield
    # (item 13), so it must neither wait nor pretend to have written more.
    ours, peer = tcp_pair()
    assert write_now(ours, b"hello") == 5
    assert peer.recv(100) == b"hello"
    data = b"x" * 20_000_000  # more than both sockets' buffers
    first = write_now(ours, data)
    assert 0 < first < len(data)
    while write_now(ours, data) > 0:
        pass  # fill what is left of the buffer
    assert write_now(ours, b"more") == 0  # full: nothing written, no wait
    ours.close()
    peer.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        write_now(ours, b"x")  # a closed socket
    ours, peer = tcp_pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with linger 0: an RST
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        write_now(ours, b"x" * 100)
    ours.close()


async def _append(into: list[bytes], read: Awaitable[bytes]) -> None:
    into.append(await read)


WAITING = 200


async def _bytes_per_waiting_read(read: Callable[[trio.SocketStream], Awaitable[object]]) -> float:
    pairs = [tcp_pair() for _ in range(WAITING)]
    streams = [trio.SocketStream(ours) for ours, _ in pairs]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(read, stream)
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            waiting = tracemalloc.get_traced_memory()[0] - before
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    for stream, (_, peer) in zip(streams, pairs, strict=True):
        await stream.aclose()
        peer.close()
    return waiting / WAITING


async def test_a_waiting_read_costs_at_least_a_kilobyte_less_than_trios() -> None:
    # The reason the module exists: at 10,000 turns held, every waiting read
    # is one agent's connection (or one engine connection) in the server's RSS.
    async def trios(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)

    async def ours(stream: trio.SocketStream) -> None:
        await receive(stream.socket, 65536)

    theirs_cost = await _bytes_per_waiting_read(trios)
    our_cost = await _bytes_per_waiting_read(ours)
    assert our_cost + 1000 < theirs_cost, (our_cost, theirs_cost)
