"""Shrinking: delta debugging, a history as a case, and a failure shrunk against real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from harness.chaos.case import Case, CaseOp, Point, ScenarioText, case_from_history, render
from harness.chaos.ddmin import ddmin
from harness.chaos.history import Operation, UpstreamEvent
from harness.chaos.linearizability import Finding, check_history
from harness.chaos.shrink import Replayer, ShrinkSettings, shrink
from harness.model.loader import parse_scenario
from harness.run.client import TargetClient
from harness.run.runner import RunSettings
from harness.upstream.chaos_upstream import ChaosUpstream
from refserver.server import ServerConfig, serve

S = "s1"
U0: dict[str, Any] = {"role": "user", "content": "zero"}
A0: dict[str, Any] = {"role": "assistant", "content": "answer zero"}
U1: dict[str, Any] = {"role": "user", "content": "one"}
U2: dict[str, Any] = {"role": "user", "content": "two"}
TEXT = ScenarioText("shrunk", "a test case", "a test property")


def chat(
    op_id: int,
    invoke: float,
    complete: float | None,
    status: int | None,
    messages: list[dict[str, Any]],
    events: list[tuple[str, float]],
    script: list[Any],
    **fields: Any,
) -> Operation:
    return Operation(
        id=op_id,
        client=op_id % 3,
        op="chat",
        session=S,
        invoke=invoke,
        complete=complete,
        status=status,
        messages=messages,
        answer_if_committed={"role": "assistant", "content": f"answer {op_id}"},
        upstream=[UpstreamEvent(kind, at) for kind, at in events],
        script=script,
        **fields,
    )


def plain(op_id: int, op: str, invoke: float, complete: float, status: int) -> Operation:
    return Operation(op_id, 0, op, S, invoke, complete, status)


# -- ddmin ---------------------------------------------------------------------------


async def test_ddmin_finds_a_one_minimal_failing_subset_in_order() -> None:
    tried: list[list[int]] = []

    async def fails(items: list[int]) -> bool:
        tried.append(items)
        return {3, 11, 17} <= set(items)

    assert await ddmin(list(range(20)), fails) == [3, 11, 17]
    assert all(t == sorted(t) for t in tried)  # chunks keep the order: it matters here


async def test_ddmin_keeps_everything_when_every_item_is_needed() -> None:
    async def fails(items: list[str]) -> bool:
        return items == ["a", "b", "c"]

    assert await ddmin(["a", "b", "c"], fails) == ["a", "b", "c"]


# -- from a history to a case ----------------------------------------------------------


def mixed_history() -> list[Operation]:
    c1 = chat(
        1,
        1.0,
        1.6,
        200,
        [U0],
        [("received", 1.1), ("answered", 1.2), ("received", 1.3), ("answered", 1.5)],
        ["abort", "respond"],
    )
    c2 = chat(
        2, 2.0, 2.4, 200, [U0, c1.answer_if_committed or {}, U1], [("received", 2.1)], ["hold"]
    )
    retry = chat(3, 2.05, 2.2, 200, [U0], [], [{"delay": 0.01}])
    hung_up = chat(
        4,
        2.5,
        None,
        None,
        [U2],
        [("received", 2.6), ("cancelled", 2.7)],
        ["hold"],
        gave_up=2.7,
    )
    return [
        plain(0, "create", 0.0, 0.1, 201),
        c1,
        c2,
        retry,
        plain(5, "get", 2.3, 2.35, 200),
        hung_up,
        plain(6, "delete", 3.0, 3.1, 204),
        plain(7, "get", 9.0, 9.1, 404),  # after the window: left out
    ]


def test_a_history_becomes_steps_in_the_order_it_ran() -> None:
    history = mixed_history()
    finding = Finding("linearizability", S, "made up", (history[1], history[6]))
    case = case_from_history(history, finding)
    assert [o.name for o in case.ops] == ["c1", "c2", "c3", "g5", "c4", "d6"]
    c1, c2, retry, _, hung_up, _ = case.ops
    assert (c1.faults, c1.final, c1.after, c1.retry) == (("abort",), "hold", None, None)
    assert c2.after == "c1"  # built on c1's request and answer
    assert retry.retry == "c1"
    assert retry.final == "hold"  # a delay becomes a hold too
    assert hung_up.after is None
    assert case.points == (
        Point("start", "c1"),
        Point("release", "c1"),  # at the last answer: the retry after the abort
        Point("start", "c2"),
        Point("start", "c3"),
        Point("start", "g5"),
        Point("start", "c4"),
        Point("cancel", "c4"),  # the client hung up here
        Point("start", "d6"),
        Point("release", "c2"),  # never answered in the history: released at the end,
        Point("release", "c3"),  # in the order the chats were sent
        Point("release", "c4"),
    )


def test_a_chat_overtaken_in_flight_can_be_sent_when_the_upstream_saw_it() -> None:
    history = mixed_history()
    finding = Finding("linearizability", S, "made up", tuple(history[1:3]))
    by_upstream = case_from_history(history, finding, "upstream")
    starts = [p.op for p in by_upstream.points if p.action == "start"]
    # c2 was sent at 2.0 but reached the upstream at 2.1: it now goes after c3 (sent at
    # 2.05), which never reached the upstream and so keeps its sending time.
    assert starts == ["c1", "c3", "c2", "g5"]
    sent = [p.op for p in case_from_history(history, finding).points if p.action == "start"]
    assert sent == ["c1", "c2", "c3", "g5"]


def test_a_retry_that_overtook_its_original_still_starts_after_it() -> None:
    """Placed by its arrival at the upstream, the original chat would start after
    its retry, and the scenario would name a step not yet defined (a CI run's
    shrink stopped with "'c176' is not an earlier step")."""
    original = chat(1, 1.0, 1.9, 200, [U0], [("received", 1.5), ("answered", 1.8)], ["hold"])
    retry = chat(2, 1.1, None, None, [U0], [], ["respond"], gave_up=1.2)  # hung up
    history = [plain(0, "create", 0.0, 0.1, 201), original, retry]
    case = case_from_history(history, Finding("durability", S, "x", (original, retry)), "upstream")
    assert case.op("c2").retry == "c1"
    assert case.points == (
        Point("start", "c1"),
        Point("start", "c2"),  # not at 1.1, before c1 reached the upstream
        Point("cancel", "c2"),  # not at its 1.2 either: after its own start
        Point("release", "c1"),
        Point("release", "c2"),  # never answered: released at the end
    )
    scenario = parse_scenario(render(case, TEXT), "<test>")
    assert [step.op for step in scenario.steps if step.op != "settle"][:3] == [
        "create",
        "chat",
        "chat",
    ]


def test_removing_an_operation_rebases_what_was_built_on_it() -> None:
    case = Case(
        (
            CaseOp("a", "chat"),
            CaseOp("b", "chat", after="a"),
            CaseOp("c", "chat", after="b"),
            CaseOp("r", "chat", retry="b"),
            CaseOp("d", "delete"),
        ),
        (*(Point("start", n) for n in "abcrd"), Point("release", "b")),
    )
    smaller = case.without({"b"})
    assert smaller.op("c").after == "a"  # builds on what b built on
    assert smaller.op("r") == CaseOp("r", "chat", after="a")  # a retry of b is a plain chat now
    assert Point("release", "b") not in smaller.points
    assert case.without({"a", "b"}).op("c").after is None  # a first turn
    renamed = smaller.renamed()
    assert [o.name for o in renamed.ops] == ["c1", "c2", "c3", "d4"]
    assert renamed.op("c2").after == "c1"


def test_a_rendered_case_is_a_scenario_the_harness_accepts() -> None:
    history = mixed_history()
    case = case_from_history(history, Finding("durability", S, "x", tuple(history[1:7])))
    scenario = parse_scenario(render(case, TEXT), "<test>")
    assert scenario.name == "shrunk"
    ops = [step.op for step in scenario.steps]
    assert ops[0] == "create"
    assert ops.count("settle") == len(case.points)  # every point is settled
    assert {"chat", "get", "delete", "release", "cancel"} <= set(ops)


# -- shrinking against real servers -------------------------------------------------------


@pytest.fixture
async def queued_proceed() -> AsyncIterator[Replayer]:
    """A replayer whose target lets queued chats proceed after a DELETE."""
    upstream = ChaosUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        assert upstream.url is not None
        target = await nursery.start(
            serve, ServerConfig(port=0, upstream_url=upstream.url, emulate="queued-proceed")
        )
        reference = await nursery.start(serve, ServerConfig(port=0, upstream_url=upstream.url))
        to_target, to_reference = (
            TargetClient(server.url, request_timeout=5, in_process=True)
            for server in (target, reference)
        )
        settings = RunSettings(event_grace=0.25, timing_bounds=False)
        yield Replayer(upstream, to_target, to_reference, settings)
        await to_target.aclose()
        await to_reference.aclose()
        nursery.cancel_scope.cancel()


def queued_after_delete_history() -> list[Operation]:
    """A queued chat reached the upstream after the DELETE that preempted the turn ahead of it,
    among operations that have nothing to do with it."""
    c1 = chat(1, 0.0, 0.03, 200, [U0], [("received", 0.01), ("answered", 0.02)], ["respond"])
    base = [U0, c1.answer_if_committed or {}]
    return [
        plain(0, "create", -0.1, -0.05, 201),
        c1,
        plain(2, "get", 0.04, 0.05, 200),
        chat(3, 0.1, 0.31, 410, [*base, U1], [("received", 0.11), ("cancelled", 0.3)], ["hold"]),
        chat(4, 0.2, 0.34, 200, [*base, U2], [("received", 0.32), ("answered", 0.33)], ["hold"]),
        plain(5, "get", 0.21, 0.22, 200),
        plain(6, "delete", 0.25, 0.3, 204),
    ]


async def test_a_leak_shrinks_to_a_minimal_scenario_that_replays_every_time(
    queued_proceed: Replayer,
) -> None:
    history = queued_after_delete_history()
    result = check_history(history)
    assert [f.kind for f in result.findings] == ["llm-leak"]
    shrunk = await shrink(
        history, result.findings, queued_proceed, lambda f: TEXT, ShrinkSettings(confirm_runs=3)
    )
    assert shrunk is not None
    assert (shrunk.operations_before, shrunk.target_failures, shrunk.reference_passes) == (6, 3, 3)
    assert not shrunk.exhausted
    scenario = parse_scenario(shrunk.text, "<shrunk>")
    http = [s for s in scenario.steps if s.op in ("chat", "get", "delete")]
    # What is left is the race itself: a turn in flight, a chat queued behind it, the DELETE.
    assert [s.op for s in http] == ["chat", "chat", "delete"]
    assert shrunk.operations_after == 3
    expected = {s.id: s.expect.status if s.expect else None for s in http}
    assert expected == {"c1": 410, "c2": 404, "d3": 204}
    assert scenario.expect.upstream["c2"].calls == 0  # the queued turn costs no LLM work


async def test_a_history_that_does_not_replay_gives_no_scenario(
    queued_proceed: Replayer,
) -> None:
    # A valid history whose "finding" is made up: nothing fails on replay.
    history = queued_after_delete_history()[:3]
    finding = Finding("durability", S, "made up", tuple(history[1:]))
    shrunk = await shrink(history, [finding], queued_proceed, lambda f: TEXT)
    assert shrunk is None
