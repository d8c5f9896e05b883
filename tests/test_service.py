"""The service layer on its own: states that HTTP tests cannot hold still."""

from __future__ import annotations

import os
from typing import Any

import h11
import pytest
import trio
import trio.testing

from refserver.service import Session, SessionService
from refserver.transport.engine_http import EngineConnections
from refserver.upstream import HttpUpstream, Relay, StreamedAnswer
from refserver.variants import DeleteWaits
from wire.errors import SessionNotFound, SessionServerError
from wire.protocol import parse_chat_request
from wire.rules import SessionState

from .conftest import FAST_RETRY, HANG_GUARD, NO_UPSTREAM_DEADLINE
from .test_engine_http import Peer


class EchoUpstream:
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}

    async def stream(self, body: dict[str, Any], relay: Relay) -> StreamedAnswer:
        await relay(b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}}]}\n\n')
        return StreamedAnswer(await self.complete(body), [])


def state_of(session: Session) -> SessionState:
    """Read afresh: mypy would otherwise keep the state narrowed by an earlier assert."""
    return session.state


def chat(text: str) -> Any:
    return parse_chat_request(f'{{"messages": [{{"role": "user", "content": "{text}"}}]}}'.encode())


def engine_saw_hang_up(stream: trio.SocketStream) -> bool:
    """Read without waiting: on loopback a closed connection's FIN has arrived
    by the time ``close`` returns, so this tells whether it was closed yet."""
    try:
        return os.read(stream.socket.fileno(), 1) == b""
    except BlockingIOError:
        return False


async def test_a_delete_does_not_wait_for_the_turn_it_preempts(nursery: trio.Nursery) -> None:
    held: list[trio.SocketStream] = []
    arrived = trio.Event()

    async def hold(stream: trio.SocketStream, connection: h11.Connection, number: int) -> bool:
        held.append(stream)
        arrived.set()
        await trio.sleep_forever()

    engine = EngineConnections(await nursery.start(Peer(hold).serve))
    service = SessionService(HttpUpstream(engine, timeout=NO_UPSTREAM_DEADLINE, retry=FAST_RETRY))
    session_id = service.create()
    session = service._sessions[session_id]
    outcomes: list[tuple[str, str]] = []

    async def turn(text: str) -> None:
        try:
            await service.chat(session_id, chat(text))
            outcomes.append((text, "committed"))
        except SessionServerError as error:
            outcomes.append((text, type(error).__name__))

    nursery.start_soon(turn, "held")
    with trio.fail_after(HANG_GUARD):
        await arrived.wait()
    nursery.start_soon(turn, "queued")
    await trio.testing.wait_all_tasks_blocked()

    await service.delete(session_id)
    # No other task has run since: the preempted turn still holds the lock, and
    # its engine connection is open; the session is already gone to everyone.
    assert session.lock.locked()
    assert outcomes == []
    assert not engine_saw_hang_up(held[0])
    assert state_of(session) is SessionState.GONE
    with pytest.raises(SessionNotFound):
        service.get(session_id)
    with pytest.raises(SessionNotFound):
        await service.delete(session_id)
    with pytest.raises(SessionNotFound):
        await service.chat(session_id, chat("after"))

    # The preempted turn's task runs next: it hangs up on the engine, answers
    # 410 and commits nothing; the queued turn finds no session.
    await trio.testing.wait_all_tasks_blocked()
    assert engine_saw_hang_up(held[0])
    assert outcomes == [("held", "SessionDeleted"), ("queued", "SessionNotFound")]
    assert session.records == []
    nursery.cancel_scope.cancel()


async def test_a_delete_whose_client_hangs_up_still_completes() -> None:
    service = SessionService(EchoUpstream())
    session_id = service.create()
    session = service._sessions[session_id]
    async with session.lock:  # a turn in flight
        with trio.CancelScope() as handler:
            handler.cancel()  # the DELETE's client hung up as it arrived...
            await service.delete(session_id)
    # ...but it was accepted, so it finished: nothing to wait for was left undone.
    assert state_of(session) is SessionState.GONE


async def test_a_waiting_delete_whose_client_hangs_up_still_completes() -> None:
    # The delete-waits variant takes the lock: its wait is shielded, as any
    # server's must be, or the session would stay CLOSING forever.
    service = DeleteWaits(EchoUpstream())
    session_id = service.create()
    session = service._sessions[session_id]
    async with trio.open_nursery() as nursery, session.lock:
        nursery.start_soon(service.delete, session_id)
        await trio.testing.wait_all_tasks_blocked()
        assert session.state is SessionState.CLOSING
        nursery.cancel_scope.cancel()  # the DELETE's handler is cancelled...
        # ...but the DELETE was accepted, so it finishes once the lock is free.
    assert state_of(session) is SessionState.GONE
