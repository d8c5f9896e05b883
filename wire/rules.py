"""The session rules of docs/contract.md, with no I/O.

Everything the reference server *decides* is here; ``service.py`` only
carries the decisions out (locks, cancel scopes, the upstream call).

Session lifecycle
=================

::

    OPEN ──DELETE accepted──▶ CLOSING ──turn in flight preempted──▶ GONE

    state     GET    DELETE           chat arrives     chat holds the lock
    ───────   ────   ──────────────   ──────────────   ───────────────────
    OPEN      200    204, → GONE      waits on lock    validate the turn
    CLOSING   404    404              404              404  (was queued)
    GONE      404    404              404              404  (was queued)

* One FIFO lock per session is held from validation through the upstream
  call to the commit, so turns of one session are serialised and no commit
  can be based on stale state (the phantom commit of the seed PR).
* DELETE never waits, neither for the upstream nor for the lock: it moves
  the session to CLOSING, preempts the turn in flight (which commits nothing,
  closes its engine connection and answers 410, just after the 204), and
  removes the session, all before it answers. Turns queued on the lock find
  the session gone when they take it, and answer 404. (CLOSING lasts only
  while a DELETE runs; a server whose DELETE waits would stay in it.)
* A chat never creates a session.

Turn validation (under the lock, against the committed trajectory)
==================================================================

``classify_turn`` returns one of:

* ``Extend``   the committed messages are a prefix of the request, at least one
               message is new and the last is not from the assistant:
               proxy, then commit ``request + [answer]``.
* ``Replay``   the request repeats the last committed turn's messages exactly:
               answer the stored response, call no upstream.
* ``Conflict`` anything else: 409, naming the committed length and the first
               index where the request diverges.

Messages are compared on role, content, name, tool_calls and tool_call_id;
other keys that clients add are ignored.

Streamed turns (``stream: true``) follow the same rules; what is particular
to them (assembling the answer from chunks, and that the commit point is the
end of the engine's stream, before the client's last chunk) is in
``streaming.py``, also without I/O.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Message = Mapping[str, Any]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    GONE = "gone"


class Transition(enum.Enum):
    DELETE_ACCEPTED = "delete accepted"
    REMOVED = "removed"


# The only two moves a session ever makes. Anything else is a bug in the caller.
_TRANSITIONS: Mapping[tuple[SessionState, Transition], SessionState] = {
    (SessionState.OPEN, Transition.DELETE_ACCEPTED): SessionState.CLOSING,
    (SessionState.CLOSING, Transition.REMOVED): SessionState.GONE,
}


def next_state(state: SessionState, transition: Transition) -> SessionState:
    try:
        return _TRANSITIONS[(state, transition)]
    except KeyError:
        raise RuntimeError(
            f"illegal session transition {transition.value!r} from {state.value!r}"
        ) from None


def is_visible(state: SessionState) -> bool:
    """GET, DELETE and chat (on arrival and again on taking the lock) only see OPEN sessions."""
    return state is SessionState.OPEN


@dataclass(frozen=True)
class Extend:
    new_messages: int


@dataclass(frozen=True)
class Replay:
    pass


@dataclass(frozen=True)
class Conflict:
    committed_length: int
    diverging_index: int
    reason: str


TurnDecision = Extend | Replay | Conflict


def comparable(message: Message) -> tuple[Any, ...]:
    """The parts of a message that identify it; client-added keys are ignored."""
    return (
        message.get("role"),
        _comparable_content(message.get("content")),
        message.get("name"),
        _comparable_tool_calls(message.get("tool_calls")),
        message.get("tool_call_id"),
    )


def _comparable_content(content: Any) -> Any:
    # Clients may echo an assistant's text as a list of text parts, and may
    # send "" where the engine answered null alongside tool calls.
    if content is None or content == "":
        return None
    if isinstance(content, list) and all(
        isinstance(part, Mapping) and part.get("type") == "text" for part in content
    ):
        return "".join(str(part.get("text", "")) for part in content) or None
    if isinstance(content, str):
        return content
    return json.dumps(content, sort_keys=True)


def _comparable_tool_calls(tool_calls: Any) -> Any:
    # SDKs add or drop bookkeeping keys (``index``) when echoing tool calls back;
    # what identifies a call is its id, type, function name and arguments.
    if not tool_calls:
        return None
    if not isinstance(tool_calls, list):
        return json.dumps(tool_calls, sort_keys=True)
    normalised: list[object] = []
    for call in tool_calls:
        if not isinstance(call, Mapping):
            normalised.append(json.dumps(call, sort_keys=True))
            continue
        raw_function = call.get("function")
        function: Mapping[str, Any] = raw_function if isinstance(raw_function, Mapping) else {}
        normalised.append(
            (
                call.get("id"),
                call.get("type", "function"),
                function.get("name"),
                function.get("arguments"),
            )
        )
    return tuple(normalised)


def first_divergence(left: Sequence[Message], right: Sequence[Message]) -> int | None:
    """Index of the first message that differs, or None if one is a prefix of the other."""
    for index, (a, b) in enumerate(zip(left, right, strict=False)):
        if comparable(a) != comparable(b):
            return index
    return None


def same_messages(left: Sequence[Message], right: Sequence[Message]) -> bool:
    return len(left) == len(right) and first_divergence(left, right) is None


def classify_turn(
    committed: Sequence[Message],
    last_turn_request: Sequence[Message] | None,
    request: Sequence[Message],
) -> TurnDecision:
    """Decide what a chat turn does, given the committed trajectory."""
    if last_turn_request is not None and same_messages(last_turn_request, request):
        return Replay()
    divergence = first_divergence(committed, request)
    if divergence is not None:
        return Conflict(
            committed_length=len(committed),
            diverging_index=divergence,
            reason=f"message {divergence} differs from the committed trajectory",
        )
    if len(request) <= len(committed):
        return Conflict(
            committed_length=len(committed),
            diverging_index=len(request),
            reason=(
                f"the request has {len(request)} messages and adds nothing to the "
                f"{len(committed)} committed ones"
            ),
        )
    if request[-1].get("role") == "assistant":
        return Conflict(
            committed_length=len(committed),
            diverging_index=len(request) - 1,
            reason="the last message is an assistant message; there is nothing to answer",
        )
    return Extend(new_messages=len(request) - len(committed))
