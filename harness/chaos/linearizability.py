"""Checking a history against the session contract: linearizability plus invariants.

The sequential model is docs/contract.md, decided by the same rules module the
reference server uses (``wire.rules.classify_turn``). Sessions are
independent, so the history is partitioned by session id and each
sub-history is checked on its own.

The search is Wing and Gong's, with Lowe's memoisation, as in Porcupine: walk
the call/return events in time order, tentatively linearise any operation
whose call has been seen, backtrack when a return is reached whose operation
is not yet linearised, and never revisit a (linearised set, model state) pair.
Operations with an unknown outcome never return (their return is at +inf),
and the model lets them either take effect or not; to keep the search
deterministic, the model state is the *set* of states the session may be in.

On a tree-shaped trajectory (``model="tree"``) the session is a set of
branches: a chat answered 200 adds its turn (its request's messages, then its
answer) as a branch, whatever its history, and a read lists exactly the
committed turns. Which divergent turns a tree server accepts is its convention;
that every 200 is in some branch is not.

Beside linearizability, these invariants are checked on the raw history:

* durable: a chat answered 200 is a prefix of every later read trajectory (on a
  tree, a turn of every later read tree);
* streamed answers: where a streamed chat's client got [DONE], the answer
  committed after its request is the one the client assembled from the chunks;
* no 2xx on a session once a DELETE of it has completed with 2xx;
* an error event ends a stream: nothing follows it (a chunk, ``[DONE]``), and a
  stream that ended with one committed nothing (no later read has its turn,
  unless another chat with the same messages may have committed it);
* DELETE does not wait for the engine: a DELETE that the harness had to
  outwait (a held upstream call of its session was released only because the
  DELETE had gone unanswered for 2 s after it was sent, the harness's own lag
  not counted; see ``workload.PATIENCE`` and ``harness.run.patience``);
* a hang-up stops the turn: a chat whose client hung up while its upstream
  call was held, and whose server had not hung up on that call 2 s later;
* no LLM work leaks: an upstream call that a server makes after a DELETE of
  its session was accepted is never answered, and one still pending when the
  DELETE completes has ended (cancelled) within a bound (1 s) of it.

The last one is what catches servers that let queued chats proceed after a
DELETE: in statuses alone that is linearizable (the queued turn can be placed
before the DELETE), but the LLM work was done for a session being deleted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.model.messages import message_key
from harness.model.scenario import TrajectoryModel
from harness.run.checks import rolls_back_one_step
from harness.upstream.script import tag_of
from wire.rules import Conflict, Extend, Replay, classify_turn

from .history import Operation

Verdict = Literal["valid", "invalid", "unknown"]
DEFAULT_BUDGET = 2_000_000
"""Search steps per session before the verdict is "unknown" (never a hang)."""
DEFAULT_LEAK_BOUND = 1.0
"""Seconds after a DELETE completes within which pending upstream calls must be cancelled."""


# -- the sequential model ----------------------------------------------------------


Phase = Literal["new", "latent", "alive", "gone"]
"""``latent``: an id the client made up for a server that creates sessions on first
use; the session exists once a turn commits, and reads may not find it before."""


@dataclass(frozen=True, eq=False)
class State:
    phase: Phase
    messages: tuple[Any, ...] = ()
    last_request: tuple[Any, ...] | None = None
    stored_answer: Any = None
    num_assistant: int = 0
    turns: frozenset[tuple[Any, ...]] = frozenset()
    """A tree: every committed turn, each as its whole path (comparable messages)."""
    maybe: frozenset[tuple[Any, ...]] = frozenset()
    """A tree: turns of chats with an unknown outcome, which may commit at any moment
    from now on (or never). Adding to a set commutes, so one state carries them all,
    where a linear model needs one state per choice."""

    @property
    def alive(self) -> bool:
        return self.phase == "alive"

    @property
    def committed(self) -> tuple[Any, ...]:
        return tuple(message_key(m) for m in self.messages)

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.phase,
            self.committed,
            None if self.last_request is None else tuple(message_key(m) for m in self.last_request),
            None if self.stored_answer is None else message_key(self.stored_answer),
            self.num_assistant,
            self.turns,
            self.maybe,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, State) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


NOT_CREATED = State("new")
LATENT = State("latent")
ALIVE = State("alive")
GONE = State("gone")


@dataclass(frozen=True)
class Step:
    states: tuple[State, ...]
    """Where the session may be after the operation; empty if it cannot happen here."""
    reason: str = ""
    """Why not, in plain words, when ``states`` is empty."""


def step(state: State, op: Operation, model: TrajectoryModel = "linear") -> Step:
    """What ``op``, with the outcome it observed, does to a session in ``state``,
    whose trajectory is one line (``linear``) or a set of branches (``tree``)."""
    if op.op == "create" and op.implicit:
        return Step((LATENT,)) if state == NOT_CREATED else Step((), "an id was made up twice")
    if state == LATENT:
        return _latent(op, model)
    if op.op == "create":
        if op.unknown:
            return Step((state, ALIVE) if state == NOT_CREATED else (state,))
        if op.ok and state == NOT_CREATED:
            return Step((ALIVE,))
        return Step((state,)) if not op.ok else Step((), "a session was created twice")
    if op.op == "delete":
        return _delete(state, op)
    if op.op == "get":
        return _get_tree(state, op) if model == "tree" else _get(state, op)
    return _chat_tree(state, op) if model == "tree" else _chat(state, op)


def _latent(op: Operation, model: TrajectoryModel) -> Step:
    """An id not used yet, on a server that creates sessions on first use: a chat
    creates the session as if it existed empty; a read or DELETE may not find it."""
    if op.op == "chat" and model == "tree" and op.unknown and op.answer_if_committed:
        # Whether this chat brought the session into being is unknown too.
        return Step((LATENT, _branch(ALIVE, op.messages or [], op.answer_if_committed)))
    if op.op == "chat":
        outcomes = _chat_tree(ALIVE, op) if model == "tree" else _chat(ALIVE, op)
        # Whatever did not commit leaves the session as it was: not there yet.
        return Step(tuple(LATENT if s == ALIVE else s for s in outcomes.states), outcomes.reason)
    if op.unknown or op.status == 404:
        return Step((LATENT, GONE) if op.op == "delete" and op.unknown else (LATENT,))
    if op.op == "get" and op.ok and not op.messages and not op.turns:
        return Step((LATENT,))
    if op.op == "delete" and op.ok:
        return Step((GONE,))
    if not op.ok:
        return Step((LATENT,))
    return Step((), f"{op.op} answered {op.status} for an id no turn had used")


def _delete(state: State, op: Operation) -> Step:
    if op.unknown:
        return Step((state, GONE) if state.alive else (state,))
    if op.ok:
        return (
            Step((GONE,)) if state.alive else Step((), "DELETE succeeded on a session that is gone")
        )
    if op.status == 404 and state.alive:
        return Step((), "DELETE answered 404 while the session exists")
    return Step((state,))


def _get(state: State, op: Operation) -> Step:
    if op.unknown:
        return Step((state,))
    if not state.alive:
        return Step((), "GET answered 200 for a session that is gone") if op.ok else Step((state,))
    if op.status == 404:
        return Step((), "GET answered 404 while the session exists")
    if not op.ok:
        return Step((state,))
    read = tuple(message_key(m) for m in op.messages or [])
    if read != state.committed:
        return Step(
            (),
            f"GET read {len(op.messages or [])} messages, but the committed trajectory has "
            f"{len(state.messages)} here",
        )
    if op.num_assistant is not None and op.num_assistant != state.num_assistant:
        return Step(
            (), f"GET read num_assistant {op.num_assistant}, expected {state.num_assistant}"
        )
    return Step((state,))


def _chat(state: State, op: Operation) -> Step:
    messages = op.messages or []
    if not state.alive:
        if op.ok:
            return Step(
                (),
                "a chat answered 200 on a session that does not exist (auto-create, or a "
                "resurrection after its DELETE?)",
            )
        return Step((state,))
    if op.status in (404, 410):
        return Step((), f"a chat answered {op.status} while the session exists")
    decision = classify_turn(list(state.messages), _list(state.last_request), messages)
    if isinstance(decision, Conflict):
        if op.ok:
            return Step((), f"a chat answered 200 although it conflicts: {decision.reason}")
        return Step((state,))
    if isinstance(decision, Replay):
        if op.ok and message_key(op.answer or {}) != message_key(state.stored_answer or {}):
            return Step((), "an exact retry answered 200 with a different answer than was stored")
        return Step((state,))
    assert isinstance(decision, Extend)
    if op.status == 409:
        return Step((), "a chat answered 409 although it extends the committed trajectory")
    if op.ok and op.answer is not None:
        return Step((_commit(state, messages, op.answer),))
    if op.unknown and op.answer_if_committed is not None:
        return Step((state, _commit(state, messages, op.answer_if_committed)))
    return Step((state,))  # an upstream failure, or unknown: no commit


def _get_tree(state: State, op: Operation) -> Step:
    """A read of a tree: the turns it lists are exactly the committed ones."""
    if not state.alive or op.status == 404:
        return _get(state, op)  # whether the session exists is judged as on a line
    if not op.ok or op.turns is None:
        return Step((state,))
    read = frozenset(_path(turn) for turn in op.turns)
    missing, extra = state.turns - read, read - state.turns - state.maybe
    if missing or extra:
        return Step(
            (),
            f"GET listed {len(read)} turns where {len(state.turns)} are committed: "
            f"{len(missing)} answered 200 but in no branch, {len(extra)} listed but never "
            "committed",
        )
    # Turns of unknown chats that are listed did commit: every later read lists them.
    return Step((State("alive", turns=read, maybe=state.maybe - read),))


def _chat_tree(state: State, op: Operation) -> Step:
    """A turn on a tree: whatever its history, a 200 commits it (a divergent turn
    starts a branch); a refusal commits nothing. Which turns a tree server accepts
    is its convention; that every 200 is in some branch is not."""
    if not state.alive or op.status in (404, 410):
        return _chat(state, op)
    messages = op.messages or []
    if op.ok and op.answer is not None:
        return Step((_branch(state, messages, op.answer),))
    if op.unknown and op.answer_if_committed is not None:
        turn = _path([*messages, op.answer_if_committed])
        if turn in state.turns:
            return Step((state,))
        return Step((State("alive", turns=state.turns, maybe=state.maybe | {turn}),))
    return Step((state,))


def _branch(state: State, messages: list[dict[str, Any]], answer: dict[str, Any]) -> State:
    turn = _path([*messages, answer])
    return State("alive", turns=state.turns | {turn}, maybe=state.maybe - {turn})


def _path(messages: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(message_key(m) for m in messages)


def _commit(state: State, messages: list[dict[str, Any]], answer: dict[str, Any]) -> State:
    return State(
        "alive",
        messages=(*messages, answer),
        last_request=tuple(messages),
        stored_answer=answer,
        num_assistant=state.num_assistant + 1,
    )


def _list(value: tuple[Any, ...] | None) -> list[Any] | None:
    return None if value is None else list(value)


# -- the search ----------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    kind: Literal[
        "linearizability",
        "durability",
        "stream-mismatch",
        "delete-waits",
        "hangup-ignored",
        "success-after-delete",
        "llm-leak",
        "data-after-error",
        "committed-after-error",
        # From the engine's answers (a chaos history records them where they differ):
        "answer-not-from-engine",
        # Found by ``sessctl explore``, which knows what the harness held and sent,
        # beyond what a history records:
        "other-session-waits",
        "accepted-malformed",
    ]
    session: str
    explanation: str
    window: tuple[Operation, ...]
    """The smallest set of operations that shows the problem, in invocation order."""


@dataclass(frozen=True)
class CheckResult:
    verdict: Verdict
    operations: int
    sessions: int
    findings: list[Finding] = field(default_factory=list)
    undecided_sessions: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    op_index: int
    is_call: bool
    time: float
    match: _Entry | None = None
    prev: _Entry | None = None
    next: _Entry | None = None


def check_session(
    operations: Sequence[Operation],
    budget: int = DEFAULT_BUDGET,
    model: TrajectoryModel = "linear",
) -> tuple[Verdict, Finding | None]:
    """Is this one session's sub-history linearizable?"""
    ops = sorted(operations, key=lambda o: o.invoke)
    if not ops:
        return "valid", None
    initial = NOT_CREATED if any(o.op == "create" for o in ops) else GONE
    forced = _forced(ops, model)
    head = _entries(ops)
    observers = frozenset(i for i, o in enumerate(ops) if _observes(o, model))
    cache: set[tuple[int, frozenset[State]]] = set()
    stack: list[tuple[_Entry, frozenset[State], bool]] = []
    """Each placement tried: the call, the states before it, and whether it was
    the only placement to try (forced, or an observer that changed nothing)."""
    states: frozenset[State] = frozenset({initial})
    linearized = 0
    deepest = (0, states, -1)  # how far the search got, to explain a failure
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > budget:
            return "unknown", None
        assert entry is not None
        if entry.is_call:
            op = ops[entry.op_index]
            successors = _successors(states, op, model)
            key = (linearized | (1 << entry.op_index), successors)
            if successors and key not in cache:
                cache.add(key)
                only = entry.op_index in forced or (
                    entry.op_index in observers and successors == states
                )
                stack.append((entry, states, only))
                states = successors
                linearized |= 1 << entry.op_index
                _lift(entry)
                entry = head.next
            else:
                if len(stack) >= deepest[0]:
                    deepest = (len(stack), states, entry.op_index)
                entry = entry.next
        else:
            while True:
                if not stack:
                    return "invalid", _explain(ops, deepest, model)
                entry, states, only = stack.pop()
                linearized &= ~(1 << entry.op_index)
                _unlift(entry)
                if not only:
                    break  # an only placement failed: backtrack further
            entry = entry.next
    return "valid", None


