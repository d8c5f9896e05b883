"""A third-party-style server (tests/third_party_server.py) under its profile.

It must get FAIL on exactly its three planted safety bugs, NON-STRICT on its
conventions, and PASS elsewhere; --strict turns its conventions into failures.
"""

from __future__ import annotations

from functools import partial

import trio

from harness.model.loader import load_scenarios
from harness.model.profile import load_profile
from harness.results import Kind, SuiteResult, Verdict
from harness.run.runner import RunSettings
from harness.run.suite import SuiteSettings, Target, run_suite
from harness.upstream.chaos_upstream import ChaosUpstream
from refserver.server import serve_asgi

from .third_party_server import create_third_party_app

PLANTED = ["in-flight turn not preempted", "queued chats proceed after DELETE", "phantom commit"]

FAILING = {
    # in-flight turn not preempted
    "delete-mid-proxy",
    "double-delete-concurrent",
    "delete-leaves-other-sessions-alone",
    "delete-during-upstream-retry",
    "no-resurrection-after-preempt",
    # queued chats proceed after DELETE (and the in-flight turn ahead of them)
    "chats-queued-then-delete",
    "chat-during-delete",
    # phantom commit
    "concurrent-writers-no-phantom",
}
NON_STRICT = {
    "double-delete-sequential",  # 404 with a plain-string error
    "chat-and-get-after-delete",  # likewise
    "chat-never-existed",  # likewise
    "rapid-create-chat-delete-cycles",  # create answers 200
    "exact-retry-replays",  # an exact retry regenerates
    "upstream-failures-leave-state-unchanged",  # 502 with a plain-string error
    "bad-input",  # 500 and a closed connection on malformed JSON; stream: true served
    "stale-writer-gets-409",  # 400 instead of 409
}
PASSING = {
    "upstream-abort-then-success",
    "client-disconnect-mid-proxy",
    "get-does-not-wait-for-a-turn",
}


async def run_against_third_party(nursery: trio.Nursery, *, strict: bool) -> SuiteResult:
    chaos = ChaosUpstream()
    await nursery.start(chaos.serve)
    assert chaos.url is not None
    url = await nursery.start(
        partial(serve_asgi, create_third_party_app(chaos.url), "127.0.0.1", 0)
    )
    settings = SuiteSettings(
        target_wait=0,
        run=RunSettings(
            profile=load_profile("records-tool-400"), strict=strict, timing_bounds=False
        ),
    )
    return await run_suite(load_scenarios([]), [Target("third-party", url)], settings, chaos=chaos)


async def test_fails_exactly_its_planted_bugs_and_is_non_strict_on_conventions(
    nursery: trio.Nursery,
) -> None:
    result = await run_against_third_party(nursery, strict=False)
    verdicts = {s.name: s.verdict for s in result.scenarios}
    assert {n for n, v in verdicts.items() if v is Verdict.FAIL} == FAILING
    assert {n for n, v in verdicts.items() if v is Verdict.NON_STRICT} == NON_STRICT
    assert {n for n, v in verdicts.items() if v is Verdict.PASS} == PASSING
    assert sorted(result.labels(Kind.SAFETY)) == sorted(PLANTED)
    conventions = result.labels(Kind.CONVENTION)
    assert "create answers 200, not 201 (declared in the profile)" in conventions
    assert "rejected requests answer 400, not 409 (declared in the profile)" in conventions
    assert "bad-input handling: 500 on bad-json" in conventions
    assert "an exact retry regenerates instead of replaying" in conventions
    assert result.exit_code == 1
    # No harness errors: the 500-and-close, the event stream and the missing
    # health route are findings about the server, not failures of the harness.
    assert all(not run.errors for s in result.scenarios for run in s.runs)


async def test_strict_turns_conventions_into_failures(nursery: trio.Nursery) -> None:
    result = await run_against_third_party(nursery, strict=True)
    verdicts = {s.name: s.verdict for s in result.scenarios}
    assert {n for n, v in verdicts.items() if v is Verdict.FAIL} == FAILING | NON_STRICT
    assert result.count(Verdict.NON_STRICT) == 0
