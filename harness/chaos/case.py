"""A failing chaos session as a case a scenario can replay: the pure half of shrinking.

No I/O here: ``shrink.py`` runs the cases this module builds and writes.

* A ``Case`` is the failing session's operations (``CaseOp``: chats, GETs,
  DELETEs, and what each chat's upstream call does) and the points
  (``Point``) that order them: a request sent, a held upstream call released, a client
  hanging up. ``without`` removes operations and rebases what was built on
  them, which is what delta debugging needs.
* ``case_from_history`` reads a case out of a chaos history, in the order the
  chaos run saw.
* ``render`` writes a case as a scenario: every request in the background,
  every chat's upstream call held, a settle after every point.
* ``expectations_from`` turns what the reference server answered under that
  order into the scenario's expectations.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import yaml

from harness.model.messages import message_key
from harness.results import RunResult

from .history import Operation
from .linearizability import Finding

PointAction = Literal["start", "release", "cancel"]

PROPERTY_OF_FINDING = {
    "linearizability": "answers that no order of the operations explains",
    "durability": "phantom commit",
    "stream-mismatch": "committed answer differs from the streamed one",
    "delete-waits": "DELETE waits for the upstream",
    "hangup-ignored": "commit after the client hung up",
    "success-after-delete": "no success after DELETE",
    "llm-leak": "LLM work leaked for a deleted session",
    "data-after-error": "a stream goes on after its error event",
    "committed-after-error": "a stream that ended in an error committed its turn",
    "answer-not-from-engine": "a turn answered with what the engine never answered",
    "other-session-waits": "one session's turn waits for another's engine call",
    "accepted-malformed": "a malformed request accepted",
}
RETRY_CONVENTION = "an exact retry replays the stored answer"


# -- the case: operations and the points that order them ------------------------------


@dataclass(frozen=True)
class CaseOp:
    name: str
    op: str
    """chat, get or delete."""
    after: str | None = None
    """chat: builds on this chat's request and answer; None: a first turn."""
    retry: str | None = None
    """chat: sends exactly this chat's messages again."""
    faults: tuple[Any, ...] = ()
    """chat: upstream behaviours played before the last one (503, abort)."""
    final: Any = "hold"
    """chat: the last, repeating upstream behaviour (hold, respond, reset, garbage)."""
    stream: bool = False
    """chat: sent with ``stream: true``."""

    @property
    def held(self) -> bool:
        """Its upstream call holds (before the first chunk, or after one) until released."""
        return self.final == "hold" or (isinstance(self.final, dict) and "hold_after" in self.final)

    @property
    def script(self) -> Any:
        behaviours = [*self.faults, self.final]
        return behaviours[0] if len(behaviours) == 1 else behaviours


@dataclass(frozen=True)
class Point:
    action: PointAction
    op: str


@dataclass(frozen=True)
class Case:
    ops: tuple[CaseOp, ...]
    points: tuple[Point, ...]

    def op(self, name: str) -> CaseOp:
        return next(o for o in self.ops if o.name == name)

    def without(self, names: Collection[str]) -> Case:
        """The case minus these operations; what was built on them is rebased."""
        removed = set(names)
        by_name = {o.name: o for o in self.ops}

        def base(name: str | None) -> str | None:
            # A removed chat's place is taken by whatever it built on itself.
            while name is not None and name in removed:
                gone = by_name[name]
                name = by_name[gone.retry].after if gone.retry is not None else gone.after
            return name

        kept: list[CaseOp] = []
        for o in self.ops:
            if o.name in removed:
                continue
            if o.retry is not None and o.retry in removed:
                o = replace(o, retry=None, after=base(by_name[o.retry].after))
            elif o.after is not None:
                o = replace(o, after=base(o.after))
            kept.append(o)
        return Case(tuple(kept), tuple(p for p in self.points if p.op not in removed))

    def with_op(self, op: CaseOp, *, drop: Collection[PointAction] = ()) -> Case:
        ops = tuple(op if o.name == op.name else o for o in self.ops)
        points = tuple(p for p in self.points if not (p.op == op.name and p.action in drop))
        return Case(ops, points)

    def renamed(self) -> Case:
        """Steps named in the order they start: c1, d2, g3..."""
        starts = [p.op for p in self.points if p.action == "start"]
        names = {old: f"{self.op(old).op[0]}{index}" for index, old in enumerate(starts, 1)}

        def new(name: str | None) -> str | None:
            return None if name is None else names[name]

        ops = tuple(
            replace(o, name=names[o.name], after=new(o.after), retry=new(o.retry))
            for o in sorted(self.ops, key=lambda o: starts.index(o.name))
        )
        return Case(ops, tuple(Point(p.action, names[p.op]) for p in self.points))


