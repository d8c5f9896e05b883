"""Known-broken variants of the reference server, one historical bug each.

``sessctl serve --emulate NAME`` runs one; ``sessctl selftest`` proves the
scenario library catches every one. Each bug is one small override of a seam
of ``SessionService`` (or of the retry policy); the clean server never asks
which variant it is.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from wire import rules
from wire.errors import InvalidRequest, SessionNotFound, SessionServerError, StreamCut
from wire.protocol import ChatRequest
from wire.streaming import error_event

from .service import Session, SessionService, Turn, conflict_error
from .upstream import Relay, RetryPolicy, assistant_message


class AutocreateAfterDelete(SessionService):
    def _session_for_chat(self, session_id: str) -> Session:
        # get_or_create: an unknown or deleted id silently becomes a new session.
        session = self._sessions.get(session_id)
        if session is None or not rules.is_visible(session.state):
            session = self._sessions[session_id] = Session(session_id)
        return session


class SplitLock(SessionService):
    async def chat(self, session_id: str, request: ChatRequest) -> dict[str, Any]:
        # The lock is released around the upstream call (to keep DELETE
        # non-blocking), so two writers can both validate against the same state.
        session = self._session_for_chat(session_id)
        async with session.lock:
            self._admit_queued_turn(session)
            decision = self._decide(session, request)
            if isinstance(decision, rules.Replay):
                return session.records[-1].response
            if isinstance(decision, rules.Conflict):
                raise conflict_error(decision)
            expected_turns = session.num_assistant
        started_at = self._wall_clock()
        completion = await self._run_turn(  # outside the lock
            session, lambda turn: self._call_upstream(turn, request.body)
        )
        async with session.lock:
            if session.num_assistant != expected_turns:
                return completion  # "skipping state update": the phantom commit
            self._commit(session, request, completion, started_at)
        return completion


class DeleteWaits(SessionService):
    async def _end_turn_in_flight(self, session: Session) -> None:
        # DELETE queues on the lock behind the turn and waits out its upstream call.
        async with session.lock:
            return


class QueuedProceed(SessionService):
    def _admit_queued_turn(self, session: Session) -> None:
        pass  # no re-check after the lock: queued turns commit into a deleted session


class DoubleDeleteOk(SessionService):
    async def delete(self, session_id: str) -> None:
        # "Idempotent" DELETE: a second one also answers 204.
        with contextlib.suppress(SessionNotFound):
            await super().delete(session_id)


class LeakUpstream(SessionService):
    async def _call_upstream(self, turn: Turn, body: dict[str, Any]) -> dict[str, Any]:
        # The upstream call runs in a task of its own that DELETE never cancels:
        # the caller gets its 410 while the LLM work runs on.
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        failures: list[SessionServerError] = []

        async def detached_call() -> None:
            async with send:
                try:
                    completion = await self._upstream.complete(body)
                except SessionServerError as failure:
                    failures.append(failure)
                    return
                with contextlib.suppress(trio.BrokenResourceError):
                    send.send_nowait(completion)

        trio.lowlevel.spawn_system_task(detached_call)
        with receive:
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                raise failures[0] from None


class CommitOnDisconnect(SessionService):
    async def chat(self, session_id: str, request: ChatRequest) -> dict[str, Any]:
        # Shielded from the handler's cancellation, so a client that hung up
        # does not stop the turn, which then commits an answer nobody saw.
        with trio.CancelScope(shield=True):
            completion = await super().chat(session_id, request)
        return completion


class LastWriterWins(SessionService):
    def _decide(self, session: Session, request: ChatRequest) -> rules.TurnDecision:
        decision = super()._decide(session, request)
        if isinstance(decision, rules.Conflict) and request.messages[-1].get("role") != "assistant":
            return rules.Extend(new_messages=len(request.messages))  # overwrite the trajectory
        return decision


class CommitPartialStream(SessionService):
    def _after_stream_cut(
        self, session: Session, request: ChatRequest, cut: StreamCut, started_at: float
    ) -> None:
        # "Save what we have": the answer relayed so far is committed, although
        # the client was told the turn failed.
        if cut.partial is not None:
            self._commit(session, request, cut.partial, started_at)


class DeleteWaitsForStream(SessionService):
    async def _end_turn_in_flight(self, session: Session) -> None:
        # Streams are "too far along to stop": DELETE waits for them to finish.
        if session.turn is not None and session.turn.streamed:
            async with session.lock:
                return
        await super()._end_turn_in_flight(session)


class CommitAbandonedStream(SessionService):
    async def chat_stream(self, session_id: str, request: ChatRequest, relay: Relay) -> list[bytes]:
        # The stream is read to its end even when its client has gone (what
        # cannot be sent is dropped), and then committed: an answer nobody saw.
        with trio.CancelScope(shield=True):
            tail = await super().chat_stream(session_id, request, relay)
        return tail


class PromptTailAfterCut(SessionService):
    # The user's message is saved when a turn starts and the answer when it
    # ends; a cut stream leaves the message alone in the trajectory, and the
    # agent's retry of the turn is appended after it: the prompt twice.
    def _after_stream_cut(
        self, session: Session, request: ChatRequest, cut: StreamCut, started_at: float
    ) -> None:
        session.messages = list(request.messages)

    def _decide(self, session: Session, request: ChatRequest) -> rules.TurnDecision:
        if session.messages and session.messages[-1].get("role") != "assistant":
            return rules.Extend(new_messages=len(request.messages))
        return super()._decide(session, request)

    def _commit(
        self,
        session: Session,
        request: ChatRequest,
        completion: dict[str, Any],
        started_at: float,
    ) -> None:
        kept = session.messages
        super()._commit(session, request, completion, started_at)
        if kept and kept[-1].get("role") != "assistant":
            answers = [i for i, m in enumerate(request.messages) if m.get("role") == "assistant"]
            new = request.messages[answers[-1] + 1 if answers else 0 :]
            session.messages = [*kept, *new, assistant_message(completion)]


class DoneAfterError(SessionService):
    async def chat_stream(self, session_id: str, request: ChatRequest, relay: Relay) -> list[bytes]:
        # The stream's generator ends in a ``finally`` that always sends [DONE]:
        # after an error event too, so a client reading on sees a finished stream.
        try:
            return await super().chat_stream(session_id, request, relay)
        except StreamCut as cut:
            await relay(error_event(cut.to_body()))
            return [b"data: [DONE]\n\n"]


class GlobalLock(SessionService):
    # One lock for every session ("the store is not thread-safe"): a turn held at
    # the engine keeps every other session's turns waiting.
    def _session_for_chat(self, session_id: str) -> Session:
        session = super()._session_for_chat(session_id)
        session.lock = self._one_lock
        return session

    @functools.cached_property
    def _one_lock(self) -> trio.StrictFIFOLock:
        return trio.StrictFIFOLock()


class StreamedToolCallsDropped(SessionService):
    def _commit(
        self,
        session: Session,
        request: ChatRequest,
        completion: dict[str, Any],
        started_at: float,
    ) -> None:
        # The stream's assembler joins content deltas only: a streamed answer is
        # committed without its tool calls (the agent relayed them whole).
        if request.body.get("stream") is True:
            choice = completion["choices"][0]
            message = {k: v for k, v in choice["message"].items() if k != "tool_calls"}
            completion = {**completion, "choices": [{**choice, "message": message}]}
        super()._commit(session, request, completion, started_at)


def parse_loosely(raw: bytes) -> ChatRequest:
    # What the server checked before it had a request model: a JSON object whose
    # messages are objects with a known role. Python's json reads NaN and lone
    # surrogates; content, name, tool_calls and tool_call_id are not checked.
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from None
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in rules.ROLES:
            raise InvalidRequest(f"messages[{index}] is not a message", param="messages")
    return ChatRequest(body=body)


@dataclass(frozen=True)
class Variant:
    name: str
    bug: str
    service: type[SessionService]
    retry: RetryPolicy | None = None
    """Replaces the server's retry policy, for bugs that live there."""
    parse: Callable[[bytes], ChatRequest] | None = None
    """Replaces the request parser, for bugs of validation."""


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "autocreate-after-delete",
            "a chat on an unknown or deleted id creates the session (get-or-create)",
            AutocreateAfterDelete,
        ),
        Variant(
            "split-lock",
            "the lock is released during the upstream call; a stale commit is skipped "
            "yet answers 200 (phantom commit)",
            SplitLock,
        ),
        Variant(
            "delete-waits",
            "DELETE takes the lock without preempting and waits out the upstream call",
            DeleteWaits,
        ),
        Variant(
            "queued-proceed",
            "chats queued on the lock do not re-check for closing and commit into a "
            "deleted session",
            QueuedProceed,
        ),
        Variant("double-delete-ok", "a second DELETE also returns 204", DoubleDeleteOk),
        Variant(
            "leak-upstream",
            "DELETE answers 410 to the chat but never cancels the upstream call",
            LeakUpstream,
        ),
        Variant(
            "commit-on-disconnect",
            "a turn whose client hung up is committed anyway",
            CommitOnDisconnect,
        ),
        Variant(
            "commit-aborted",
            "an aborted completion (finish_reason: abort) is committed and answered 200 "
            "instead of retried",
            SessionService,
            retry=RetryPolicy(retry_aborts=False),
        ),
        Variant(
            "loose-input",
            'ill-typed message fields are committed (content: 123, tool_calls: "x")',
            SessionService,
            parse=parse_loosely,
        ),
        Variant(
            "commit-partial-stream",
            "when the engine's stream breaks mid-way, the partial answer is committed "
            "although the client got an error event",
            CommitPartialStream,
        ),
        Variant(
            "delete-waits-for-stream",
            "DELETE does not preempt a streamed turn; it waits for the stream to finish",
            DeleteWaitsForStream,
        ),
        Variant(
            "commit-abandoned-stream",
            "a stream whose client hung up is read to the end and committed",
            CommitAbandonedStream,
        ),
        Variant(
            "prompt-tail-after-cut",
            "a cut stream leaves the user's message committed; the agent's retry of the "
            "turn commits it again (a duplicate turn)",
            PromptTailAfterCut,
        ),
        Variant(
            "done-after-error",
            "a stream that fails after relayed chunks sends its error event, then [DONE]",
            DoneAfterError,
        ),
        Variant(
            "retry-after-relay",
            "a stream that breaks after relayed chunks is retried: the agent gets a second "
            "beginning, and a committed answer other than the one it assembled",
            SessionService,
            retry=RetryPolicy(retry_after_relay=True),
        ),
        Variant(
            "retry-after-delete",
            "a DELETE during the back-off before a retry does not stop it: the retry is "
            "sent for a session that has ended",
            SessionService,
            retry=RetryPolicy(shield_retries=True),
        ),
        Variant(
            "streamed-tool-calls-dropped",
            "a streamed answer is committed without its tool calls (only content deltas "
            "are assembled)",
            StreamedToolCallsDropped,
        ),
        Variant(
            "global-lock",
            "one lock for every session: a turn held at the engine blocks every other "
            "session's turns",
            GlobalLock,
        ),
        Variant(
            "last-writer-wins",
            "a conflicting request overwrites the trajectory instead of getting 409",
            LastWriterWins,
        ),
    ]
}
