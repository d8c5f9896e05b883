"""A read from a trio socket without trio's layers: what a waiting connection costs.

At scale most of the reference server's connections are waiting: an agent's
for its next request (or its hang-up) while the turn is held, and the turn's
own engine connection for the answer. trio's ``SocketStream.receive_some``
waits through ``SocketType.recv``, ``_nonblocking_helper`` and a generator
context manager, about 2.6 KB of frames and objects per waiting read beside
the task itself; ``wait_readable`` alone costs about 1 KB.
``tests/test_socket_io.py`` measures both, and ``benchmarks/scale_bench.py``
the server's RSS.

``receive`` behaves as ``trio.socket.SocketType.recv`` does: the same
checkpoints (cancellable before the read, and a shielded one after it), the
stdlib's ``OSError`` for a reset or a closed socket, ``trio.ClosedResourceError``
when the socket is closed while the read waits, and ``b""`` at the end of the
stream. POSIX only, as the server is: it reads with ``os.read`` on the
socket's descriptor.
"""

from __future__ import annotations

import os

import trio


async def receive(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` from ``sock``, waiting until some arrive (or the end)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            data = os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            pass  # not waited for in here: the exception would be kept while it waits
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        await trio.lowlevel.wait_readable(sock)
