"""A server with a one-step rollback policy: a declared convention, never an excuse for data loss.

Such a server answers a request that differs from the committed trajectory only
in its last turn by replacing that turn (an agent that rewinds its last step),
where the contract refuses with 409. Declared in the profile (``rollback:
one-step``), that is NON-STRICT. What stays safety: a writer that never saw
the turn it replaced (two concurrent first turns) drops a turn that was
answered 200, a phantom commit on any server.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import httpx
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from harness.model.loader import load_scenarios
from harness.model.profile import REFERENCE_PROFILE, Profile
from harness.results import Kind, SuiteResult, Verdict
from harness.run.client import TargetClient
from harness.run.profile_probe import probe_profile
from harness.run.runner import RunSettings
from harness.run.suite import SuiteSettings, Target, run_suite
from harness.upstream.chaos_upstream import ChaosUpstream
from refserver.server import serve_asgi
from wire.rules import first_divergence

ROLLBACK_PROFILE = REFERENCE_PROFILE.model_copy(update={"name": "rollback", "rollback": "one-step"})


def rollback_server(upstream: str) -> Starlette:
    sessions: dict[str, list[dict[str, Any]]] = {}
    locks: dict[str, trio.Lock] = {}
    counter = iter(range(1_000_000))

    async def create(request: Request) -> Response:
        session_id = f"s{next(counter)}"
        sessions[session_id], locks[session_id] = [], trio.Lock()
        return JSONResponse({"session_id": session_id}, status_code=201)

    async def session(request: Request) -> Response:
        messages = sessions.get(request.path_params["sid"])
        if messages is None:
            return JSONResponse({"error": {"type": "session_not_found"}}, status_code=404)
        if request.method == "DELETE":
            del sessions[request.path_params["sid"]]
            return Response(status_code=204)
        assistant = sum(1 for m in messages if m["role"] == "assistant")
        return JSONResponse({"messages": messages, "num_assistant": assistant})

    async def chat(request: Request) -> Response:
        sid = request.path_params["sid"]
        body = json.loads(await request.body())
        sent: list[dict[str, Any]] = body["messages"]
        async with locks[sid]:  # held across the upstream call: no phantom of its own
            committed = sessions[sid]
            answers = [i for i, m in enumerate(committed) if m["role"] == "assistant"]
            keep = answers[-2] + 1 if len(answers) >= 2 else 0
            divergence = first_divergence(committed, sent)
            extends = divergence is None and len(sent) > len(committed)
            rolls_back = divergence is not None and divergence >= keep
            if not (extends or rolls_back) or sent[-1]["role"] == "assistant":
                return JSONResponse({"error": {"type": "conflict"}}, status_code=409)
            async with httpx.AsyncClient() as client:
                answer = (await client.post(f"{upstream}/chat/completions", json=body)).json()
            sessions[sid] = [*sent, answer["choices"][0]["message"]]
        return JSONResponse(answer)

    return Starlette(
        routes=[
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{sid}", session, methods=["GET", "DELETE"]),
            Route("/sessions/{sid}/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


async def run(nursery: trio.Nursery, profile: Profile, names: str) -> SuiteResult:
    chaos = ChaosUpstream()
    await nursery.start(chaos.serve)
    assert chaos.url is not None
    url = await nursery.start(partial(serve_asgi, rollback_server(chaos.url), "127.0.0.1", 0))
    settings = SuiteSettings(target_wait=0, repeat=1, run=RunSettings(profile=profile))
    return await run_suite(load_scenarios([], names), [Target("rb", url)], settings, chaos=chaos)


async def test_a_declared_one_step_rollback_is_a_convention(nursery: trio.Nursery) -> None:
    result = await run(nursery, ROLLBACK_PROFILE, "stale-writer-gets-409")
    (scenario,) = result.scenarios
    assert scenario.verdict is Verdict.NON_STRICT, [f for r in scenario.runs for f in r.failures]
    labels = result.labels(Kind.CONVENTION)
    assert (
        "a request that differs in its last turn rolls that turn back (declared in the profile)"
        in labels
    )
    assert result.labels(Kind.SAFETY) == []  # c1's turn, rolled back by policy, is no phantom


async def test_undeclared_it_is_the_stale_writer_it_looks_like(nursery: trio.Nursery) -> None:
    result = await run(nursery, REFERENCE_PROFILE, "stale-writer-gets-409")
    assert result.scenarios[0].verdict is Verdict.FAIL
    assert "stale writer accepted (last writer wins)" in result.labels(Kind.SAFETY)


async def test_a_writer_that_never_saw_the_turn_it_replaced_is_still_a_phantom_commit(
    nursery: trio.Nursery,
) -> None:
    result = await run(nursery, ROLLBACK_PROFILE, "concurrent-writers-no-phantom")
    assert result.scenarios[0].verdict is Verdict.FAIL
    assert "phantom commit" in result.labels(Kind.SAFETY)


async def test_profile_check_finds_the_rollback(nursery: trio.Nursery) -> None:
    chaos = ChaosUpstream()
    await nursery.start(chaos.serve)
    assert chaos.url is not None
    url = await nursery.start(partial(serve_asgi, rollback_server(chaos.url), "127.0.0.1", 0))
    client = TargetClient(url, request_timeout=10)
    result = await probe_profile(client, chaos)
    await client.aclose()
    assert result.profile.rollback == "one-step"
    assert "a request that differs in its last turn replaced that turn" in result.notes
    nursery.cancel_scope.cancel()