def _forced(ops: Sequence[Operation], model: TrajectoryModel) -> frozenset[int]:
    """Operations the search places as early as it can and never tries later.

    On a tree, a chat of unknown outcome only makes its turn possible from then on
    (``State.maybe``): placing it earlier never invalidates a later read, so trying
    it later too would only multiply orders (2**n of them for n such chats, all
    failing alike when the history is invalid). Not so where creation is implicit:
    there the chat may also have brought the session into being."""
    if model != "tree" or any(o.op == "create" and o.implicit for o in ops):
        return frozenset()
    return frozenset(i for i, o in enumerate(ops) if o.op == "chat" and o.unknown)


def _observes(op: Operation, model: TrajectoryModel) -> bool:
    """Whether ``op`` never changes a session's state, only rules states out: a
    read (on a tree, only one that carries no listing of turns: a listing, even
    an empty one, settles which unknown turns committed), or a refusal whose
    outcome is known.

    Such an operation, where it rules nothing out, is placed as early as it can be
    and never tried later. Nothing is lost: take any valid order that places it
    later; move it to the front. Every operation between sees the same states
    as before; where it was, the states are now a superset of what they were
    (it did not run there to rule some out), and from a superset of states
    every later operation still has somewhere to go. Without this, the reads
    and refusals overlapping a chat of unknown outcome (pending to the end)
    were tried in every order: one session of 86 operations took 15 s to check
    (300 clients on 100 sessions)."""
    if op.op == "get":
        return model == "linear" or not op.ok or op.turns is None
    if op.op == "create" and op.implicit:
        return False
    return not op.unknown and not op.ok


