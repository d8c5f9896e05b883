"""Running one cell: a session, a committed first turn, the turn under test held at
its phase, the interferer placed there, the hold released, then a read, the next
turn, a read and the end; recorded as a chaos history and checked as one.

Every wait is for something the harness can see: an upstream event, a chunk the
client read, the request body's first part written. Where a server never shows
a phase (it does not retry, it buffers its stream), the wait ends with the
turn's answer instead, and the cell says which.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import trio

from harness.chaos.history import (
    Operation,
    engine_answers_unlike,
    recorded,
    stream_fields,
    upstream_events,
)
from harness.chaos.linearizability import Finding, answer_not_from_engine, check_history
from harness.model.profile import AGENT_TOOLS, Profile, next_message
from harness.results import Observation, answer_of, describe
from harness.run.client import BodyGate, StreamProgress, TargetClient
from harness.run.lifecycle import Lifecycle
from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind, marker, parse_behaviour
from wire.engine import Flavor, completion_for
from wire.ids import new_session_id

from .cells import (
    CHUNKS_BEFORE_PHASE,
    ENGINE_PARTS_BEFORE_PHASE,
    PHASES,
    Cell,
    Plan,
    not_applicable,
    plan,
)

Outcome = Literal["passed", "failed", "untested", "not applicable"]

NAMED_FIRST = frozenset(
    {
        "answer-not-from-engine",
        "other-session-waits",
        "accepted-malformed",
        "data-after-error",
        "committed-after-error",
        "stream-mismatch",
    }
)

PATIENCE = 2.0
"""Seconds the harness waits, with a hold in place, for the server to act: a
DELETE to be answered, a hung-up turn's engine call to be stopped, another
session's turn to be answered, a relayed chunk to arrive. A conforming server
acts in milliseconds whatever the hold does; the same patience as chaos mode."""


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    outcome: Outcome
    why: str
    """passed: what happened; failed: the first finding; otherwise: why not tested."""
    findings: tuple[Finding, ...] = ()
    history: tuple[Operation, ...] = ()
    seconds: float = 0.0
    """How long the cell took, from its first request to its check."""


@dataclass
class _InFlight:
    """A request running in the background, and what came back once it ended."""

    op: str
    session: str
    tag: str | None = None
    messages: list[dict[str, Any]] | None = None
    body: dict[str, Any] | None = None
    stream: bool = False
    script: list[Any] | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    observation: Observation | None = None
    hung_up: bool = False
    outwaited: list[str] = field(default_factory=list)
    gate: BodyGate | None = None
    progress: StreamProgress = field(default_factory=StreamProgress)
    num_assistant: int | None = None
    turns: list[list[dict[str, Any]]] | None = None

    @property
    def ok(self) -> bool:
        return self.observation is not None and self.observation.succeeded


class _NotPlaced(Exception):
    def __init__(self, outcome: Outcome, why: str) -> None:
        super().__init__(why)
        self.outcome: Outcome = outcome
        self.why = why


class CellRun:
    """One cell against one target, through one upstream."""

    def __init__(
        self,
        cell: Cell,
        client: TargetClient,
        upstream: ChaosUpstream,
        profile: Profile,
        flavor: Flavor,
        run_id: str,
    ) -> None:
        self.cell = cell
        self.client = client
        self.upstream = upstream
        self.profile = profile
        self.flavor = flavor
        self.run_id = run_id
        self.lifecycle = Lifecycle(client, profile)
        self.done: list[_InFlight] = []
        self._tags: list[str] = []
        self._deleted = False
        self._blocker: _InFlight | None = None
        self._extra: list[Finding] = []
        """Findings beyond the history's: what the harness saw of the engine and holds."""
        self._malformed: _InFlight | None = None

    async def run(self) -> CellResult:
        started = trio.current_time()
        result = await self._run()
        return replace(result, seconds=trio.current_time() - started)

    async def _run(self) -> CellResult:
        why_not = not_applicable(self.cell, self.profile)
        if why_not is not None:
            return CellResult(self.cell, "not applicable", why_not)
        placed_why: _NotPlaced | None = None
        story = ""
        try:
            async with trio.open_nursery() as nursery:
                try:
                    story = await self._play(nursery, plan(self.cell))
                except _NotPlaced as not_placed:
                    placed_why = not_placed
                finally:
                    for tag in self._tags:
                        self.upstream.release(tag)
            # The upstream's events and answers are read before they are forgotten.
            history = self._history()
            extra = self._extra_findings(history)
        finally:
            self.upstream.forget(self._tags)
        result = check_history(
            history,
            model=self.profile.trajectory.model,
            rollback=self.profile.rollback == "one-step",
        )
        # What names the defect most closely first: explore's own judgements, then a
        # stream's integrity (a partial commit also fits no order of the answers),
        # then the checker's findings in its order.
        findings = tuple(
            sorted((*extra, *result.findings), key=lambda f: f.kind not in NAMED_FIRST)
        )
        if findings:
            first = findings[0]
            note = ""
            if placed_why is not None:
                note = f" (the interference itself was not placed: {placed_why.why})"
            return CellResult(
                self.cell, "failed", f"{first.kind}: {first.explanation}{note}", findings, history
            )
        if placed_why is not None:
            return CellResult(self.cell, placed_why.outcome, placed_why.why, (), history)
        return CellResult(self.cell, "passed", story, (), history)

    def _extra_findings(self, history: tuple[Operation, ...]) -> list[Finding]:
        """What explore judges beyond a history: the answer a turn got is one the
        engine gave on a successful attempt; another session is never kept waiting
        on this one's engine call; a malformed request is refused."""
        found = list(self._extra)
        by_ticket = {op.id: op for op in history}
        for ticket, request in enumerate(self.done, start=1):
            op = by_ticket.get(ticket)
            if op is None or op.op != "chat" or not op.ok or op.answer is None:
                continue
            given = engine_answers_unlike(self.upstream, request.tag or "", op.answer)
            if given is not None:
                found.append(answer_not_from_engine(op, given, request.script))
        malformed = self._malformed
        if malformed is not None and malformed.observation is not None:
            status = malformed.observation.status
            if status is not None and status // 100 == 2:
                found.append(
                    Finding(
                        "accepted-malformed",
                        malformed.session,
                        f"a chat whose last message has content 123 (not a string) was answered "
                        f"{describe(malformed.observation, limit=120)}; it must be refused (400) "
                        "and commit nothing",
                        (),
                    )
                )
        return found

    # -- the cell's life ------------------------------------------------------------

    async def _play(self, nursery: trio.Nursery, turn_plan: Plan) -> str:
        cell = self.cell
        session = await self._create("create")
        other = await self._create("create") if cell.interferer == "other-session" else None
        first = await self._chat_now(session, [], "first turn", ["respond"], stream=False)
        if not first.ok:
            raise _NotPlaced("untested", f"setup: the first turn was answered {self._said(first)}")
        view = self._view_after(first)
        if cell.phase == "queued":
            self._blocker = await self._hold_a_blocker(nursery, session, view)
        turn = self._start_chat(
            nursery,
            session,
            view,
            "turn",
            turn_plan.script,
            turn_plan.stream,
            gate=BodyGate() if cell.phase == "received" else None,
        )
        if cell.phase == "queued":
            await self._reach_queue(turn)
        elif cell.phase in ("answered", "next-request"):
            await turn.done.wait()
            if cell.phase == "next-request":
                after = self._view_after(turn) if turn.ok else view
                turn = self._start_chat(
                    nursery, session, after, "next turn", ["respond"], False, gate=BodyGate()
                )
                await self._reach_gate(turn)
        else:
            await self._reach(turn, turn_plan)
        before_interference = self.upstream.count(turn.tag or "", EventKind.RECEIVED)
        interferers = await self._interfere(nursery, session, other, turn, view)
        # An exact retry's engine call shares the turn's tag: it is not the server's retry.
        retried = (
            cell.phase == "retry-wait"
            and cell.interferer != "retry"
            and self.upstream.count(turn.tag or "", EventKind.RECEIVED) > before_interference
        )
        await self._let_go(turn)
        await turn.done.wait()
        for other_request in interferers:
            await other_request.done.wait()
        story = self._story(turn, interferers)
        await self._follow_up(session, turn, view)
        if other is not None:
            await self._read(other)
            await self._end(other)
        if retried:
            raise _NotPlaced(
                "untested",
                "the server called the engine again before the interfering request "
                "was answered: its wait before a retry is shorter than a round trip",
            )
        return story

    async def _hold_a_blocker(
        self, nursery: trio.Nursery, session: str, view: list[dict[str, Any]]
    ) -> _InFlight:
        """A turn of the session whose engine call is held, for the next to queue behind."""
        blocker = self._start_chat(nursery, session, view, "blocker", ["hold"], False)
        tag = blocker.tag or ""
        await self._until(blocker, lambda: self.upstream.count(tag, EventKind.RECEIVED) > 0)
        if blocker.done.is_set():
            raise _NotPlaced(
                "untested", f"setup: the turn to queue behind was answered {self._said(blocker)}"
            )
        return blocker

    async def _reach_queue(self, turn: _InFlight) -> None:
        """The turn was taken in while the blocker's call is held, and did not call the
        engine: it waits in the server (a server that runs a session's turns side by
        side, or refuses the second at once, has no such phase)."""
        await self.client.settle()
        if turn.done.is_set():
            raise _NotPlaced(
                "not applicable",
                f"the server does not queue a second turn of a session: it answered it "
                f"{self._said(turn)} while the first was held",
            )
        if self.upstream.count(turn.tag or "", EventKind.RECEIVED):
            raise _NotPlaced(
                "not applicable",
                "the server runs a session's turns side by side: it called the engine for "
                "the second while the first was held",
            )

    async def _reach(self, turn: _InFlight, turn_plan: Plan) -> None:
        """Wait for the turn to reach the cell's phase, or to end without it."""
        phase, tag = self.cell.phase, turn.tag or ""
        if phase == "received":
            await self._reach_gate(turn)
            return
        attempt = turn_plan.failures + 1
        if phase == "retry-wait":

            def first_failed() -> bool:
                ended = (EventKind.ANSWERED, EventKind.DROPPED, EventKind.CANCELLED)
                return any(self.upstream.count(tag, kind) for kind in ended)

            await self._until(turn, first_failed)
            if not first_failed():
                raise self._ended_early(turn, "its engine call failed")
            if turn.done.is_set():
                raise _NotPlaced(
                    "not applicable",
                    f"the server does not retry this failure: it answered the turn "
                    f"{self._said(turn)}",
                )
            return
        if phase == "held":

            def called() -> bool:
                return self.upstream.count(tag, EventKind.RECEIVED) >= attempt

            await self._until(turn, called)
            if not called():
                raise self._not_retried(turn, turn_plan)
            return
        # A relay phase: the engine has sent its parts, and the client has read them.
        parts, chunks = ENGINE_PARTS_BEFORE_PHASE[phase], CHUNKS_BEFORE_PHASE[phase]

        def sent() -> bool:
            return self.upstream.count(tag, EventKind.RECEIVED) >= attempt and (
                self._sent_on_attempt(tag, attempt) >= parts
            )

        await self._until(turn, sent)
        if not sent():
            raise self._not_retried(turn, turn_plan)
        progress = turn.progress
        with trio.move_on_after(PATIENCE):
            await progress.wait_for("chunks", chunks)
        if progress.chunks < chunks:
            raise _NotPlaced(
                "untested",
                f"the engine sent {parts} parts of its stream and held the rest, but the "
                f"client had read {progress.chunks} chunks {PATIENCE:g} s later: the server "
                "does not relay chunks as they come (declare streaming: buffered if it buffers)",
            )

    def _sent_on_attempt(self, tag: str, attempt: int) -> int:
        return sum(
            1 for e in self.upstream.events(tag) if e.kind is EventKind.SENT and e.call == attempt
        )

    def _not_retried(self, turn: _InFlight, turn_plan: Plan) -> _NotPlaced:
        if turn_plan.failures and self.upstream.count(turn.tag or "", EventKind.RECEIVED) > 0:
            return _NotPlaced(
                "not applicable",
                f"the server does not retry after this failure (it answered the turn "
                f"{self._said(turn)}), so no later attempt reaches the phase",
            )
        return self._ended_early(turn, "its engine call arrived")

    def _ended_early(self, turn: _InFlight, what: str) -> _NotPlaced:
        return _NotPlaced("untested", f"the turn was answered {self._said(turn)} before {what}")

    async def _reach_gate(self, turn: _InFlight) -> None:
        gate = turn.gate
        assert gate is not None
        await self._until(turn, gate.first_part_sent.is_set, gate.first_part_sent.wait)
        if not gate.first_part_sent.is_set():
            raise self._ended_early(turn, "its body was sent")

    async def _until(
        self,
        turn: _InFlight,
        reached: Callable[[], bool],
        wait: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Return once ``reached()`` holds or the turn has ended, whichever is first."""
        if reached() or turn.done.is_set():
            return
        async with trio.open_nursery() as nursery:

            async def condition() -> None:
                await (wait() if wait is not None else self.upstream.wait_until(reached))
                nursery.cancel_scope.cancel()

            async def ended() -> None:
                await turn.done.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(condition)
            nursery.start_soon(ended)

    # -- the interferer -------------------------------------------------------------

    async def _interfere(
        self,
        nursery: trio.Nursery,
        session: str,
        other: str | None,
        turn: _InFlight,
        view: list[dict[str, Any]],
    ) -> list[_InFlight]:
        kind = self.cell.interferer
        if kind in ("delete", "delete-twice"):
            deletes = [
                self._start_end(nursery, session) for _ in range(2 if kind == "delete-twice" else 1)
            ]
            await self._patiently(deletes, turn)
            return deletes
        if kind == "hangup":
            turn.hung_up = True
            turn.scope.cancel()
            await turn.done.wait()
            await self._stopped_within_patience(turn)
            return []
        if kind == "get":
            started = [self._start(nursery, "get", session, self._read_into)]
        elif kind == "retry":
            started = [
                self._start_chat(
                    nursery,
                    session,
                    [],  # an exact retry sends the turn's messages, whatever the base
                    "retry",
                    turn.script or ["respond"],
                    turn.stream,
                    exact=turn,
                )
            ]
        elif kind == "malformed":
            # On top of what is committed, so that only its ill-typed field can refuse it.
            latest = self._view_after(turn) if turn.ok else view
            self._malformed = self._start_malformed(nursery, session, latest)
            started = []
            await self._malformed.done.wait()
        elif kind == "other-session":
            assert other is not None
            started = [self._start_chat(nursery, other, [], "other session", ["respond"], False)]
        else:
            base = view if kind == "writer-same" else []
            started = [self._start_chat(nursery, session, base, kind, ["respond"], False)]
        # Let the server take the request in, then let the turn go on: a second
        # writer may rightly wait for the first, a read or another session may not.
        if not all(request.done.is_set() for request in started):
            await self.client.settle()
        if kind == "other-session":
            with trio.move_on_after(PATIENCE):
                await started[0].done.wait()
            if not started[0].done.is_set() and self._held(turn):
                self._extra.append(
                    Finding(
                        "other-session-waits",
                        started[0].session,
                        f"a turn of another session was not answered while this session's "
                        f"turn was held ({PHASES[self.cell.phase]}); it waited until the "
                        f"harness let the held turn go after {PATIENCE:g} s: sessions are "
                        "not independent (a lock wider than one session?)",
                        (),
                    )
                )
        return started

    async def _patiently(self, requests: list[_InFlight], turn: _InFlight) -> None:
        """Wait for ``requests`` while the turn is held; after PATIENCE, record that the
        server kept them waiting on the hold (the finding is the checker's)."""
        with trio.move_on_after(PATIENCE):
            for request in requests:
                await request.done.wait()
            return
        if self._held(turn) and turn.tag is not None:
            for request in requests:
                if not request.done.is_set():
                    request.outwaited.append(turn.tag)

    def _held(self, turn: _InFlight) -> bool:
        """The turn's engine call is in flight (or its body is held back)."""
        if turn.gate is not None and not turn.gate.opened.is_set():
            return True
        return turn.tag is not None and self.upstream.call_in_flight(turn.tag)

    async def _stopped_within_patience(self, turn: _InFlight) -> None:
        """The turn's client hung up: its engine call must end within PATIENCE."""
        tag = turn.tag or ""
        if not self.upstream.call_in_flight(tag):
            return
        with trio.move_on_after(PATIENCE):
            await self._until_call_ends(tag)
            return
        turn.outwaited.append(tag)

    async def _until_call_ends(self, tag: str) -> None:
        await self.upstream.wait_until(lambda: not self.upstream.call_in_flight(tag))

    async def _let_go(self, turn: _InFlight) -> None:
        """Release the turn's hold; after an accepted DELETE, only once the server has
        stopped the call (or after PATIENCE): a release in the moment between the
        DELETE's answer and the call's cancellation would make the engine answer a
        turn that was stopped."""
        for held in filter(None, (self._blocker, turn)):
            tag = held.tag or ""
            if self._deleted and self.upstream.call_in_flight(tag):
                with trio.move_on_after(PATIENCE):
                    await self._until_call_ends(tag)
            self.upstream.release(tag)
            if held is self._blocker and turn.hung_up:
                # A turn whose client hung up while it was queued must never reach
                # the engine; once the blocker is through, the server has had its chance.
                await held.done.wait()
                await self.client.settle()
                if self.upstream.call_in_flight(turn.tag or ""):
                    await self._stopped_within_patience(turn)
        if turn.gate is not None:
            turn.gate.open()

    # -- after the race ---------------------------------------------------------------

    async def _follow_up(self, session: str, turn: _InFlight, view: list[dict[str, Any]]) -> None:
        read = await self._read(session)
        latest = view
        messages = read.messages if read.observation and read.observation.status == 200 else None
        if messages is not None:
            latest = messages
        await self._chat_now(session, latest, "next", ["respond"], stream=False)
        await self._read(session)
        if not self._deleted:
            await self._end(session)

    # -- requests -----------------------------------------------------------------------

    async def _create(self, step: str) -> str:
        if self.profile.creation == "implicit":
            session = new_session_id()
            now = trio.current_time()
            request = _InFlight("create", session)
            request.observation = Observation(step, "create", None, None, now, now, minted=True)
            request.done.set()
            self.done.append(request)
            return session
        created = await self.lifecycle.create(step)
        if created.session is None:
            raise _NotPlaced(
                "untested",
                f"setup: creating a session was answered {describe(created.observation)}",
            )
        request = _InFlight("create", created.session, observation=created.observation)
        request.done.set()
        self.done.append(request)
        return created.session

    def _start(
        self,
        nursery: trio.Nursery,
        op: str,
        session: str,
        send: Callable[[_InFlight], Awaitable[Observation]],
        request: _InFlight | None = None,
    ) -> _InFlight:
        request = request or _InFlight(op, session)

        async def run() -> None:
            started = trio.current_time()
            try:
                with request.scope:
                    request.observation = await send(request)
                if request.observation is None:
                    request.observation = Observation(
                        op, op, None, None, started, trio.current_time(), cancelled_by_scenario=True
                    )
            finally:
                self.done.append(request)
                request.done.set()

        nursery.start_soon(run)
        return request

    def _start_chat(
        self,
        nursery: trio.Nursery,
        session: str,
        base: list[dict[str, Any]],
        label: str,
        script: list[Any],
        stream: bool,
        *,
        gate: BodyGate | None = None,
        exact: _InFlight | None = None,
    ) -> _InFlight:
        if exact is not None:
            tag = exact.tag or ""
            messages = list(exact.messages or [])
        else:
            tag = f"{self.run_id}.{len(self._tags) + 1}"
            self._tags.append(tag)
            self.upstream.script(tag, [parse_behaviour(spec) for spec in script])
            messages = [*base, next_message(self.profile, base, f"{label} {marker(tag)}")]
        body: dict[str, Any] = {"model": "sessctl-explore", "messages": messages}
        if self.profile.appends_tool_results:
            body["tools"] = AGENT_TOOLS
        if stream:
            body["stream"] = True
        request = _InFlight(
            "chat",
            session,
            tag=tag,
            messages=messages,
            body=body,
            stream=stream,
            script=script,
            gate=gate,
        )
        path, headers, sent = self.profile.chat_request(self.lifecycle.agent_of(session), body)

        async def send(_: _InFlight) -> Observation:
            if stream:
                return await self.client.send_stream(
                    label, path, sent, request.progress, headers=headers, gate=gate
                )
            return await self.client.send(
                label, "chat", "POST", path, json_body=sent, headers=headers, gate=gate
            )

        return self._start(nursery, "chat", session, send, request)

    async def _chat_now(
        self,
        session: str,
        base: list[dict[str, Any]],
        label: str,
        script: list[Any],
        *,
        stream: bool,
    ) -> _InFlight:
        async with trio.open_nursery() as nursery:
            request = self._start_chat(nursery, session, base, label, script, stream)
        return request

    def _start_malformed(
        self, nursery: trio.Nursery, session: str, view: list[dict[str, Any]]
    ) -> _InFlight:
        """A chat whose last message is ill-typed; it is judged on its own (4xx, and
        nothing of it committed, which the later reads show), not as a turn."""
        body = {"model": "sessctl-explore", "messages": [*view, {"role": "user", "content": 123}]}
        path, headers, sent = self.profile.chat_request(
            self.lifecycle.agent_of(session), body, raw=True
        )
        request = _InFlight("malformed", session, body=body)

        async def send(_: _InFlight) -> Observation:
            return await self.client.send(
                "malformed", "chat", "POST", path, json_body=sent, headers=headers
            )

        return self._start(nursery, "malformed", session, send, request)

    async def _read_into(self, request: _InFlight) -> Observation:
        observation, state = await self.lifecycle.read("read", request.session)
        request.messages = state.messages
        request.num_assistant = state.num_assistant
        request.turns = state.turns
        return observation

    async def _read(self, session: str) -> _InFlight:
        async with trio.open_nursery() as nursery:
            request = self._start(nursery, "get", session, self._read_into)
        return request

    def _start_end(self, nursery: trio.Nursery, session: str) -> _InFlight:
        async def end(request: _InFlight) -> Observation:
            observation = await self.lifecycle.end("delete", request.session)
            if observation.succeeded:
                self._deleted = True
            return observation

        return self._start(nursery, "delete", session, end)

    async def _end(self, session: str) -> None:
        async with trio.open_nursery() as nursery:
            self._start_end(nursery, session)

    # -- the record -------------------------------------------------------------------

    def _view_after(self, chat: _InFlight) -> list[dict[str, Any]]:
        answer = answer_of(chat.observation)
        return [*(chat.messages or []), answer] if answer is not None else list(chat.messages or [])

    def _said(self, request: _InFlight) -> str:
        if request.observation is None:
            return "nothing yet"
        return describe(request.observation, limit=200)

    def _story(self, turn: _InFlight, interferers: list[_InFlight]) -> str:
        parts = [f"{r.op} {self._said(r)}" for r in interferers]
        parts.append(f"the turn: {self._said(turn)}")
        return "; ".join(parts)

    def _history(self) -> tuple[Operation, ...]:
        operations = []
        for ticket, request in enumerate(self.done, start=1):
            if request.op == "malformed":
                continue
            observation = request.observation
            assert observation is not None
            fields: dict[str, Any] = {}
            if request.op == "chat":
                tag = request.tag or ""
                answers = self.upstream.answers(tag)
                fields = {
                    "messages": request.messages,
                    "answer": answer_of(observation),
                    # What it committed, if it did: the engine's last answer, else the
                    # deterministic one it would give.
                    "answer_if_committed": answers[-1]
                    if answers
                    else completion_for(request.body or {}, flavor=self.flavor)["choices"][0][
                        "message"
                    ],
                    "script": request.script,
                    "upstream": upstream_events(self.upstream.events(tag), observation.started),
                    **(stream_fields(observation) if request.stream else {}),
                }
            elif request.op == "get":
                fields = {
                    "messages": request.messages,
                    "num_assistant": request.num_assistant,
                    "turns": request.turns,
                }
            if request.outwaited:
                fields["outwaited"] = list(request.outwaited)
            operations.append(
                recorded(ticket, ticket, request.op, request.session, observation, **fields)
            )
        return tuple(sorted(operations, key=lambda op: op.invoke))


__all__ = ["PATIENCE", "CellResult", "CellRun", "Outcome"]
