"""Reads and writes on a trio socket without trio's layers: what a connection costs.

At scale most of the reference server's connections are waiting: an agent's
for its next request (or its hang-up) while the turn is held, and the turn's
own engine connection for the answer. trio's ``SocketStream.receive_some``
waits through ``SocketType.recv``, ``_nonblocking_helper`` and a generator
context manager, about 2.6 KB of frames and objects per waiting read beside
the task itself; ``wait_readable`` alone costs about 1 KB.
``tests/test_socket_io.py`` measures both, and ``benchmarks/scale_bench.py``
the server's RSS.

Each call is cancellable before it acts, as trio's are, and yields to the
scheduler at most once. trio's ``recv`` and ``send`` yield after the system
call even when they already waited for the socket: with them (and hypercorn's
memory channel), a request the server answers at once cost five scheduler
rounds where two do (each an ``epoll_wait`` and a trip through trio's run loop;
``hypercorn_compat`` item 12, ``benchmarks/request_cpu.py``).

- ``receive`` behaves as ``trio.socket.SocketType.recv`` does: cancellable
  before the read, never after it (what was read is returned), the stdlib's
  ``OSError`` for a reset or a closed socket, ``trio.ClosedResourceError``
  when the socket is closed while the read waits, and ``b""`` at the end of
  the stream. It yields in its wait, or (when the bytes were there at once)
  in a shielded checkpoint after the read.
- ``send_all`` behaves as ``trio.SocketStream.send_all`` does: it writes
  everything, waiting while the socket's buffer is full; it is cancellable
  before it writes and while it waits (cancelled after part of the bytes went
  out, the connection is of no further use: close it); a reset or a closed
  socket is the stdlib's ``OSError``. It yields only when it waits: its
  caller (an answer's last write, a request followed by the read of its
  answer) reaches a schedule point of its own straight after.
- ``write_now`` is the write alone, synchronous: what the buffer takes at once.
  A write that must not be cancelled half-way needs no shielded cancel scope
  when it is done before any wait (nothing can cancel synchronous code).

POSIX only, as the server is: both use ``os.read`` and ``os.write`` on the
socket's descriptor.
"""

from __future__ import annotations

import os

import trio


async def receive(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` from ``sock``, waiting until some arrive (or the end)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        try:
            data = os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            pass  # not waited for in here: the exception would be kept while it waits
        else:
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        await trio.lowlevel.wait_readable(sock)
        waited = True


def write_now(sock: trio.socket.SocketType, data: bytes | memoryview) -> int:
    """As much of ``data`` as the socket's buffer takes at once, with no wait and no
    schedule point: the number of bytes written (0 when the buffer is full); a reset
    or a closed socket is the stdlib's ``OSError``."""
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """All of ``data`` to ``sock``; a reset or a closed socket is the stdlib's ``OSError``,
    a socket closed while the write waits ``trio.ClosedResourceError``."""
    await trio.lowlevel.checkpoint_if_cancelled()
    with memoryview(data) as whole:
        sent = 0
        while sent < len(whole):
            written = write_now(sock, whole[sent:])
            if not written:
                await trio.lowlevel.wait_writable(sock)  # the buffer is full
            sent += written
