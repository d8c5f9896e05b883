"""The service layer on its own: states that HTTP tests cannot hold still."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from refserver.service import Session, SessionService
from refserver.upstream import Relay, StreamedAnswer
from wire.errors import SessionNotFound
from wire.protocol import parse_chat_request
from wire.rules import SessionState


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


async def test_a_session_being_deleted_is_404_to_everyone() -> None:
    service = SessionService(EchoUpstream())
    session_id = service.create()
    session = service._sessions[session_id]
    deleted = trio.Event()

    async def delete() -> None:
        await service.delete(session_id)
        deleted.set()

    async with trio.open_nursery() as nursery:
        # Holding the lock freezes the DELETE between "accepted" and "removed".
        async with session.lock:
            nursery.start_soon(delete)
            await trio.testing.wait_all_tasks_blocked()
            assert session.state is SessionState.CLOSING
            assert not deleted.is_set()
            with pytest.raises(SessionNotFound):
                service.get(session_id)
            with pytest.raises(SessionNotFound):
                await service.delete(session_id)
            with pytest.raises(SessionNotFound):
                await service.chat(session_id, chat("during"))
        await deleted.wait()
    assert state_of(session) is SessionState.GONE
    with pytest.raises(SessionNotFound):
        service.get(session_id)


async def test_a_delete_whose_client_hangs_up_still_completes() -> None:
    service = SessionService(EchoUpstream())
    session_id = service.create()
    session = service._sessions[session_id]
    async with trio.open_nursery() as nursery, session.lock:
        nursery.start_soon(service.delete, session_id)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # the DELETE's handler is cancelled...
        # ...but the DELETE was accepted, so it finishes once the lock is free.
    assert state_of(session) is SessionState.GONE
