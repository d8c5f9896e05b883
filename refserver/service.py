"""Sessions in memory, and the concurrency that carries out ``rules.py``.

Three mechanisms do all the work:

* ``Session.lock`` (strict FIFO) is held by a turn from validation through
  the upstream call to the commit.
* ``Session.turn`` is the turn holding the lock. Its cancel scope is how a
  DELETE (410) or a shutdown (503) preempts it; the reason is written on the
  turn *before* the scope is cancelled, so the turn can tell which it was.
  A DELETE answers without waiting for the preempted turn's task to unwind:
  that task can no longer commit (it checks the reason after the upstream
  call, with no checkpoint before the commit), and it is the next to run,
  closing its engine connection and answering 410.
* A client that hangs up cancels the handler's own, outer scope (see
  ``app.py``); that ``trio.Cancelled`` passes straight through here, so the
  turn commits nothing and the lock is released on the way out.

The commit happens after the upstream call with no checkpoint in between,
so nothing can interleave between "the answer arrived" and "it is committed".

A streamed turn (``chat_stream``) is the same turn: the same lock, the same
cancel scope, which now also covers relaying each chunk to the client. Its
commit point is the end of the engine's stream (finish_reason and
``[DONE]``); the finishing chunk and ``[DONE]`` reach the client only after
the commit. A DELETE, a shutdown or a hang-up before that commits nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from wire import rules
from wire.errors import (
    ServerShuttingDown,
    SessionDeleted,
    SessionNotFound,
    SessionServerError,
    StreamCut,
    TrajectoryConflict,
)
from wire.ids import new_session_id
from wire.protocol import ChatRequest
from wire.streaming import DONE, event, replay_chunks

from .upstream import Relay, StreamedAnswer, Upstream, assistant_message


@dataclass(slots=True)
class Turn:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    preempted_by: SessionServerError | None = None
    streamed: bool = False

    def preempt(self, reason: SessionServerError) -> None:
        if self.preempted_by is None:
            self.preempted_by = reason
        self.scope.cancel()


TurnResult = TypeVar("TurnResult")


@dataclass(frozen=True)
class Record:
    request: dict[str, Any]
    response: dict[str, Any]
    started_at: float
    ended_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "request": self.request,
            "response": self.response,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


@dataclass
class Session:
    session_id: str
    state: rules.SessionState = rules.SessionState.OPEN
    messages: list[dict[str, Any]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    lock: trio.StrictFIFOLock = field(default_factory=trio.StrictFIFOLock)
    turn: Turn | None = None

    def apply(self, transition: rules.Transition) -> None:
        self.state = rules.next_state(self.state, transition)

    @property
    def num_assistant(self) -> int:
        return len(self.records)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "messages": self.messages,
            "num_assistant": self.num_assistant,
            "in_flight": self.turn is not None,
            "records": [record.to_json() for record in self.records],
        }


def conflict_error(conflict: rules.Conflict) -> TrajectoryConflict:
    return TrajectoryConflict(
        f"trajectory conflict: {conflict.reason}",
        committed_length=conflict.committed_length,
        diverging_index=conflict.diverging_index,
    )


class SessionService:
    def __init__(self, upstream: Upstream, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._upstream = upstream
        self._wall_clock = wall_clock
        self._sessions: dict[str, Session] = {}
        self._shutting_down = False

    # -- trainer operations ---------------------------------------------------

    def create(self) -> str:
        if self._shutting_down:
            raise ServerShuttingDown("the server is shutting down")
        session_id = new_session_id()
        self._sessions[session_id] = Session(session_id)
        return session_id

    def get(self, session_id: str) -> dict[str, Any]:
        return self._visible(session_id).to_json()

    async def delete(self, session_id: str) -> None:
        session = self._visible(session_id)
        session.apply(rules.Transition.DELETE_ACCEPTED)
        # Shielded: once accepted, a DELETE must finish even if its own client
        # hangs up, or the session would stay CLOSING forever. The clean server
        # does not wait here at all (see ``_end_turn_in_flight``).
        with trio.CancelScope(shield=True):
            await self._end_turn_in_flight(session)
        session.apply(rules.Transition.REMOVED)
        # Remove this session object, not whatever the id maps to now.
        if self._sessions.get(session_id) is session:
            del self._sessions[session_id]

    # -- agent operation --------------------------------------------------------

    async def chat(self, session_id: str, request: ChatRequest) -> dict[str, Any]:
        session = self._session_for_chat(session_id)
        async with session.lock:
            if isinstance(self._validate_turn(session, request), rules.Replay):
                return session.records[-1].response
            return await self._proxy_and_commit(session, request)

    async def chat_stream(self, session_id: str, request: ChatRequest, relay: Relay) -> list[bytes]:
        """A streamed turn. Chunks go to ``relay`` as they arrive; the events
        returned (the finishing chunk and ``[DONE]``) are sent after the commit.

        An error raised before ``relay`` was first called is an ordinary HTTP
        answer; after it, the caller ends the stream with an error event."""
        session = self._session_for_chat(session_id)
        async with session.lock:
            if isinstance(self._validate_turn(session, request), rules.Replay):
                return [*map(event, replay_chunks(session.records[-1].response)), DONE]
            started_at = self._wall_clock()
            try:
                answer = await self._run_turn(
                    session, lambda turn: self._stream_upstream(turn, request.body, relay)
                )
            except StreamCut as cut:
                self._after_stream_cut(session, request, cut, started_at)
                raise
            self._commit(session, request, answer.completion, started_at)
            return [*answer.tail, DONE]

    def _validate_turn(self, session: Session, request: ChatRequest) -> rules.Replay | rules.Extend:
        """Under the lock: re-check the session, then decide; a conflict is raised."""
        self._admit_queued_turn(session)
        if self._shutting_down:
            raise ServerShuttingDown("the server is shutting down")
        decision = self._decide(session, request)
        if isinstance(decision, rules.Conflict):
            raise conflict_error(decision)
        return decision

    async def _proxy_and_commit(self, session: Session, request: ChatRequest) -> dict[str, Any]:
        started_at = self._wall_clock()
        completion = await self._run_turn(
            session, lambda turn: self._call_upstream(turn, request.body)
        )
        self._commit(session, request, completion, started_at)
        return completion

    async def _run_turn(
        self, session: Session, call: Callable[[Turn], Awaitable[TurnResult]]
    ) -> TurnResult:
        """The upstream call as the session's turn in flight, preemptible through its scope."""
        turn = Turn()
        session.turn = turn
        result: TurnResult | None = None
        try:
            with turn.scope:
                result = await call(turn)
        finally:
            session.turn = None
        # Checked even when the call finished: a DELETE that lands as the answer
        # arrives still wins, because its 204 promised the session is gone.
        if (preempted := turn.preempted_by) is not None:
            try:
                raise preempted
            finally:
                # The traceback holds this frame: were the error still in it
                # (directly or through the turn), every preempted turn would leave
                # a cycle of ~47 objects for the garbage collector to find.
                del preempted, turn
        assert result is not None
        return result

    def _commit(
        self,
        session: Session,
        request: ChatRequest,
        completion: dict[str, Any],
        started_at: float,
    ) -> None:
        # The turns already committed read back as they were committed (the
        # agent's echo of them may differ in keys the contract ignores); the new
        # ones as the agent sent them, then the answer.
        committed = session.messages
        session.messages = [
            *committed,
            *request.messages[len(committed) :],
            assistant_message(completion),
        ]
        session.records.append(
            Record(request.body, completion, started_at, ended_at=self._wall_clock())
        )

    # -- the seams: one method per step of the contract ---------------------------
    # The clean behaviour lives here; refserver/variants.py overrides exactly
    # one of these per historical bug, so the core never asks "which variant?".

    def _session_for_chat(self, session_id: str) -> Session:
        """A chat never creates a session."""
        return self._visible(session_id)

    def _admit_queued_turn(self, session: Session) -> None:
        """Re-check on taking the lock: a DELETE may have landed while this turn queued."""
        if not rules.is_visible(session.state):
            raise SessionNotFound(f"session {session.session_id} was deleted")

    def _decide(self, session: Session, request: ChatRequest) -> rules.TurnDecision:
        last_request = session.records[-1].request["messages"] if session.records else None
        return rules.classify_turn(session.messages, last_request, request.messages)

    async def _call_upstream(self, turn: Turn, body: dict[str, Any]) -> dict[str, Any]:
        """Runs inside the turn's cancel scope, so DELETE and disconnects stop the LLM work."""
        return await self._upstream.complete(body)

    async def _stream_upstream(
        self, turn: Turn, body: dict[str, Any], relay: Relay
    ) -> StreamedAnswer:
        """As ``_call_upstream``; relaying to the client happens inside the scope too."""
        turn.streamed = True
        return await self._upstream.stream(body, relay)

    def _after_stream_cut(
        self, session: Session, request: ChatRequest, cut: StreamCut, started_at: float
    ) -> None:
        """The engine's stream broke after chunks were relayed: nothing is committed."""

    async def _end_turn_in_flight(self, session: Session) -> None:
        """Preempt the turn holding the lock; do not wait for its task.

        Nothing of it can commit any more. Its task, made ready by the cancel,
        runs once this DELETE has written its 204 (there is no scheduler round
        before the write, ``hypercorn_compat`` item 11): the engine connection
        is closed then, and the turn answers 410. DELETE used to wait for that
        (02f8cbe): 1.4 to 1.7 times slower at p50, side by side, than without
        the wait and with item 11 (``benchmarks/delete_bench.py``). Turns
        queued on the lock find the session gone when they take it (404)."""
        if session.turn is not None:
            session.turn.preempt(SessionDeleted("the session was deleted while this turn ran"))

    # -- server lifecycle -------------------------------------------------------

    def shutdown(self) -> None:
        """Refuse new work and preempt every turn in flight with 503."""
        self._shutting_down = True
        for session in self._sessions.values():
            if session.turn is not None:
                session.turn.preempt(ServerShuttingDown("the server is shutting down"))

    def _visible(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or not rules.is_visible(session.state):
            raise SessionNotFound(f"no session {session_id}")
        return session
