"""A history of operations against a session server, as JSON lines.

One line per operation, with the client that ran it, when it was invoked and
when it completed (monotonic seconds), its arguments and what came back::

    {"id": 7, "client": 2, "op": "chat", "session": "4f...", "invoke": 1.204,
     "complete": 1.219, "status": 200, "messages": [...], "answer": {...},
     "answer_if_committed": {...}, "upstream": [{"kind": "received", "at": 1.205}]}

* ``op`` is ``create``, ``chat``, ``get`` or ``delete``. A ``create`` with
  ``implicit: true`` sent nothing: the server creates sessions on first use, and
  the client made the id up.
* ``status`` is null, and ``complete`` may be null, when the outcome is unknown
  (a timeout, a connection error, the client hung up): such an operation may
  or may not have taken effect.
* ``chat``: ``messages`` sent; ``answer`` is the assistant message of a 200;
  ``answer_if_committed`` is what the (deterministic) upstream would answer,
  so an unknown chat that did commit can be recognised later.
* ``get``: ``messages`` and ``num_assistant`` as read; on a tree-shaped
  trajectory, ``turns``: every committed turn listed, each as its whole path.
* ``upstream``: the chaos upstream's events for this operation's calls.
* ``stream`` (chat sent with ``stream: true``): how the stream ended, as the
  client saw it: ``done`` ([DONE] arrived), ``error:TYPE`` (an error event),
  ``cut``, ``not streamed`` (one JSON answer), ``no stream`` (refused with a
  status, or hung up on before any answer), or ``hung up`` (the client hung up
  after a chunk: status null, outcome unknown); ``assembled``: the assistant
  message its chunks made. A 2xx stream that did not end with ``done`` has an
  unknown outcome, as a timeout has.
* ``after_error`` (chat): what the client read after its stream's error event,
  which ends a stream (``[DONE]``, a data event); nothing may follow one.
* ``outwaited`` (delete): the tags of held upstream calls that were released
  only because this DELETE had not been answered within 2 s of patience
  (counted from when it was sent, on ``harness.run.patience``'s clock);
  (chat): its tag, if its client hung up and the server had not stopped its
  held upstream call 2 s later.
* ``engine_answers`` (chat answered 2xx): present only when its answer is none of
  those the engine gave on a successful attempt; they are listed (an empty list:
  no attempt succeeded, as when every attempt aborted).
* ``script`` (chat): the upstream script the chaos upstream played for it;
  ``gave_up``: when the client stopped waiting, if the outcome is unknown.
  Shrinking a failing run to a scenario replays both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import ScenarioFileError
from harness.model.messages import message_key
from harness.results import Observation, StreamEnd, describe
from harness.upstream.script import EventKind, StepEvent

if TYPE_CHECKING:  # the history is read (``sessctl check``) without the engine
    from harness.upstream.chaos_upstream import ChaosUpstream

OPS = frozenset({"create", "chat", "get", "delete"})


@dataclass(frozen=True)
class UpstreamEvent:
    kind: str
    """received, answered, cancelled or dropped."""
    at: float
    sent_after: float | None = None
    """``received``: a moment before the server began sending the call; when the
    upstream could not tell (an old history), ``at`` is all there is."""

    @classmethod
    def of(cls, event: StepEvent, offset: float = 0.0) -> UpstreamEvent:
        """A chaos upstream's event, moved onto another clock by ``offset``."""
        after = None if event.sent_after is None else event.sent_after - offset
        return cls(event.kind.value, event.at - offset, after)

    @classmethod
    def from_json(cls, data: dict[str, Any], offset: float = 0.0) -> UpstreamEvent:
        """One event as a history or the upstream's events route writes it."""
        after = data.get("sent_after")
        return cls(
            str(data["kind"]),
            float(data["at"]) - offset,
            None if after is None else float(after) - offset,
        )

    @property
    def started_after(self) -> float:
        """The latest moment certainly before the call began (``received`` only)."""
        return self.at if self.sent_after is None else self.sent_after