def _successors(
    states: frozenset[State], op: Operation, model: TrajectoryModel
) -> frozenset[State]:
    found: set[State] = set()
    for state in states:
        found.update(step(state, op, model).states)
    return frozenset(found)


def _entries(ops: Sequence[Operation]) -> _Entry:
    """A doubly linked list of call and return entries in time order, behind a sentinel."""
    events: list[_Entry] = []
    for index, op in enumerate(ops):
        call = _Entry(index, True, op.invoke)
        ret = _Entry(
            index, False, float("inf") if op.complete is None or op.unknown else op.complete
        )
        call.match = ret
        events += [call, ret]
    # Calls before returns at equal times: ties count as concurrent.
    events.sort(key=lambda e: (e.time, not e.is_call))
    head = _Entry(-1, False, float("-inf"))
    previous = head
    for event in events:
        previous.next, event.prev = event, previous
        previous = event
    return head


def _lift(call: _Entry) -> None:
    for entry in (call, call.match):
        assert entry is not None
        assert entry.prev is not None
        entry.prev.next = entry.next
        if entry.next is not None:
            entry.next.prev = entry.prev


def _unlift(call: _Entry) -> None:
    for entry in (call.match, call):
        assert entry is not None
        assert entry.prev is not None
        entry.prev.next = entry
        if entry.next is not None:
            entry.next.prev = entry