Arrival = Literal["sent", "upstream"]


def case_from_history(
    history: Sequence[Operation], finding: Finding, arrival: Arrival = "sent"
) -> Case:
    """The failing session's operations up to the end of the window, ordered as they ran.

    The client sees when it sent a request, not when the server took it in: two
    requests in flight at once may arrive in either order. ``arrival="sent"``
    replays them in the order they were sent; ``"upstream"`` sends a chat when
    the upstream first saw it, for when the history shows a chat overtaken.
    """
    window_end = max(_end(o) or o.invoke for o in finding.window)
    ops = sorted(
        (
            o
            for o in history
            if o.session == finding.session and o.op != "create" and o.invoke <= window_end
        ),
        key=lambda o: o.invoke,
    )
    sent_by: dict[tuple[Any, ...], str] = {}
    """Messages -> the first chat that sent them (later senders are exact retries)."""
    turn_of: dict[tuple[Any, ...], str] = {}
    """Request + answer -> the chat whose turn that is."""
    case_ops: list[CaseOp] = []
    timed: list[tuple[float, float, int, Point]] = []
    started: dict[str, float] = {}
    """Op -> when its start point is placed."""
    for o in ops:
        name = f"{o.op[0]}{o.id}"
        start = _sent_at(o, arrival)
        if o.op != "chat":
            case_op = CaseOp(name, o.op)
        else:
            messages = o.messages or []
            sent = _key(messages)
            faults, final = _held(o.script or ["respond"])
            streamed = o.stream is not None
            if sent in sent_by:
                case_op = CaseOp(
                    name, "chat", retry=sent_by[sent], faults=faults, final=final, stream=streamed
                )
            else:
                sent_by[sent] = name
                after = turn_of.get(_key(messages[:-1])) if len(messages) > 1 else None
                case_op = CaseOp(
                    name, "chat", after=after, faults=faults, final=final, stream=streamed
                )
                if o.answer_if_committed is not None:
                    turn_of.setdefault(_key([*messages, o.answer_if_committed]), name)
            # A scenario step names only earlier steps. Placed by its arrival, a chat
            # can come before the one it retries (a retry that overtook its original,
            # or never reached the upstream): it starts with it then, just after it
            # (ties go by send time), and so do its release and cancel.
            for earlier in (case_op.retry, case_op.after):
                if earlier is not None:
                    start = max(start, started[earlier])
        started[name] = start
        timed.append((start, o.invoke, 0, Point("start", name)))
        if o.unknown and o.gave_up is not None:
            timed.append((max(o.gave_up, start), o.invoke, 2, Point("cancel", name)))
        case_ops.append(case_op)
        if o.op == "chat" and case_op.held:  # a non-chat's CaseOp keeps the default script
            timed.append((max(_answered_at(o), start), o.invoke, 1, Point("release", name)))
    timed.sort(key=lambda t: (t[0], t[1], t[2]))
    return Case(tuple(case_ops), tuple(point for *_, point in timed))


def _sent_at(op: Operation, arrival: Arrival) -> float:
    if arrival == "sent" or op.op != "chat":
        return op.invoke
    received = [e.at for e in op.upstream if e.kind == "received" and e.at >= op.invoke]
    return min(received, default=op.invoke)


def _key(messages: Sequence[dict[str, Any]]) -> tuple[Any, ...]:
    return tuple(message_key(m) for m in messages)


def _end(op: Operation) -> float | None:
    return op.complete if op.complete is not None else op.gave_up


def _held(script: Sequence[Any]) -> tuple[tuple[Any, ...], Any]:
    """A recorded script with its answering behaviour turned into a hold."""
    *faults, last = script
    answers = last in ("respond", "hold") or (
        isinstance(last, dict) and ("delay" in last or set(last) <= _PLAIN_STREAM)
    )
    return tuple(faults), "hold" if answers else last


_PLAIN_STREAM = {"chunks", "chunk_delay", "tool_call"}
"""Keys of a stream script that answers in full (no fault after a chunk)."""


def _answered_at(op: Operation) -> float:
    """When the upstream answered this chat's last call (inf: never, in the history)."""
    end = _end(op)
    answered = [
        e.at
        for e in op.upstream
        if e.kind == "answered" and e.at >= op.invoke and (end is None or e.at <= end)
    ]
    return max(answered, default=float("inf"))


# -- the case as a scenario --------------------------------------------------------------


