"""Accepting connections in bursts, so thousands of clients connecting at once wait less.

trio's ``SocketListener`` accepts one connection per trip through the
scheduler. A server busy with thousands of connections goes round slowly, so
when agents connect by the thousand the kernel's accept queue (at most
``net.core.somaxconn``) stays full while the burst lasts, and the kernel drops
the SYNs of the clients behind: they connect, but only after their own retry,
a second or more later.

``BurstListener`` takes the connections the kernel has queued (up to
``BURST``) each time the socket is readable, like nginx's ``multi_accept``.
In ``benchmarks/scale_bench.py`` (9,790 agents connecting at once, somaxconn
4096) the kernel counted 22,023 dropped connection attempts with trio's
listener, 8,003 with ``BURST = 64`` and 2,006 with 1,024; the larger burst
cost 37 MB more peak RSS (a thousand requests read at once), so 64.

It keeps ``trio.serve_listeners``'s contract: capacity errors (EMFILE and the
like) are raised when nothing is queued, so ``serve_listeners`` logs them and
retries; a connection that failed before it was accepted is skipped, as
trio's own listener does.
"""

from __future__ import annotations

import errno
import math
import socket
from collections import deque

import trio

BURST = 64
"""Connections taken per wakeup, at most (see above for why 64)."""

_SKIPPED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "ECONNRESET",
        "EPROTO",
        "EPERM",
        "ETIMEDOUT",
        "ENETDOWN",
        "ENETUNREACH",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ENOPROTOOPT",
        "EOPNOTSUPP",
    )
    if hasattr(errno, name)
)
"""A connection that failed between the handshake and accept(): skip it, accept the next."""


class BurstListener(trio.abc.Listener[trio.SocketStream]):
    """A listening socket whose queued connections are accepted all at once."""

    def __init__(self, listening: socket.socket, *, since: float = -math.inf) -> None:
        """``since``: when the socket began listening, if known."""
        listening.setblocking(False)
        self.socket = listening
        self._accepted: deque[tuple[socket.socket, float]] = deque()
        self._empty_at = since
        self.accepted_after = since
        """For the connection ``accept`` returned last: a moment before its client
        connected (the queue was last seen empty then). The chaos upstream bounds
        when a call's first bytes were sent with it."""

    @classmethod
    def taking_over(cls, listener: trio.SocketListener) -> BurstListener:
        """The same listening socket (say from ``trio.open_tcp_listeners``), accepting in bursts."""
        trio_socket = listener.socket
        family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
        since = trio.current_time()
        return cls(socket.socket(family, kind, proto, fileno=trio_socket.detach()), since=since)

    async def accept(self) -> trio.SocketStream:
        if self._accepted:
            # No yield between connections of one burst: yielding is what makes
            # trio's listener take one connection per scheduler round.
            await trio.lowlevel.checkpoint_if_cancelled()
        while not self._accepted:
            if self.socket.fileno() == -1:
                raise trio.ClosedResourceError("the listener was closed")
            await trio.lowlevel.wait_readable(self.socket)
            self._take_queued()
        connection, self.accepted_after = self._accepted.popleft()
        return trio.SocketStream(trio.socket.from_stdlib_socket(connection))

    def _take_queued(self) -> None:
        # Each connection of a burst connected after the queue was last seen empty.
        empty_at = self._empty_at
        while len(self._accepted) < BURST:
            before = trio.current_time()
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                self._empty_at = before
                return
            except OSError as error:
                if error.errno == errno.EBADF:
                    raise trio.ClosedResourceError from None
                if error.errno in _SKIPPED_ERRNOS:
                    continue
                if self._accepted:
                    return  # EMFILE and the like: serve what was taken, then meet it again
                raise
            self._accepted.append((connection, empty_at))

    async def aclose(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)  # wakes a pending accept()
        self.socket.close()
        while self._accepted:
            self._accepted.popleft()[0].close()
        await trio.lowlevel.checkpoint()