def _explain(
    ops: Sequence[Operation],
    deepest: tuple[int, frozenset[State], int],
    model: TrajectoryModel,
) -> Finding:
    depth, states, index = deepest
    culprit = ops[index] if index >= 0 else ops[0]
    reasons = {step(state, culprit, model).reason for state in states} - {""}
    end = culprit.complete if culprit.complete is not None else float("inf")
    window = tuple(
        o
        for o in ops
        if o is culprit
        or (o.invoke <= end and (o.complete is None or o.complete >= culprit.invoke))
    )
    because = "; ".join(sorted(reasons)) or "no order of the concurrent operations explains it"
    return Finding(
        "linearizability",
        culprit.session,
        f"after {depth} operations could be ordered, {culprit.describe()} fits nowhere: {because}",
        window,
    )


# -- invariants beside linearizability -------------------------------------------------


def check_invariants(
    operations: Sequence[Operation],
    leak_bound: float = DEFAULT_LEAK_BOUND,
    model: TrajectoryModel = "linear",
    rollback: bool = False,
) -> list[Finding]:
    findings: list[Finding] = []
    by_session: dict[str, list[Operation]] = defaultdict(list)
    for op in operations:
        by_session[op.session].append(op)
    for session, ops in by_session.items():
        ops.sort(key=lambda o: o.invoke)
        findings.extend(_durability(session, ops, model, rollback))
        if model == "linear":  # on a tree, a streamed turn's answer is checked as durable
            findings.extend(_streamed_answers(session, ops))
        findings.extend(_data_after_error(session, ops))
        findings.extend(_committed_after_error(session, ops, model))
        findings.extend(_delete_waits(session, ops))
        findings.extend(_hangups_ignored(session, ops))
        findings.extend(_answers_not_from_engine(ops))
        findings.extend(_success_after_delete(session, ops))
        findings.extend(_llm_leaks(session, ops, leak_bound))
    return findings


