"""Chaos mode: a seeded random concurrent workload, recorded as a history and checked.

Clients share a small pool of sessions, so their operations collide often:
chats that extend what the client last saw, exact retries, stale writes,
GETs, DELETEs, and chats the client hangs up on mid-turn. Every chat's
upstream call gets a random script from the chaos upstream: delays, holds
released at random moments, 503s, aborts, resets, garbage; a fifth of the
answers are tool calls, and half the resets (a cut mid-stream included) are
followed by a whole answer on the next attempt. Half the DELETEs go to a
session with a turn held at the engine and another chat in flight, when one
is at that moment. With
``stream_ratio``, that share of the chats stream, and their holds, resets and
garbage come after a random chunk half of the time. Each client draws
its plan from its own RNG seeded from ``--seed``, with a fixed number of draws
per operation and a fixed share of the operations, so a seed always produces
the same plan: the same kinds of operation on the same session slots with the
same upstream faults. What each becomes still depends on the answers (a
DELETE may find its session already gone, and then a create follows), and the
interleaving depends on timing; the checker judges whatever happened.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio

from harness.errors import ScenarioFileError, TargetUnreachable, UsageError
from harness.model.profile import AGENT_TOOLS, REFERENCE_PROFILE, Profile, next_message
from harness.results import Observation, StreamEnd, answer_of
from harness.run.client import StreamProgress, TargetClient
from harness.run.lifecycle import Lifecycle
from harness.run.patience import HarnessClock
from harness.run.preflight import require_target
from harness.run.runner import RunSettings
from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind, marker, parse_behaviour, tag_of
from refserver.child import serve_in_child
from refserver.errors import ChildServerFailed
from refserver.server import RunningServer, ServerConfig, serve
from refserver.upstream import RetryPolicy
from wire.engine import Flavor, completion_for
from wire.ids import new_session_id

from .case import ScenarioText, shrunk_text
from .history import (
    Operation,
    engine_answers_unlike,
    recorded,
    stream_fields,
    upstream_events,
)
from .linearizability import CheckResult, Finding, check_history
from .shrink import Replayer, ShrinkResult, ShrinkSettings, shrink


class Fault(enum.Enum):
    DELAY = "delay"
    HOLD = "hold"
    STATUS = "503"
    ABORT = "abort"
    RESET = "reset"
    GARBAGE = "garbage"
    DISCONNECT = "disconnect"


ALL_FAULTS = frozenset(Fault)

CHAOS_RETRY = RetryPolicy(backoff_initial=0.005, backoff_max=0.1)
"""The embedded server's retry policy in chaos runs. The default backs off
50 ms, then 100, then 200, holding the session's lock all along: a reset on
every attempt would stall the other clients of that session for 350 ms."""


@dataclass(frozen=True)
class ChaosSettings:
    seed: int = 1
    ops: int | None = 2_000
    duration: float | None = None
    """Run for this many seconds instead of a number of operations."""
    clients: int = 16
    sessions: int = 8
    """Two clients a session: each turn has a rival writer. Sixteen, not eight: a client
    waits for each answer, and with eight both the harness and the reference server sat
    a quarter idle on two cores (py-spy); sixteen on eight sessions keep the same mix of
    operations at about 1.4 times the rate (``benchmarks/chaos_bench.py``)."""
    faults: frozenset[Fault] = ALL_FAULTS
    request_timeout: float = 5.0
    fault_rate: float = 0.3
    """Chance that a chat's upstream call gets a fault rather than a plain answer."""
    profile: Profile = REFERENCE_PROFILE
    """How the target spells create, GET and its turns (as for ``run-scenarios``)."""
    flavor: Flavor = "openai"
    target_wait: float = 5.0
    """How long to keep probing an external target that does not answer yet."""
    stream_ratio: float = 0.0
    """The share of chats sent with ``stream: true``."""


@dataclass
class _Slot:
    session: str | None = None
    creating: bool = False


@dataclass(frozen=True)
class PlannedOp:
    slot: int
    kind: str
    """chat, retry, stale, get, delete or hangup (a chat the client hangs up on)."""
    fault: Fault | None
    delay: float
    release_after: float
    patience: float
    cut: float
    stream: bool = False
    after_chunk: int | None = None
    """A streamed chat's hold, reset or garbage comes after this chunk (None: before any)."""
    tool_call: bool = False
    """The engine answers with a tool call."""
    recovers: bool = False
    """A reset (before any chunk, or a cut after one) is followed by a whole answer on
    the next attempt, instead of failing every attempt."""
    to_busy_session: float | None = None
    """A DELETE goes to a session with a held turn and another chat in flight, if one
    is at that moment; the number picks which (None: the planned slot)."""


# Cumulative odds of each kind of operation.
TOOL_CALL_SHARE = 0.2
"""The share of chats the engine answers with a tool call."""
BUSY_DELETE_SHARE = 0.5
"""The share of DELETEs that go to a session with a held turn and a queued chat, else
to one with a held turn, when there is one at that moment."""