@dataclass(frozen=True)
class Expectations:
    statuses: dict[str, int]
    upstream: dict[str, dict[str, Any]]
    streams: dict[str, str] = field(default_factory=dict)
    """Streamed chat -> how its stream ended on the reference (done, error, cut)."""


@dataclass(frozen=True)
class ScenarioText:
    """What goes around the steps of the written scenario."""

    name: str
    description: str
    safety_property: str
    header: tuple[str, ...] = ()
    """Comment lines at the top of the file."""


def shrunk_text(name: str, found_by: str, finding: Finding) -> ScenarioText:
    """The text around a shrunk failure: what found it, and what it shows."""
    return ScenarioText(
        name=name,
        description=f"Found by {found_by}, then shrunk. {finding.explanation}",
        safety_property=PROPERTY_OF_FINDING[finding.kind],
    )


def render(case: Case, text: ScenarioText, expected: Expectations | None = None) -> str:
    steps: list[dict[str, Any]] = [{"create": "s"}]
    for point in case.points:
        if point.action == "start":
            steps.append(_start_step(case.op(point.op), expected))
        else:
            steps.append({point.action: point.op})
        steps.append({"settle": True})
    document: dict[str, Any] = {
        "name": text.name,
        "description": text.description,
        "property": text.safety_property,
        "why": (
            "Shrunk from a recorded history (chaos, explore or load). Every request is sent, "
            "every held upstream call released and every hang-up done in the order the "
            "history shows, with a settle after each. The expected answers are the "
            "reference server's under that same order: the contract's executable "
            "specification."
        ),
        "timeout": 30,
        "steps": steps,
    }
    upstream = dict(expected.upstream) if expected else {}
    if upstream:
        document["expect"] = {"upstream": upstream}
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
    header = "".join(f"# {line}\n" if line else "#\n" for line in text.header)
    return header + body


def _start_step(op: CaseOp, expected: Expectations | None) -> dict[str, Any]:
    step: dict[str, Any] = {op.op: op.name, "background": True}
    if op.op == "chat":
        step["upstream"] = op.script
        if op.stream:
            step["stream"] = True
        if op.retry is not None:
            step["retry"] = op.retry
        elif op.after is not None:
            step["after"] = op.after
        else:
            step["messages"] = [{"role": "user", "content": f"turn {op.name}"}]
    if expected is not None and op.name in expected.statuses:
        step["expect"] = {"status": expected.statuses[op.name]}
        if op.name in expected.streams:
            step["expect"]["stream"] = expected.streams[op.name]
    return step


def expectations_from(case: Case, reference: RunResult) -> Expectations | None:
    """What the reference server did under this order; None if it could not answer."""
    hung_up = {p.op for p in case.points if p.action == "cancel"}
    statuses: dict[str, int] = {}
    for op in case.ops:
        observation = reference.observations.get(op.name)
        if observation is None or (observation.status is None and op.name not in hung_up):
            return None
        if observation.status is not None:
            statuses[op.name] = observation.status
    streams: dict[str, str] = {
        op.name: str(record.end.value)
        for op in case.ops
        if (observation := reference.observations.get(op.name)) is not None
        and (record := observation.stream) is not None
        and record.end.value in ("done", "error", "cut")
    }
    retried = {o.retry for o in case.ops if o.retry is not None}
    upstream: dict[str, dict[str, Any]] = {}
    for op in case.ops:
        status = statuses.get(op.name)
        if op.op != "chat" or op.retry is not None or (status is None and op.name not in hung_up):
            continue
        seen = {
            kind: sum(
                1 for e in reference.upstream_events if e["step"] == op.name and e["kind"] == kind
            )
            for kind in ("received", "answered", "cancelled")
        }
        spec: dict[str, Any] = {}
        stopped = seen["cancelled"] and not seen["answered"]
        if status is None:
            if stopped:
                spec = {"cancelled": True, "answered": 0}  # its client hung up: stopped
        elif seen["received"] == 0 and status // 100 != 2:
            spec = {"calls": 0}  # a refused turn costs no LLM work
        elif (status == 410 or streams.get(op.name) == "error") and stopped:
            spec = {"cancelled": True, "answered": 0}  # a preempted turn's call is stopped
        if spec and op.name in retried:
            spec["convention"] = RETRY_CONVENTION  # a retry may regenerate on other servers
        if spec:
            upstream[op.name] = spec
    return Expectations(statuses, upstream, streams)


__all__ = [
    "PROPERTY_OF_FINDING",
    "RETRY_CONVENTION",
    "Arrival",
    "Case",
    "CaseOp",
    "Expectations",
    "Point",
    "ScenarioText",
    "case_from_history",
    "expectations_from",
    "render",
]