def _later_reads(
    chat: Operation, ops: list[Operation], model: TrajectoryModel = "linear"
) -> Iterable[Operation]:
    """Reads that began after ``chat`` completed (on a tree, those that listed its turns),
    up to the session's end: a read answered 200 after a DELETE of the session was
    answered 2xx shows a session brought back, which linearizability names; that it
    lacks the turn is no phantom commit."""
    assert chat.complete is not None
    ended = min(
        (
            op.complete
            for op in ops
            if op.op == "delete" and op.ok and op.complete is not None and op.invoke > chat.complete
        ),
        default=float("inf"),
    )
    for read in ops:
        listed = model == "linear" or read.turns is not None
        if (
            read.op == "get"
            and read.status == 200
            and chat.complete < read.invoke
            and read.invoke <= ended
            and listed
        ):
            yield read


def _durability(
    session: str, ops: list[Operation], model: TrajectoryModel, rollback: bool = False
) -> Iterable[Finding]:
    """Every chat answered 200 is in every later read. ``rollback``: the profile
    declares one-step rollbacks, and a turn replaced by one is excused exactly as
    ``run-scenarios`` excuses it: the request that replaced it was answered 200
    and sent after that turn was answered (a writer that never saw the turn it
    replaced made a phantom commit)."""
    for chat in ops:
        if chat.op != "chat" or not chat.ok or chat.answer is None or chat.complete is None:
            continue
        turn = [message_key(m) for m in [*(chat.messages or []), chat.answer]]
        for read in _later_reads(chat, ops, model):
            if read.turns is not None:
                if tuple(turn) not in {_path(t) for t in read.turns}:
                    yield Finding(
                        "durability",
                        session,
                        f"{chat.describe()} was answered 200, but {read.describe()} listed "
                        f"a tree of {len(read.turns)} turns in which no branch has it: a "
                        "phantom commit",
                        (chat, read),
                    )
                    break
                continue
            prefix = [message_key(m) for m in (read.messages or [])[: len(turn)]]
            if chat.stream is not None and prefix[:-1] == turn[:-1] and len(prefix) == len(turn):
                continue  # its turn is there with another answer: _streamed_answers says so
            if prefix != turn and rollback and _rolled_back_before(chat, read, ops):
                break  # replaced by a declared rollback: gone from here on, rightly
            if prefix != turn:
                yield Finding(
                    "durability",
                    session,
                    f"{chat.describe()} was answered 200, but {read.describe()} read a "
                    "trajectory without that turn: a phantom commit",
                    (chat, read),
                )
                break