@dataclass(frozen=True)
class Operation:
    id: int
    client: int
    op: str
    session: str
    invoke: float
    complete: float | None
    status: int | None
    messages: list[dict[str, Any]] | None = None
    answer: dict[str, Any] | None = None
    answer_if_committed: dict[str, Any] | None = None
    num_assistant: int | None = None
    turns: list[list[dict[str, Any]]] | None = None
    """``get`` on a tree: every committed turn, each as its request's messages and answer."""
    upstream: list[UpstreamEvent] = field(default_factory=list)
    script: list[Any] | None = None
    """``chat``: the upstream script it was sent with (scenario syntax: ``["hold"]``)."""
    gave_up: float | None = None
    """When the client stopped waiting, for an unknown outcome (a hang-up, a timeout)."""
    stream: str | None = None
    """``chat`` with ``stream: true``: how the stream ended (``done``, ``error:TYPE``...)."""
    assembled: dict[str, Any] | None = None
    """``chat`` with ``stream: true``: the assistant message its chunks assembled into."""
    implicit: bool = False
    """``create`` on a server that creates sessions implicitly: the client made the
    id up and sent nothing; the first request naming it creates the session."""
    refusal: str | None = None
    """An answer that is not 2xx: its status and the start of its body, as the
    server sent it (a run in which nothing succeeded quotes these)."""
    after_error: list[str] | None = None
    """``chat`` whose stream ended with an error event: what arrived after it (``[DONE]``,
    a data event...), read on to the stream's end; nothing may."""
    engine_answers: list[dict[str, Any]] | None = None
    """``chat`` answered 2xx with an answer the engine gave on none of its successful
    attempts (an aborted completion passed on, say): the answers it did give (empty:
    no attempt succeeded). Absent when the answer is one of them."""
    outwaited: list[str] | None = None
    """``delete``: tags of held upstream calls the harness released because this
    DELETE had not been answered within its patience (it waited for the engine).
    ``chat``: its own tag, if its client hung up and the server had not stopped its
    held upstream call within that patience."""

    @property
    def unfinished_stream(self) -> bool:
        """Answered 2xx, but the stream did not reach [DONE]: committed or not, unknown."""
        return (
            self.stream not in (None, "done", "not streamed", "no stream")
            and self.status is not None
            and self.status // 100 == 2
        )

    @property
    def unknown(self) -> bool:
        return self.status is None or self.unfinished_stream

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status // 100 == 2 and not self.unfinished_stream

    def describe(self) -> str:
        outcome = "unknown outcome" if self.status is None else str(self.status)
        if self.stream is not None and (self.status is not None or self.stream == "hung up"):
            outcome += f" (stream: {self.stream})"
        return f"#{self.id} client {self.client} {self.op} -> {outcome}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_history(path: Path, operations: Iterable[Operation]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for operation in operations:
            out.write(json.dumps(operation.to_json(), separators=(",", ":")) + "\n")


def read_history(path: Path) -> list[Operation]:
    shown = str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioFileError(shown, None, None, f"cannot read: {error}") from None
    operations: list[Operation] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            operations.append(operation_from_json(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ScenarioFileError(shown, number, 1, f"not a history operation: {error}") from None
    if not operations:
        # "valid" would be true of nothing, and read as a pass.
        raise ScenarioFileError(shown, None, None, "the history has no operations to check")
    return operations


def operation_from_json(data: dict[str, Any]) -> Operation:
    """One line of a history, parsed (KeyError, TypeError, ValueError if it is not one)."""
    if data["op"] not in OPS:
        raise ValueError(f"unknown op {data['op']!r}")
    events = [UpstreamEvent.from_json(e) for e in data.get("upstream") or []]
    complete = data.get("complete")
    status = data.get("status")
    return Operation(
        id=int(data["id"]),
        client=int(data["client"]),
        op=str(data["op"]),
        session=str(data["session"]),
        invoke=float(data["invoke"]),
        complete=None if complete is None else float(complete),
        status=None if status is None else int(status),
        messages=data.get("messages"),
        answer=data.get("answer"),
        answer_if_committed=data.get("answer_if_committed"),
        num_assistant=data.get("num_assistant"),
        turns=data.get("turns"),
        upstream=events,
        script=data.get("script"),
        gave_up=None if data.get("gave_up") is None else float(data["gave_up"]),
        stream=None if data.get("stream") is None else str(data["stream"]),
        assembled=data.get("assembled"),
        outwaited=data.get("outwaited"),
        engine_answers=data.get("engine_answers"),
        after_error=data.get("after_error"),
        refusal=None if data.get("refusal") is None else str(data["refusal"]),
        implicit=bool(data.get("implicit", False)),
    )


def recorded(
    ticket: int, client: int, op: str, session: str, observation: Observation, **fields: Any
) -> Operation:
    """What a client observed, as a history operation (``fields``: the op's arguments)."""
    unknown = observation.status is None and not observation.minted
    if unknown:
        fields["gave_up"] = observation.ended
    elif observation.status is not None and observation.status // 100 != 2:
        fields["refusal"] = describe(observation, limit=160)
    return Operation(
        id=ticket,
        client=client,
        op=op,
        session=session,
        # From when it left: the server cannot have acted on it before.
        invoke=observation.sent if observation.sent is not None else observation.started,
        complete=None if unknown else observation.ended,
        status=observation.status,
        **fields,
    )


def stream_fields(observation: Observation) -> dict[str, Any]:
    """How a chat sent with ``stream: true`` ended, for the history."""
    record = observation.stream
    if record is None:
        return {"stream": "no stream"}  # refused, or hung up on before an answer
    end = record.end.value
    if record.end is StreamEnd.ERROR:
        end = f"error:{record.error_type}"
    fields: dict[str, Any] = {"stream": end, "assembled": record.assembled}
    if record.after_error:
        fields["after_error"] = list(record.after_error)
    return fields


def engine_answers_unlike(
    upstream: ChaosUpstream, tag: str, answer: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """The answers the engine gave for ``tag`` on its successful attempts, if it was
    called and ``answer`` (a 2xx chat's) is none of them: an aborted completion passed
    on, say. None otherwise, and for a chat whose engine was never called (an exact
    retry answered from the stored turn)."""
    if upstream.count(tag, EventKind.RECEIVED) == 0:
        return None
    given = upstream.answers(tag)
    if message_key(answer) in {message_key(a) for a in given}:
        return None
    return given


def upstream_events(events: Iterable[StepEvent], since: float) -> list[UpstreamEvent]:
    """The upstream's events for one operation: those of its tag from its invocation on
    (an exact retry shares the tag of the turn it retries)."""
    return [UpstreamEvent.of(e) for e in events if e.at >= since]
