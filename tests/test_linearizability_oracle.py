"""The history checker's search against the definition, on small random histories.

The search takes shortcuts: memoisation, forced placements on a tree, and
reads and refusals placed once where they rule nothing out. The oracle takes
none: every order of the operations that respects real time, each folded
through the same sequential model (``step``). The two must agree on every
history, valid or not.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.chaos.history import Operation
from harness.chaos.linearizability import ALIVE, GONE, NOT_CREATED, State, check_session, step
from harness.model.scenario import TrajectoryModel

U1: dict[str, Any] = {"role": "user", "content": "one"}
A1: dict[str, Any] = {"role": "assistant", "content": "answer one"}
U2: dict[str, Any] = {"role": "user", "content": "two"}
A2: dict[str, Any] = {"role": "assistant", "content": "answer two"}
W: dict[str, Any] = {"role": "user", "content": "a stale writer"}

CHATS = [([U1], A1), ([U1, A1, U2], A2), ([W], A1)]
READS = [[], [U1, A1], [U1, A1, U2, A2]]
TREES: list[list[list[dict[str, Any]]] | None] = [
    None,
    [],
    [[U1, A1]],
    [[U1, A1], [U1, A1, U2, A2]],
]


@st.composite
def operations(draw: st.DrawFn) -> list[Operation]:
    ops: list[Operation] = []
    if draw(st.booleans()):
        ops.append(_op(0, "create", 0.0, 0.5, draw(st.sampled_from([201, None]))))
    for index in range(len(ops), draw(st.integers(1, 6)) + len(ops)):
        invoke = float(draw(st.integers(1, 8)))
        length = draw(st.integers(0, 4)) + 0.5
        kind = draw(st.sampled_from(["chat", "chat", "get", "get", "delete"]))
        if kind == "chat":
            messages, answer = draw(st.sampled_from(CHATS))
            status = draw(st.sampled_from([200, 409, 502, None]))
            fields: dict[str, Any] = {"messages": messages}
            if status == 200:
                fields["answer"] = answer
            elif status is None:
                fields["answer_if_committed"] = answer
        elif kind == "get":
            status = draw(st.sampled_from([200, 200, 404, None]))
            read = draw(st.sampled_from(READS))
            fields = {"messages": read, "num_assistant": len(read) // 2}
            fields["turns"] = draw(st.sampled_from(TREES)) if status == 200 else None
        else:
            status = draw(st.sampled_from([204, 404, None]))
            fields = {}
        complete = None if status is None else invoke + length
        ops.append(_op(index, kind, invoke, complete, status, **fields))
    return ops


def _op(
    index: int, kind: str, invoke: float, complete: float | None, status: int | None, **fields: Any
) -> Operation:
    return Operation(
        id=index,
        client=index,
        op=kind,
        session="s",
        invoke=invoke,
        complete=complete,
        status=status,
        **fields,
    )


def oracle(ops: Sequence[Operation], model: TrajectoryModel) -> str:
    """Valid if some order that respects real time has a state at every step."""
    initial = NOT_CREATED if any(o.op == "create" for o in ops) else GONE

    def ends(op: Operation) -> float:
        return float("inf") if op.complete is None or op.unknown else op.complete

    for order in itertools.permutations(ops):
        # Real time: an operation that returned before another began comes first.
        if any(
            ends(later) < earlier.invoke
            for i, earlier in enumerate(order)
            for later in order[i + 1 :]
        ):
            continue
        states: set[State] = {initial}
        for op in order:
            states = {after for state in states for after in step(state, op, model).states}
            if not states:
                break
        else:
            return "valid"
    return "invalid"


@settings(max_examples=400, deadline=None)
@given(operations(), st.sampled_from(["linear", "tree"]))
def test_the_search_agrees_with_every_order_tried(
    ops: list[Operation], model: TrajectoryModel
) -> None:
    assert check_session(ops, model=model)[0] == oracle(ops, model)


def test_the_oracle_can_say_invalid() -> None:
    # Two 200s from one empty session, the second extending nothing the first left.
    ops = [
        _op(0, "create", 0.0, 0.5, 201),
        _op(1, "chat", 1.0, 2.0, 200, messages=[U1], answer=A1),
        _op(2, "chat", 3.0, 4.0, 200, messages=[W], answer=A1),
    ]
    assert oracle(ops, "linear") == "invalid" == check_session(ops)[0]
    assert ALIVE.alive