def _rolled_back_before(chat: Operation, read: Operation, ops: list[Operation]) -> bool:
    """A chat answered 200, sent after ``chat`` was answered and before ``read``
    was, rolled ``chat``'s turn back one step."""
    assert chat.complete is not None
    assert chat.answer is not None
    turn = [*(chat.messages or []), chat.answer]
    end = read.complete if read.complete is not None else float("inf")
    return any(
        other.op == "chat"
        and other.ok
        and other is not chat
        and other.invoke >= chat.complete
        and other.invoke < end
        and rolls_back_one_step(turn, other.messages or [])
        for other in ops
    )


def _streamed_answers(session: str, ops: list[Operation]) -> Iterable[Finding]:
    for chat in ops:
        if chat.op != "chat" or chat.stream != "done" or chat.complete is None:
            continue
        if chat.assembled is None:
            continue
        request = [message_key(m) for m in chat.messages or []]
        for read in _later_reads(chat, ops):
            messages = read.messages or []
            if len(messages) <= len(request):
                continue
            if [message_key(m) for m in messages[: len(request)]] != request:
                continue
            if message_key(messages[len(request)]) != message_key(chat.assembled):
                yield Finding(
                    "stream-mismatch",
                    session,
                    f"{chat.describe()}: its client assembled one answer from the chunks, but "
                    f"{read.describe()} read another committed after its request",
                    (chat, read),
                )
                break


def _data_after_error(session: str, ops: list[Operation]) -> Iterable[Finding]:
    for chat in ops:
        if chat.op == "chat" and chat.after_error:
            yield Finding(
                "data-after-error",
                session,
                f"{chat.describe()}: after its error event the stream went on with "
                f"{', '.join(chat.after_error)}; an error event ends a stream, and a client "
                "that stops there (as the OpenAI SDK does) never sees what followed",
                (chat,),
            )


def _committed_after_error(
    session: str, ops: list[Operation], model: TrajectoryModel
) -> Iterable[Finding]:
    """A stream that ended with an error event committed nothing: no later read has
    its turn (its request's messages followed by an answer), unless another chat with
    the same messages (an exact retry) was answered 200 or may have committed."""
    for chat in ops:
        if chat.op != "chat" or not (chat.stream or "").startswith("error:"):
            continue
        request = tuple(message_key(m) for m in chat.messages or [])
        if any(
            other is not chat
            and other.op == "chat"
            and (other.ok or (other.unknown and not (other.stream or "").startswith("error:")))
            and tuple(message_key(m) for m in other.messages or []) == request
            for other in ops
        ):
            continue
        end = chat.complete if chat.complete is not None else chat.gave_up
        for read in ops:
            if read.op != "get" or read.status != 200 or end is None or read.invoke <= end:
                continue
            if model == "tree" and read.turns is not None:
                has_turn = any(_path(t)[: len(request)] == request for t in read.turns)
            else:
                messages = read.messages or []
                has_turn = len(messages) > len(request) and (
                    tuple(message_key(m) for m in messages[: len(request)]) == request
                )
            if has_turn:
                yield Finding(
                    "committed-after-error",
                    session,
                    f"{chat.describe()}: its stream ended with an error event, which commits "
                    f"nothing, but {read.describe()} read its turn committed",
                    (chat, read),
                )
                break


