"""The garbage-collection policy (refserver/collector.py), and what makes it safe.

The policy freezes what grows old, trusting reference counting to free a turn's
objects when the turn ends. That holds only if no path through
the server leaves a reference cycle: the first test drives every kind of turn
and connection with the collector saving what it finds, and fails on anything of
the server's (refserver, hypercorn, starlette) among it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind
from refserver.app import create_app
from refserver.collector import COLLECTOR, NEVER, Checked, Collector
from refserver.server import ServerConfig, serve, serve_asgi
from refserver.service import SessionService
from refserver.transport.engine_http import EngineConnections
from refserver.upstream import HttpUpstream

from .conftest import FAST_RETRY, HANG_GUARD, Api, ServerStarter, user

SERVER_PARTS = ("refserver", "hypercorn", "starlette")


def _server_part(thing: object) -> str | None:
    """The server part ``thing`` belongs to (by its type's module, or a frame's code), if any."""
    code = getattr(thing, "f_code", None) or getattr(thing, "cr_code", None)
    where = code.co_filename if code is not None else type(thing).__module__
    for part in SERVER_PARTS:
        if f"/{part}/" in where or where.split(".")[0] == part:
            return f"{type(thing).__qualname__} ({where})"
    return None


class Cycles:
    """Everything the collector finds unreachable, kept (``DEBUG_SAVEALL``) to be read."""

    def __enter__(self) -> Cycles:
        gc.collect()
        gc.garbage.clear()
        gc.set_debug(gc.DEBUG_SAVEALL)
        return self

    def of_the_server(self) -> list[str]:
        gc.collect()
        return sorted({found for thing in gc.garbage if (found := _server_part(thing))})

    def __exit__(self, *exc_info: object) -> None:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


async def test_no_turn_or_connection_leaves_a_reference_cycle(
    start_server: ServerStarter, chaos: ChaosUpstream
) -> None:
    # Nothing frozen here: a cycle among frozen objects would not be found.
    running = await start_server()
    async with httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD) as client:
        api = Api(client, chaos)

        async def complete() -> None:
            session_id = await api.create()
            assert (await api.chat(session_id, [user("ok")])).status_code == 200
            assert (await api.get(session_id)).status_code == 200
            await api.delete(session_id)

        async def streamed() -> None:
            session_id = await api.create()
            body = {"model": "m", "stream": True, "messages": [user("ok")]}
            url = f"/sessions/{session_id}/v1/chat/completions"
            async with client.stream("POST", url, json=body) as answer:
                assert answer.status_code == 200
                await answer.aread()

        async def anthropic() -> None:
            session_id = await api.create()
            body = {"model": "m", "max_tokens": 8, "messages": [user("ok")]}
            answer = await client.post(f"/sessions/{session_id}/v1/messages", json=body)
            assert answer.status_code == 200, answer.text

        async def held(then: Callable[[str], Awaitable[object]]) -> httpx.Response | None:
            session_id = await api.create()
            answers: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:

                async def chat() -> None:
                    answers.append(await api.chat(session_id, [user("held")]))

                nursery.start_soon(chat)
                await chaos.wait_for(
                    "held", EventKind.RECEIVED, chaos.count("held", EventKind.RECEIVED) + 1
                )
                await then(session_id)
                if not answers:
                    nursery.cancel_scope.cancel()  # ``then`` hung up
            return answers[0] if answers else None

        async def held_then_deleted() -> None:
            answer = await held(api.delete)
            assert answer is not None
            assert answer.status_code == 410

        async def held_then_hung_up() -> None:
            async def hang_up(session_id: str) -> None:
                pass  # held()'s nursery is cancelled: the client closes its connection

            await held(hang_up)

        async def refused() -> None:
            session_id = await api.create()
            bad = await client.post(f"/sessions/{session_id}/v1/chat/completions", content=b"{")
            assert bad.status_code == 400
            assert (await api.chat(session_id, [user("ok")])).status_code == 200
            assert (await api.chat(session_id, [user("ok", "other")])).status_code == 409
            assert (await api.chat("nosuch", [user("ok")])).status_code == 404
            failing = await api.create()
            assert (await api.chat(failing, [user("down")])).status_code >= 500

        async def fresh_connection() -> None:
            async with httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD) as once:
                assert (await once.get("/healthz")).status_code == 200

        api.script("held", "hold")
        api.script("down", {"status": 503})
        paths = [
            complete,
            streamed,
            anthropic,
            held_then_deleted,
            held_then_hung_up,
            refused,
            fresh_connection,
        ]
        for path in paths:
            await path()  # warm: what a first use builds once is not a turn's
        for path in paths:
            with Cycles() as cycles:
                for _ in range(3):
                    await path()
                # The server's side of a hang-up ends when the server notices it.
                await trio.testing.wait_all_tasks_blocked()
                assert cycles.of_the_server() == [], path.__name__


@pytest.fixture
def collector() -> Iterator[Collector]:
    assert not COLLECTOR.installed, "no server may run in this process during these tests"
    policy = Collector(step=1_000, floor=10_000)
    policy.install()
    yield policy
    policy.uninstall()


class Node:
    def __init__(self) -> None:
        self.other: Any = self


def grow_old(count: int) -> list[list[int]]:
    """``count`` objects that survive into the oldest generation, with no full collection."""
    grown = [[n] for n in range(count)]
    gc.collect(1)  # the young generations' survivors move to the oldest
    return grown


def test_start_up_is_frozen_and_full_collections_are_off_until_uninstalled() -> None:
    thresholds = gc.get_threshold()
    policy = Collector()
    policy.install()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[2] == NEVER
        assert gc.get_threshold()[:2] == thresholds[:2]  # young collections as CPython runs them
    finally:
        policy.uninstall()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds


def test_what_grows_old_is_frozen_in_steps_without_a_collection(collector: Collector) -> None:
    collector.check(in_flight=1)  # whatever the fixture left
    few = grow_old(collector.step // 2)
    assert collector.check(in_flight=1).froze == 0  # not yet a step
    many = grow_old(collector.step)
    checked = collector.check(in_flight=1)
    assert checked.froze >= len(few) + len(many)
    assert not checked.thawed
    assert gc.get_objects(generation=2) == []


def test_a_cycle_frozen_before_it_became_garbage_goes_at_the_next_thaw(
    collector: Collector,
) -> None:
    cycle = Node()
    gone = weakref.ref(cycle)
    old = grow_old(collector.step)
    assert collector.check(in_flight=1).froze > len(old)  # frozen while still in use
    del cycle
    gc.collect()
    assert gone() is not None, "a frozen cycle is kept: the risk the policy bounds"
    collector.thaw()
    assert gone() is None


def test_an_idle_server_thaws_after_a_quarter_more_was_frozen(collector: Collector) -> None:
    kept = max(collector.kept_at_thaw, collector.floor)
    grown = grow_old(int(kept * 0.3))
    assert not collector.check(in_flight=1).thawed  # busy: a quarter is not enough
    thaws = collector.thaws
    checked = collector.check(in_flight=0)
    assert checked.thawed
    assert not checked.forced
    assert collector.thaws == thaws + 1
    assert collector.kept_at_thaw >= len(grown)
    assert not collector.check(in_flight=0).thawed  # nothing grew since


def test_a_busy_server_thaws_only_past_its_bound_which_turns_in_flight_raise(
    collector: Collector,
) -> None:
    kept = max(collector.kept_at_thaw, collector.floor)
    grown = grow_old(int(collector.forced_growth * kept))
    # Each turn in flight allows PER_TURN more: a ramp of held turns forces nothing.
    in_flight = len(grown) // collector.per_turn + 1
    assert not collector.check(in_flight=in_flight).thawed
    checked = collector.check(in_flight=1)
    assert checked.thawed
    assert checked.forced


def test_objects_freed_after_freezing_do_not_count_toward_a_thaw(collector: Collector) -> None:
    # Turns that start and end: their objects are frozen, then freed by reference
    # counting. The bound counts them; the exact count, taken when the bound says
    # a thaw may be due, does not, and no thaw comes.
    kept = max(collector.kept_at_thaw, collector.floor)
    for _ in range(int(collector.forced_growth * kept) // collector.step + 2):
        grown = grow_old(collector.step)
        collector.check(in_flight=1)
        del grown
    assert collector.thaws == 1  # the install's only
    assert collector.frozen_bound < collector.forced_growth * kept


def test_each_server_in_a_process_installs_it_the_last_to_stop_removes_it() -> None:
    thresholds = gc.get_threshold()
    policy = Collector()
    policy.install()
    policy.install()
    policy.uninstall()
    assert gc.get_threshold()[2] == NEVER
    policy.uninstall()
    assert gc.get_threshold() == thresholds
    assert policy.check(in_flight=0) == Checked()


async def test_the_server_runs_the_policy_and_counts_its_turns_in_flight(
    chaos: ChaosUpstream,
) -> None:
    thresholds = gc.get_threshold()
    async with trio.open_nursery() as nursery:
        assert chaos.url is not None
        engine = EngineConnections(chaos.url)
        service = SessionService(HttpUpstream(engine, timeout=5.0, retry=FAST_RETRY))
        app = create_app(service)
        url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
        async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD) as client:
            api = Api(client, chaos)
            session_id = await api.create()
            api.script("counted", "hold")
            assert app.turns_in_flight == 0
            async with trio.open_nursery() as chats:
                chats.start_soon(api.chat, session_id, [user("counted")])
                await chaos.wait_for("counted", EventKind.RECEIVED)
                assert app.turns_in_flight == 1
                assert app.requests_in_flight == 1
                chaos.release("counted")
            await trio.testing.wait_all_tasks_blocked()  # the answer sent, the call returns
            assert app.turns_in_flight == 0
            assert app.requests_in_flight == 0
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, ServerConfig(port=0, upstream_url=chaos.url, defer_gc=True))
        assert COLLECTOR.installed
        assert gc.get_threshold()[2] == NEVER
        nursery.cancel_scope.cancel()
    assert not COLLECTOR.installed
    assert gc.get_threshold() == thresholds


def test_requests_in_flight_make_a_server_busy_even_with_no_turn(collector: Collector) -> None:
    # A storm of creates is not an idle moment: only the forced bound applies.
    kept = max(collector.kept_at_thaw, collector.floor)
    grown = grow_old(int(kept * 0.3))
    assert not collector.check(in_flight=0, idle=False).thawed
    assert collector.check(in_flight=0, idle=True).thawed
    assert collector.kept_at_thaw >= len(grown)