_KINDS = (
    (0.45, "chat"),
    (0.55, "retry"),
    (0.63, "stale"),
    (0.83, "get"),
    (0.91, "delete"),
    (1.01, "hangup"),
)


@dataclass
class _Client:
    index: int
    rng: random.Random
    stream_rng: random.Random
    """Draws for streaming, apart: a seed's plan without streams stays what it was."""
    later_rng: random.Random
    """Draws added later (tool calls, recovering faults, DELETE placement), apart, so
    the plan a seed drew before them stays what it was."""
    plan: list[PlannedOp] = field(default_factory=list)
    views: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Session -> the trajectory as this client last saw it committed."""
    last_sent: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


PATIENCE = 2.0
"""Seconds a hold waits for the server to act before it is released anyway: for
a pending DELETE of its session to be answered (as a scenario's ``await: d1,
timeout: 2``), or, once the chat's client hung up, for the server to hang up on
the call (as ``wait: c1.cancelled, timeout: 2``). A conforming server acts in
milliseconds whatever the hold does."""


@dataclass
class _PendingDelete:
    sent: trio.Event = field(default_factory=trio.Event)
    """Its first bytes went out (or it ended without sending any): patience counts
    from here, not from a moment it spent queued in the harness."""
    answered: trio.Event = field(default_factory=trio.Event)
    outwaited: list[str] = field(default_factory=list)
    """Tags of held calls released because this DELETE was not answered in time."""


class ChaosRun:
    def __init__(
        self,
        client: TargetClient,
        upstream: ChaosUpstream,
        settings: ChaosSettings,
        run_id: str = "chaos",
        on_operation: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.should_stop = should_stop
        """Asked before each operation: True (after a Ctrl-C) issues no more."""
        self.on_operation = on_operation
        """Called with the number of operations done, after each (a progress display)."""
        self.done = 0
        self.upstream = upstream
        self.settings = settings
        self.run_id = run_id
        self.lifecycle = Lifecycle(client, settings.profile)
        self.history: list[Operation] = []
        self._slots = [_Slot() for _ in range(settings.sessions)]
        self.clients = [
            _Client(
                index,
                random.Random(settings.seed * 1_000_003 + index),
                random.Random(f"stream {settings.seed} {index}"),
                random.Random(f"later {settings.seed} {index}"),
            )
            for index in range(settings.clients)
        ]
        self._issued = 0
        self._nursery: trio.Nursery | None = None
        self._ending = trio.Event()
        """Set when the clients are done: holds waiting for a random moment let go."""
        self._hung_up: set[int] = set()
        """Chats whose client hung up."""
        self._outwaited_hangups: set[int] = set()
        """Chats whose held call the server did not stop within PATIENCE of the hang-up."""
        self._pending_deletes: dict[str, list[_PendingDelete]] = {}
        """Each session's DELETEs not yet answered, oldest first: a DELETE sent while
        another is pending (a 404 on a closing session) must not hide the first."""
        self._deleted: set[str] = set()
        """Sessions a DELETE has been answered 2xx for."""
        self._in_flight: Counter[str] = Counter()
        """Session -> its chats in flight."""
        self._held: dict[str, set[str]] = {}
        """Session -> the tags of its chats scripted to be held, not yet released."""
        self._hang_ups_judged: dict[str, list[trio.Event]] = {}
        """Session -> an event per held chat whose client is to hang up, set once the
        harness has judged whether the server stopped that call: DELETEs of the
        session wait for it, since a DELETE ends the call whatever the server does
        about the hang-up, and would hide a server that ignores it."""
        self._op_tags: dict[int, str] = {}
        """Chat ticket -> the tag its messages carry (an exact retry carries the original's)."""
        self.clock = HarnessClock()
        """What patience is counted on: it slows down when the harness lags."""
        self._stop_at = float("inf")
        """``--duration``: when the clients start no more operations."""

    async def run(self) -> list[Operation]:
        deadline = self.settings.duration
        if deadline is not None:
            self._stop_at = trio.current_time() + deadline
        # At the deadline the clients start nothing new and finish what they sent:
        # an operation cut off in flight would be missing from the history, and what
        # it did on the server (a DELETE, a committed turn) would be a false finding
        # against the operations that saw it. A server that never finishes a request
        # is cut off after the backstop all the same.
        backstop = float("inf") if deadline is None else deadline + self._drain_backstop()
        with trio.move_on_after(backstop):
            async with trio.open_nursery() as timing:
                await timing.start(self.clock.run)
                async with trio.open_nursery() as releasers:
                    self._nursery = releasers
                    async with trio.open_nursery() as clients:
                        for client in self.clients:
                            clients.start_soon(self._client_loop, client)
                    # A hold still waiting for its random moment is released now; one
                    # waiting for the server to act (to hang up on a deleted session's
                    # call, or on a client's that left) finishes that wait, on the same
                    # patience. Cut short, a server merely slow to hang up under load
                    # read as leaking (a 2,000-client run beside busy loops).
                    self._ending.set()
                timing.cancel_scope.cancel()
        # Holds still in place answer now (a server may retry a call whose client
        # is gone). Only this run's tags: the upstream may serve more runs after.
        for tag in self.tags():
            self.upstream.release(tag)
        # Upstream events are attached only now: a call that ran on after its
        # chat was answered (a leak) is exactly what the checker must see.
        history = [
            replace(
                op,
                upstream=upstream_events(
                    self.upstream.events(self._op_tags[op.id]), since=op.invoke
                ),
                outwaited=[self._op_tags[op.id]] if op.id in self._outwaited_hangups else None,
                answer_if_committed=self._answer_if_committed(op),
                engine_answers=self._engine_answers_unlike(op),
            )
            if op.id in self._op_tags
            else op
            for op in self.history
        ]
        return sorted(history, key=lambda op: op.invoke)

    def _engine_answers_unlike(self, op: Operation) -> list[dict[str, Any]] | None:
        """For a chat answered 2xx whose engine was called: the answers the engine gave
        on its successful attempts, if the chat's answer is none of them (an aborted
        completion passed on, say); else None, and the history says nothing."""
        if not op.ok or op.answer is None:
            return None
        return engine_answers_unlike(self.upstream, self._op_tags[op.id], op.answer)

    def _drain_backstop(self) -> float:
        """Seconds after the deadline before operations still in flight are cut off:
        a request may take its timeout for each read, a hold its patience."""
        return max(60.0, 4 * self.settings.request_timeout + 4 * PATIENCE)

    def _answer_if_committed(self, op: Operation) -> dict[str, Any] | None:
        """What an unknown chat committed, if it did: the upstream's last answer for
        its tag (the server may have sent the engine other messages than the client
        sent it, say through an API translation), else the predicted answer."""
        answered = self.upstream.answers(self._op_tags[op.id])
        if op.unknown and answered:
            return answered[-1]
        return op.answer_if_committed

    def tags(self) -> list[str]:
        """Every tag this run's chats carried (to clear them from the upstream)."""
        return sorted(set(self._op_tags.values()))

    def _take_ticket(self) -> int:
        self._issued += 1
        return self._issued

    def _share(self, index: int) -> int | None:
        """How many operations client ``index`` runs (None: until the deadline)."""
        if self.settings.ops is None:
            return None
        whole, extra = divmod(self.settings.ops, self.settings.clients)
        return whole + (1 if index < extra else 0)

    def _plan(self, client: _Client) -> PlannedOp:
        """The next operation, drawn with a fixed number of draws whatever happens,
        so a seed always yields the same plan for each client."""
        rng = client.rng
        slot = rng.randrange(len(self._slots))
        roll = rng.random()
        kind = next(k for limit, k in _KINDS if roll < limit)
        fault_roll, fault_pick = rng.random(), rng.random()
        delay, release_after, patience, cut = (
            rng.uniform(0.001, 0.02),
            rng.uniform(0.0, 0.05),
            rng.uniform(0.0, 0.03),
            rng.random(),
        )
        faults = sorted(self.settings.faults - {Fault.DISCONNECT}, key=lambda f: f.value)
        fault = None
        if faults and fault_roll < self.settings.fault_rate:
            fault = faults[int(fault_pick * len(faults))]
        if kind == "hangup" and Fault.DISCONNECT not in self.settings.faults:
            kind = "get"
        streams, mid_stream, chunk = (
            client.stream_rng.random() < self.settings.stream_ratio,
            client.stream_rng.random() < 0.5,
            client.stream_rng.randrange(3),
        )
        tool_call, recovers, favour_busy, busy_pick = (
            client.later_rng.random() < TOOL_CALL_SHARE,
            client.later_rng.random() < 0.5,
            client.later_rng.random() < BUSY_DELETE_SHARE,
            client.later_rng.random(),
        )
        return PlannedOp(
            slot,
            kind,
            fault,
            round(delay, 4),
            release_after,
            patience,
            cut,
            stream=streams,
            after_chunk=chunk if streams and mid_stream else None,
            tool_call=tool_call,
            recovers=recovers,
            to_busy_session=busy_pick if kind == "delete" and favour_busy else None,
        )

    def _busy_slot(self, pick: float) -> int | None:
        """A slot whose session has a turn held at the engine and another chat in
        flight (queued behind it, on a server that serialises a session's turns):
        the moment a DELETE has the most to get right. Failing that, a slot whose
        session has a turn held: a DELETE that waits for the engine still shows.
        Holds last a few milliseconds: the fallback races more DELETEs with one."""
        held = [
            (index, slot.session)
            for index, slot in enumerate(self._slots)
            if slot.session is not None
            # Held at the engine, not only scripted to be: a chat still on its way
            # (late, on a loaded machine) is not yet a turn the DELETE can race.
            and any(self.upstream.call_in_flight(t) for t in self._held.get(slot.session, ()))
            and slot.session not in self._hang_ups_judged
        ]
        queued = [index for index, session in held if self._in_flight[session] >= 2]
        busy = queued or [index for index, _ in held]
        return busy[int(pick * len(busy))] if busy else None

    async def _client_loop(self, client: _Client) -> None:
        share = self._share(client.index)
        done = 0
        while (
            (share is None or done < share)
            and not self.should_stop()
            and trio.current_time() < self._stop_at
        ):
            planned = self._plan(client)
            client.plan.append(planned)
            done += 1
            ticket = self._take_ticket()
            index = planned.slot
            if planned.to_busy_session is not None:
                busy = self._busy_slot(planned.to_busy_session)
                index = planned.slot if busy is None else busy
            slot = self._slots[index]
            while slot.session is None and slot.creating:
                await trio.lowlevel.checkpoint()  # another client is re-creating it
            if slot.session is None:
                await self._create(client, slot, ticket)
                self._finished_one()
                continue
            session = slot.session
            if planned.kind == "retry" and client.last_sent.get(session):
                messages = list(client.last_sent[session])
            elif planned.kind == "stale":
                messages = self._stale(client, session, ticket, planned.cut)
            else:
                messages = self._extend(client, session, ticket)
            if planned.kind == "get":
                await self._get(client, session, ticket)
            elif planned.kind == "delete":
                await self._delete(client, slot, session, ticket)
            else:
                await self._chat(client, session, ticket, messages, planned)
            self._finished_one()

    def _finished_one(self) -> None:
        self.done += 1
        if self.on_operation is not None:
            self.on_operation(self.done)

    # -- operations -------------------------------------------------------------------

    async def _create(self, client: _Client, slot: _Slot, ticket: int) -> None:
        if self.settings.profile.creation == "implicit":
            # Nothing to send: the first request that names the id creates it.
            now = trio.current_time()
            minted_id = new_session_id()
            minted = Observation("chaos", "create", None, None, now, now, minted=True)
            self._record(client, ticket, "create", minted_id, minted, implicit=True)
            slot.session = minted_id
            return
        slot.creating = True
        try:
            created = await self.lifecycle.create("chaos")
            if created.session is not None:
                self._record(client, ticket, "create", created.session, created.observation)
                slot.session = created.session
        finally:
            slot.creating = False

    def _extend(self, client: _Client, session: str, ticket: int) -> list[dict[str, Any]]:
        text = f"client {client.index} op {ticket} {marker(self._tag(ticket))}"
        view = client.views.get(session, [])
        return [*view, next_message(self.settings.profile, view, text)]

    def _stale(
        self, client: _Client, session: str, ticket: int, fraction: float
    ) -> list[dict[str, Any]]:
        """A writer that missed the latest turns: it builds on an older trajectory."""
        view = client.views.get(session, [])
        cut = 2 * int(fraction * (len(view) // 2))  # an even cut: whole turns only
        text = f"stale client {client.index} op {ticket} {marker(self._tag(ticket))}"
        return [*view[:cut], {"role": "user", "content": text}]

    async def _chat(
        self,
        client: _Client,
        session: str,
        ticket: int,
        messages: list[dict[str, Any]],
        planned: PlannedOp,
    ) -> None:
        # An exact retry carries the original's marker, so the upstream files its
        # calls under the original's tag: that is the tag to script for this attempt.
        tag = tag_of({"messages": messages}) or self._tag(ticket)
        hangs_up = planned.kind == "hangup"
        # Set once the client has hung up (or had its answer first): a hold on this
        # chat's call stays until then, so the hang-up comes while the call is held.
        client_done = trio.Event() if hangs_up else None
        script = self._script(planned, tag, session, ticket, client_done)
        self.upstream.script(tag, [parse_behaviour(spec) for spec in script])
        body: dict[str, Any] = {"model": "sessctl-chaos", "messages": messages}
        if self.settings.profile.appends_tool_results:
            body["tools"] = AGENT_TOOLS
        client.last_sent[session] = messages
        if planned.stream:
            body["stream"] = True
        agent = self.lifecycle.agent_of(session)
        path, headers, body = self.settings.profile.chat_request(agent, body)
        patience = planned.patience if hangs_up else float("inf")
        hang_up_after = None
        if hangs_up and planned.stream and planned.after_chunk:
            # Mid-stream: after the chunk its fault comes after (a hold there is the
            # moment a server must notice a client that left while nothing is sent).
            # Patience is only the backstop for a stream that never gets that far.
            hang_up_after, patience = planned.after_chunk, PATIENCE
        self._in_flight[session] += 1
        try:
            observation = await self._send_chat(patience, path, body, headers, hang_up_after)
            if observation.cancelled_by_scenario:
                self._hung_up.add(ticket)
        finally:
            self._in_flight[session] -= 1
            if client_done is not None:
                client_done.set()
        answer = answer_of(observation)
        if observation.status == 200 and answer is not None:
            client.views[session] = [*messages, answer]
        elif observation.status == 404:
            client.views.pop(session, None)
        self._record(
            client,
            ticket,
            "chat",
            session,
            observation,
            messages=messages,
            answer=answer,
            answer_if_committed=completion_for(body, flavor=self.settings.flavor)["choices"][0][
                "message"
            ],
            script=script,
            **(stream_fields(observation) if planned.stream else {}),
        )
        self._op_tags[ticket] = tag

    async def _send_chat(
        self,
        patience: float,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        hang_up_after: int | None = None,
    ) -> Observation:
        """Send a chat (streamed if ``body`` says so); hang up after ``patience`` s,
        or once a stream has brought ``hang_up_after`` chunks."""
        started = trio.current_time()
        with trio.move_on_after(patience):
            if body.get("stream") is True:
                observation = await self.client.send_stream(
                    "chaos",
                    path,
                    body,
                    StreamProgress(),
                    headers=headers,
                    hang_up_after=hang_up_after,
                )
                if observation.stream is not None and observation.stream.end is StreamEnd.HUNG_UP:
                    # A hang-up like any other: the outcome is unknown (the chunks
                    # read so far stay in the record).
                    return replace(observation, status=None, cancelled_by_scenario=True)
                return observation
            return await self.client.send(
                "chaos", "chat", "POST", path, json_body=body, headers=headers
            )
        return Observation(
            "chaos", "chat", None, None, started, trio.current_time(), cancelled_by_scenario=True
        )

    async def _get(self, client: _Client, session: str, ticket: int) -> None:
        observation, state = await self.lifecycle.read("chaos", session)
        messages = state.messages
        if observation.status == 200 and messages is not None:
            client.views[session] = messages
        self._record(
            client,
            ticket,
            "get",
            session,
            observation,
            messages=messages,
            num_assistant=state.num_assistant,
            turns=state.turns,
        )

    async def _delete(self, client: _Client, slot: _Slot, session: str, ticket: int) -> None:
        for judged in list(self._hang_ups_judged.get(session, ())):
            await judged.wait()  # bounded: each wait of the judgment lasts at most PATIENCE
        pending = _PendingDelete()
        self._pending_deletes.setdefault(session, []).append(pending)
        observation: Observation | None = None
        try:
            observation = await self.lifecycle.end("chaos", session, on_sent=pending.sent.set)
        finally:
            if observation is not None and observation.status in range(200, 300):
                self._deleted.add(session)
            pending.sent.set()
            pending.answered.set()
            pendings = self._pending_deletes[session]
            pendings.remove(pending)
            if not pendings:
                del self._pending_deletes[session]
        deleted = observation.status is not None and observation.status // 100 == 2
        if deleted and slot.session == session:
            slot.session = None  # the next client to pick this slot creates a new one
        extra = {"outwaited": list(pending.outwaited)} if pending.outwaited else {}
        self._record(client, ticket, "delete", session, observation, **extra)

    # -- upstream scripts -----------------------------------------------------------------

    def _script(
        self,
        planned: PlannedOp,
        tag: str,
        session: str,
        ticket: int,
        client_done: trio.Event | None = None,
    ) -> list[Any]:
        """The upstream script for one chat, in scenario syntax (it is recorded too)."""
        fault = planned.fault
        # The answer, when one comes: text, or a tool call.
        answer: Any = {"chunks": 3, "tool_call": True} if planned.tool_call else "respond"
        if fault is None:
            return [answer]
        after = planned.after_chunk
        if fault is Fault.DELAY:
            if after is not None:
                delayed = {"chunks": 3, "chunk_delay": round(planned.delay / 3, 4)}
                return [delayed | ({"tool_call": True} if planned.tool_call else {})]
            return [{"delay": planned.delay}]
        if fault is Fault.HOLD:
            self._release_later(tag, session, ticket, planned.release_after, client_done)
            held: dict[str, Any] = {"chunks": 3, "hold_after": after or 0}
            if planned.tool_call:
                held["tool_call"] = True
            return ["hold" if after is None and not planned.tool_call else held]
        if fault is Fault.RESET and planned.recovers:
            # Then a whole answer: a server that retries after relaying chunks of
            # the cut one now gets an answer, and shows it.
            cut = {"chunks": 3, "reset_after": after} if after is not None else "reset"
            return [cut, answer]
        if after is not None and fault in (Fault.RESET, Fault.GARBAGE):
            return [{"chunks": 3, f"{fault.value}_after": after}]  # every attempt
        if fault is Fault.STATUS:
            return [{"status": 503}, answer]
        if fault is Fault.ABORT:
            return ["abort", answer]
        return [fault.value]  # reset, garbage: every attempt

    def _release_later(
        self,
        tag: str,
        session: str,
        ticket: int,
        after: float,
        client_done: trio.Event | None = None,
    ) -> None:
        """Release a hold at a random moment (a chat whose client is to hang up: once
        it has, or after ``PATIENCE``), unless the server still has to act on it:

        * while a DELETE of its session is pending, only once that DELETE is
          answered. A server that preempts answers it while the call is held; one
          whose DELETE waits for the engine does not, and after ``PATIENCE`` the
          hold is released and the DELETE records that it was outwaited;
        * if the chat's client has hung up, only once the call has ended (the
          server hung up on it, or an exact retry's hold on the same tag was
          released); after ``PATIENCE`` the chat records that it was outwaited:
          the server kept the engine working for nobody;
        * once a DELETE of its session has been answered 2xx, only once the server
          has hung up on the call, or after ``PATIENCE``: a server may answer the
          DELETE a moment before the cancelled turn closes its engine connection,
          and a release in that moment would make the engine answer a turn that
          was stopped (a call still running ``PATIENCE`` later is leaked work).

        The races are made structural, as a scenario's hold does."""
        assert self._nursery is not None

        judged: trio.Event | None = None
        if client_done is not None:
            judged = trio.Event()
            self._hang_ups_judged.setdefault(session, []).append(judged)

        def end_judgment() -> None:
            if judged is not None and not judged.is_set():
                judged.set()
                judgments = self._hang_ups_judged[session]
                judgments.remove(judged)
                if not judgments:
                    del self._hang_ups_judged[session]

        async def release() -> None:
            try:
                await judge_and_release()
            finally:
                end_judgment()

        async def judge_and_release() -> None:
            if client_done is None:
                with trio.move_on_after(after):
                    await self._ending.wait()
            else:
                await self.clock.within(PATIENCE, client_done.wait)
                if ticket not in self._hung_up or not self.upstream.call_in_flight(tag):
                    # Answered, or hung up before the server made the call: nothing
                    # held for a DELETE to hide (the call may still come; that
                    # judgment takes its chances with DELETEs, as before).
                    end_judgment()
            # One after another: each DELETE gets at least PATIENCE from its sending.
            for pending in list(self._pending_deletes.get(session, ())):
                await pending.sent.wait()
                answered = await self.clock.within(PATIENCE, pending.answered.wait)
                # Only a call the server is still making can be what a DELETE waits
                # for (a chat refused 404 never made one).
                if not answered and self.upstream.call_in_flight(tag):
                    pending.outwaited.append(tag)
            if ticket in self._hung_up and await self._ignores_hang_up(tag):
                self._outwaited_hangups.add(ticket)
            elif session in self._deleted and self.upstream.call_in_flight(tag):
                await self._hung_up_on_within_patience(tag)
            self.upstream.release(tag)
            self._held[session].discard(tag)

        self._held.setdefault(session, set()).add(tag)
        self._nursery.start_soon(release)

    async def _ignores_hang_up(self, tag: str) -> bool:
        """The chat's client has hung up: does the server still run its engine call
        ``PATIENCE`` later? A call not yet made is waited for as long: a server that
        makes it for a client who is gone runs the turn on too."""
        if not self.upstream.call_in_flight(tag):
            arrived = self.upstream.count(tag, EventKind.RECEIVED) + 1

            async def arrives_or_run_ends() -> None:
                # On a conforming server the call never comes: at the run's end this
                # wait stops (as the run ends it always did), where the waits for a
                # server to hang up on a call in flight go on (``run``).
                async with trio.open_nursery() as race:
                    race.start_soon(_cancel_when, self._ending, race.cancel_scope)
                    await self.upstream.wait_for(tag, EventKind.RECEIVED, arrived)
                    race.cancel_scope.cancel()

            await self.clock.within(PATIENCE, arrives_or_run_ends)
            if not self.upstream.call_in_flight(tag):
                return False
        return not await self._hung_up_on_within_patience(tag)

    async def _hung_up_on_within_patience(self, tag: str) -> bool:
        """Wait up to ``PATIENCE`` for the call in flight to end: the server hangs up
        on it, or it is answered because another attempt's hold on the same tag (an
        exact retry shares it) was released; either way the harness did not keep it
        held for this one."""
        ended = self.upstream.ended_calls(tag) + 1
        return await self.clock.within(
            PATIENCE,
            partial(self.upstream.wait_until, lambda: self.upstream.ended_calls(tag) >= ended),
        )

    # -- the history ------------------------------------------------------------------------

    def _tag(self, ticket: int) -> str:
        return f"{self.run_id}.{ticket}"

    def _record(
        self,
        client: _Client,
        ticket: int,
        op: str,
        session: str,
        observation: Observation,
        **fields: Any,
    ) -> None:
        self.history.append(recorded(ticket, client.index, op, session, observation, **fields))


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@dataclass(frozen=True)
class ChaosReport:
    history: list[Operation]
    plans: list[list[PlannedOp]]
    """Each client's plan: what the seed decided, whatever the server answered."""
    result: CheckResult
    elapsed: float
    """Seconds the workload ran (the check is not included)."""
    check_seconds: float
    shrunk: ShrinkResult | None = None
    """The failure as a minimal scenario, when the run failed and shrinking was asked for."""
    shrink_attempted: bool = False
    shrink_skipped: str | None = None
    """Why a failure was not shrunk although shrinking was asked for."""
    lag: float = 0.0
    """Seconds the harness's event loop was too busy to look, which its patience
    did not count (``harness.run.patience``): the sign of a harness at its limit."""
    interrupted: bool = False
    """Stopped early (Ctrl-C): the history is what ran until then."""

    @property
    def ops_per_second(self) -> float:
        return len(self.history) / self.elapsed if self.elapsed else 0.0


async def run_chaos(
    settings: ChaosSettings,
    target_url: str | None = None,
    *,
    emulate: str | None = None,
    upstream_host: str = "127.0.0.1",
    upstream_port: int = 0,
    on_upstream_ready: Callable[[str], None] | None = None,
    shrink_settings: ShrinkSettings | None = None,
    on_shrinking: Callable[[], None] | None = None,
    on_operation: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    embedded_in_child: bool = True,
) -> ChaosReport:
    """The workload against a target (default: the embedded reference server), checked;
    with ``shrink_settings``, a failure is shrunk to a scenario against the same target.

    The embedded server runs in a child process, on a core of its own;
    ``embedded_in_child=False`` keeps it in this trio loop, which
    ``benchmarks/chaos_bench.py`` measures as the baseline for that choice.
    """
    unsupported = chaos_cannot_check(settings.profile)
    if unsupported is not None:
        raise UsageError(f"sessctl chaos: {unsupported}")
    upstream = ChaosUpstream(settings.flavor, tool_call_content=settings.profile.engine.content)
    async with trio.open_nursery() as nursery:
        upstream_url = await nursery.start(partial(upstream.serve, upstream_host, upstream_port))
        if on_upstream_ready is not None:
            on_upstream_ready(upstream_url)
        url = target_url
        embedded = ServerConfig(
            port=0, upstream_url=upstream.url, emulate=emulate, retry=CHAOS_RETRY
        )
        if url is None:
            server = serve_embedded if embedded_in_child else serve
            url = (await nursery.start(server, embedded)).url
        client = TargetClient(
            url,
            request_timeout=settings.request_timeout,
            health_path=settings.profile.health_path,
        )
        try:
            # A history of nothing but connection errors, or of a server that is
            # not wired to our upstream, would check as "valid".
            await require_target(
                client,
                upstream,
                settings.profile,
                wait=settings.target_wait,
                external=target_url is not None,
            )
            started = trio.current_time()
            run = ChaosRun(
                client, upstream, settings, on_operation=on_operation, should_stop=should_stop
            )
            history = await run.run()
            _check_not_vacuous(history, url)
            plans = [list(c.plan) for c in run.clients]
            elapsed = trio.current_time() - started
            lag = run.clock.lag
        finally:
            await client.aclose()
        checked = trio.current_time()
        result = check_history(
            history,
            model=settings.profile.trajectory.model,
            rollback=settings.profile.rollback == "one-step",
        )
        check_seconds = trio.current_time() - checked
        shrunk = None
        attempt = shrink_settings is not None and bool(result.findings)
        skipped = why_not_shrunk(settings.profile, interrupted=should_stop()) if attempt else None
        attempt = attempt and skipped is None
        if attempt:
            assert shrink_settings is not None
            if on_shrinking is not None:
                on_shrinking()
            shrunk, unreadable = await _shrink(
                nursery,
                upstream,
                target_url,
                embedded,
                history,
                result,
                settings,
                emulate,
                shrink_settings,
            )
            if unreadable is not None:
                attempt, skipped = False, unreadable
        nursery.cancel_scope.cancel()
    return ChaosReport(
        history,
        plans,
        result,
        elapsed,
        check_seconds,
        shrunk,
        attempt,
        shrink_skipped=skipped,
        interrupted=should_stop(),
        lag=lag,
    )


def chaos_cannot_check(profile: Profile) -> str | None:
    """Why chaos mode cannot judge a server of this profile, if it cannot: its
    checker reads the trajectory while the workload runs, as a linear or tree
    model; a log, or a read that is an export, has no such reads."""
    if profile.trajectory.log:
        return (
            f"profile {profile.name!r} says every call is a record (trajectory model: log); "
            "the chaos checker models linear and tree trajectories only. Run "
            "sessctl run-scenarios with this profile: its scenarios judge a log."
        )
    if profile.read.once:
        return (
            f"profile {profile.name!r} reads each session once, as an export; the chaos "
            "checker needs reads while the workload runs. Run sessctl run-scenarios "
            "with this profile."
        )
    return None


def shrinker_wrote_unreadable(error: ScenarioFileError) -> str:
    """Why there is no scenario when the shrinker wrote one its own loader refused:
    a sessctl bug, which must not cost the run its verdict and history."""
    return (
        f"not shrunk: sessctl wrote a scenario it could not read ({error}); "
        "this is a sessctl bug, please report it with the saved history"
    )


def why_not_shrunk(profile: Profile, *, interrupted: bool, cannot: str | None = None) -> str | None:
    """Why a run's findings are not shrunk (None: they are), the first that applies:
    the user interrupted the run, the run's own reason (``cannot``: load's engine in
    another process, say), or a profile the reference server does not speak."""
    if interrupted:
        return "interrupted (Ctrl-C): the history so far is checked, not shrunk"
    return cannot or unshrinkable(profile)


def unshrinkable(profile: Profile) -> str | None:
    """Why a failure on a server of this profile cannot be shrunk (None: it can).

    Shrinking judges each candidate scenario by the reference server's answers,
    and the reference server names its sessions in the path and creates them
    with POST /sessions: on another addressing or creation, its answers say
    nothing about the target's."""
    if profile.addressing != "path" or profile.creation != "explicit" or profile.trajectory.tree:
        return (
            f"not shrunk: the expected answers come from the reference server, which does not "
            f"speak this profile (addressing {profile.addressing}, creation {profile.creation}, "
            f"a {profile.trajectory.model} trajectory); "
            "the findings above, the history and the timeline show the failure"
        )
    return None


def _check_not_vacuous(history: list[Operation], url: str) -> None:
    """A history in which nothing succeeded is linearizable, and proves nothing."""
    if not any(op.op == "chat" and op.ok for op in history):
        answered = sorted({str(op.status) for op in history if op.status is not None})
        # The bodies name the cause ("assistant message content is None..."):
        # the distinct ones the chats got, most frequent first.
        refusals = Counter(op.refusal for op in history if op.op == "chat" and op.refusal)
        quoted = "; ".join(
            f"{text} (x{count})" if count > 1 else text
            for text, count in refusals.most_common(QUOTED_REFUSALS)
        )
        more = len(refusals) - QUOTED_REFUSALS
        raise TargetUnreachable(
            f"no chat on {url} succeeded in {len(history)} operations "
            f"(statuses seen: {', '.join(answered) or 'none'}); such a history proves nothing"
            + (f"; the chats were answered: {quoted}" if quoted else "")
            + (f"; and {more} other answer(s)" if more > 0 else "")
        )


QUOTED_REFUSALS = 5
"""How many distinct refusals a chaos run that proved nothing quotes."""


def describe_target(target_url: str | None, emulate: str | None) -> str:
    """What a chaos run ran against, in words: its URL, or the embedded server."""
    if target_url is not None:
        return target_url
    return "the reference server" + (f" emulating {emulate}" if emulate else "")


async def serve_embedded(
    config: ServerConfig, *, task_status: trio.TaskStatus[RunningServer]
) -> None:
    try:
        await serve_in_child(config, task_status=task_status)
    except ChildServerFailed as error:
        raise TargetUnreachable(f"the embedded reference server: {error}") from None


async def _shrink(
    nursery: trio.Nursery,
    upstream: ChaosUpstream,
    target_url: str | None,
    embedded: ServerConfig,
    history: list[Operation],
    result: CheckResult,
    settings: ChaosSettings,
    emulate: str | None,
    shrink_settings: ShrinkSettings,
) -> tuple[ShrinkResult | None, str | None]:
    against = describe_target(target_url, emulate)

    def text_for(finding: Finding) -> ScenarioText:
        return shrunk_text(
            f"chaos-seed{settings.seed}-{finding.kind}",
            f"sessctl chaos (seed {settings.seed}, against {against})",
            finding,
        )

    return await shrink_on(
        nursery,
        upstream,
        target_url,
        embedded,
        history,
        result.findings,
        settings.profile,
        settings.request_timeout,
        shrink_settings,
        text_for,
    )


async def shrink_on(
    nursery: trio.Nursery,
    upstream: ChaosUpstream,
    target_url: str | None,
    embedded: ServerConfig,
    history: list[Operation],
    findings: list[Finding],
    profile: Profile,
    request_timeout: float,
    shrink_settings: ShrinkSettings,
    text_for: Callable[[Finding], ScenarioText],
) -> tuple[ShrinkResult | None, str | None]:
    """Shrink ``findings`` of ``history`` against the same target, judged by a fresh
    reference server (for chaos and load runs and explored cells alike): the
    scenario (None if none replays), and why there is none when the shrinker
    wrote one its own loader refused (``shrinker_wrote_unreadable``).

    The embedded server (the reference, or a variant) is replayed in-process,
    where settling is exact; an external target is replayed where it runs.
    """
    reference_url = (await nursery.start(serve, replace(embedded, emulate=None))).url
    in_process = target_url is None
    url = target_url or (await nursery.start(serve, embedded)).url
    target = TargetClient(
        url,
        request_timeout=request_timeout,
        in_process=in_process,
        health_path=profile.health_path,
    )
    reference = TargetClient(reference_url, request_timeout=request_timeout, in_process=True)
    try:
        # Settling is exact in-process, so a short grace for upstream events will do.
        run_settings = RunSettings(
            request_timeout=request_timeout,
            event_grace=0.25,
            timing_bounds=False,
            profile=profile,
        )
        replayer = Replayer(upstream, target, reference, run_settings)
        return await shrink(history, findings, replayer, text_for, shrink_settings), None
    except ScenarioFileError as error:
        return None, shrinker_wrote_unreadable(error)
    finally:
        await target.aclose()
        await reference.aclose()


__all__ = [
    "ALL_FAULTS",
    "ChaosReport",
    "ChaosRun",
    "ChaosSettings",
    "Fault",
    "describe_target",
    "run_chaos",
    "serve_embedded",
    "shrink_on",
    "unshrinkable",
    "why_not_shrunk",
]