def _delete_waits(session: str, ops: list[Operation]) -> Iterable[Finding]:
    for delete in ops:
        if delete.op != "delete" or not delete.outwaited:
            continue
        tags = set(delete.outwaited)
        held = [c for c in ops if c.op == "chat" and tag_of({"messages": c.messages}) in tags]
        yield Finding(
            "delete-waits",
            session,
            f"{delete.describe()} was not answered while the engine call of "
            f"{', '.join(c.describe() for c in held) or 'a chat'} was held; 2 s after the "
            "DELETE was sent it still had no answer, and the harness released the call",
            tuple(sorted((delete, *held), key=lambda o: o.invoke)),
        )


def _hangups_ignored(session: str, ops: list[Operation]) -> Iterable[Finding]:
    for chat in ops:
        if chat.op == "chat" and chat.outwaited:
            yield Finding(
                "hangup-ignored",
                session,
                f"{chat.describe()}: its client hung up while its engine call was held, and "
                "2 s later the server still had not stopped that call (the harness then "
                "released it): a turn run on for nobody, which may commit",
                (chat,),
            )


def _answers_not_from_engine(ops: list[Operation]) -> Iterable[Finding]:
    for chat in ops:
        if chat.op == "chat" and chat.engine_answers is not None:
            yield answer_not_from_engine(chat, chat.engine_answers, chat.script)


def answer_not_from_engine(chat: Operation, given: Sequence[Any], script: Any) -> Finding:
    """A chat answered 2xx with none of the answers ``given`` by the engine on a
    successful attempt (``sessctl explore`` judges this from its upstream, chaos mode
    from the history's ``engine_answers``)."""
    answered = f"it answered {_short(given[-1])}" if given else "no attempt succeeded"
    return Finding(
        "answer-not-from-engine",
        chat.session,
        f"{chat.describe()} answered {_short(chat.answer)}, which the engine never "
        f"answered on a successful attempt ({answered}; its script: {script})",
        (chat,),
    )


def _short(message: Any) -> str:
    text = repr(message.get("content") if isinstance(message, dict) else message)
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if calls:
        text += f" with {len(calls)} tool call(s)"
    return text if len(text) <= 80 else text[:77] + "..."


def _success_after_delete(session: str, ops: list[Operation]) -> Iterable[Finding]:
    deletes = [o for o in ops if o.op == "delete" and o.ok and o.complete is not None]
    if not deletes:
        return
    first = min(deletes, key=lambda o: o.complete or 0.0)
    assert first.complete is not None
    for op in ops:
        if op.op != "create" and op.ok and op.invoke > first.complete:
            yield Finding(
                "success-after-delete",
                session,
                f"{op.describe()} started after {first.describe()} had completed",
                (first, op),
            )


def _llm_leaks(session: str, ops: list[Operation], bound: float) -> Iterable[Finding]:
    deletes = [o for o in ops if o.op == "delete" and o.ok and o.complete is not None]
    if not deletes:
        return
    delete = min(deletes, key=lambda o: o.complete or 0.0)
    assert delete.complete is not None
    # When had the server certainly accepted the DELETE? By its completion, or
    # earlier: a turn answered 410 was preempted by it, so the moment the
    # upstream saw that turn hang up, the DELETE had landed. (The client's
    # invocation time says nothing: the request may still have been in flight.)
    accepted = delete.complete
    for chat in ops:
        if chat.op == "chat" and (chat.status == 410 or chat.stream == "error:session_deleted"):
            # Only a call this turn made counts: an exact retry shares its
            # marker, and so its upstream events, with the turn it retries.
            own = [e.at for e in chat.upstream if e.kind == "received" and e.at >= chat.invoke]
            cancels = [
                e.at for e in chat.upstream if e.kind == "cancelled" and own and e.at >= own[0]
            ]
            accepted = min([accepted, *cancels])
    for chat in ops:
        if chat.op != "chat":
            continue
        received = [e for e in chat.upstream if e.kind == "received"]
        for call, event in enumerate(received):
            at = event.at
            ending = min(
                ((e.at, e.kind) for e in chat.upstream if e.kind != "received" and e.at >= at),
                default=(float("inf"), "none"),
            )
            # Work done, or left running past the bound, is a leak; a call whose
            # bytes were already in flight when the turn was cancelled, and that
            # the server then hung up on, is not (seen on the clean server: the
            # upstream logged "received" 0.9 ms after the DELETE completed).
            worked = ending[1] == "answered" or ending[0] > max(at, delete.complete) + bound
            # Started after the DELETE only if certainly so: the upstream reads a
            # call a moment after it arrives (milliseconds, under load), and a call
            # sent just before the DELETE may be read just after it. ``started_after``
            # is a moment the upstream knows its connection was still empty.
            if event.started_after > accepted and worked:
                problem = "started after the session's DELETE had been accepted"
            elif (
                at <= accepted
                and ending[0] > delete.complete + bound
                and ending[1] != "cancelled"
                and _work_done_at(chat, call, at) > delete.complete
            ):
                # Within the bound, a call may end either way: a server may answer
                # the DELETE a moment before the stopped turn closes its engine
                # connection, and an engine whose work ran out in that moment
                # answers. A call the server hung up on, later than that, was
                # stopped all the same: how soon is latency, not a leak (under
                # load a clean server took 1.3 s). One it never hangs up on is
                # released by the harness after its patience, and seen answered.
                problem = "was still running when the DELETE completed, and was not cancelled"
            else:
                continue
            yield Finding(
                "llm-leak",
                session,
                f"{chat.describe()}: its upstream call (received at {at:.3f}) {problem} "
                f"({delete.describe()}): LLM work for a deleted session",
                (delete, chat),
            )
            break


def _work_done_at(chat: Operation, call: int, received: float) -> float:
    """When the engine's scripted work for the ``call``-th upstream call of ``chat``
    was done: at once, after its delay, or never by itself (a hold, a hang, a stream
    that holds or trickles its chunks). Only a call still working when a DELETE
    completed can be seen running on after it, rather than answered as it was stopped."""
    script = chat.script or ["hold"]
    behaviour = script[min(call, len(script) - 1)]  # the last behaviour repeats
    if behaviour in ("hold", "hang"):
        return float("inf")
    if isinstance(behaviour, dict):
        if {"hold_after", "hang_after", "chunk_delay"} & set(behaviour):
            return float("inf")
        if isinstance(behaviour.get("delay"), int | float):
            return received + float(behaviour["delay"])
    return received


# -- the whole history ---------------------------------------------------------------


def check_history(
    operations: Sequence[Operation],
    budget: int = DEFAULT_BUDGET,
    leak_bound: float = DEFAULT_LEAK_BOUND,
    model: TrajectoryModel = "linear",
    rollback: bool = False,
) -> CheckResult:
    by_session: dict[str, list[Operation]] = defaultdict(list)
    for op in operations:
        by_session[op.session].append(op)
    findings: list[Finding] = []
    undecided: list[str] = []
    for session, ops in by_session.items():
        session_verdict, finding = check_session(ops, budget, model)
        if session_verdict == "unknown":
            undecided.append(session)
        elif finding is not None:
            findings.append(finding)
    findings.extend(check_invariants(operations, leak_bound, model, rollback))
    verdict: Verdict = "invalid" if findings else "unknown" if undecided else "valid"
    return CheckResult(verdict, len(operations), len(by_session), findings, undecided)
