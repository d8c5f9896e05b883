"""A third-party-style server (tests/third_party_server.py) under its profile.

It must get FAIL on exactly its three planted safety bugs, NON-STRICT on its
conventions, UNTESTED where a race cannot be placed on it (it buffers streams and
passes failures through), and PASS elsewhere; --strict turns its conventions
into failures.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import trio

from harness.model.loader import load_scenarios
from harness.model.profile import load_profile
from harness.results import Kind, SuiteResult, Verdict
from harness.run.client import TargetClient
from harness.run.runner import RunSettings
from harness.run.suite import SuiteSettings, Target, run_suite
from harness.upstream.chaos_upstream import ChaosUpstream

from .conftest import free_port
from .third_party_server import serve_third_party

PLANTED = ["in-flight turn not preempted", "queued chats proceed after DELETE", "phantom commit"]

FAILING = {
    # in-flight turn not preempted
    "delete-mid-proxy",
    "double-delete-concurrent",
    "delete-leaves-other-sessions-alone",
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
    "exact-retry-replays",  # an exact retry of the first turn is refused (400)
    "upstream-failures-leave-state-unchanged",  # 502 with a plain-string error
    "bad-input",  # 500 and a closed connection on malformed JSON
    "bad-input-values",  # 422 for ill-typed fields, 500 for NaN; stream: "false" read as false
    "stale-writer-gets-409",  # 400 instead of 409
    "upstream-abort-then-success",  # the abort and the 503 are passed to the agent
    "stream-fails-before-first-chunk",  # likewise, before any chunk
    "retry-of-a-lost-stream",  # the cut stream is a 502; the retry of a first turn is refused
    "rollback-then-engine-failure",  # the rewound turn is refused with 400
    "delete-between-engine-attempts",  # the 503 is passed to the agent: no retry to race
}
UNTESTED = {
    "delete-during-upstream-retry",  # the retry it races never happens: failures pass through
    # It buffers streams (a "fake stream"), so no mid-stream race can be set up:
    "delete-mid-stream",
    "delete-during-a-held-chunk",
    "client-disconnect-mid-stream",
    "upstream-cut-mid-stream",
    "concurrent-streaming-writers",
    "stream-cut-then-engine-recovers",
}
PASSING = {
    "client-disconnect-mid-proxy",
    "get-does-not-wait-for-a-turn",
    "sessions-are-independent",
    "streamed-tool-call-committed-whole",
}


async def run_against_third_party(nursery: trio.Nursery, *, strict: bool) -> SuiteResult:
    chaos = ChaosUpstream("sglang")
    await nursery.start(chaos.serve)
    assert chaos.url is not None
    url = await nursery.start(serve_third_party, chaos.url)
    settings = SuiteSettings(
        target_wait=0,
        flavor="sglang",
        concurrency=1,  # as run-scenarios does against an external target
        repeat=1,  # the verdicts, not their counts (the CLI test below runs them all)
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
    assert {n for n, v in verdicts.items() if v is Verdict.UNTESTED} == UNTESTED
    assert sorted(result.labels(Kind.SAFETY)) == sorted(PLANTED)
    for scenario in result.untested():
        assert scenario.untested_because is not None
        # The cause is what the server did: it buffered, or passed the failure on.
        assert (
            "buffered" in scenario.untested_because.actual
            or "passed through" in scenario.untested_because.actual
        ), scenario.untested_because
    conventions = result.labels(Kind.CONVENTION)
    assert "create answers 200, not 201 (declared in the profile)" in conventions
    assert "rejected requests answer 400, not 409 (declared in the profile)" in conventions
    assert "bad-input handling: 500 on bad-json" in conventions
    assert "an exact retry is refused (state unchanged)" in conventions
    assert "upstream failures are passed through, not retried (declared in the profile)" in (
        conventions
    )
    assert "bad-input handling: 500 on nan" in conventions
    assert 'stream: "false" is read as a boolean' in conventions
    assert result.exit_code == 1
    # No harness errors: the 500-and-close, the event stream and the missing
    # health route are findings about the server, not failures of the harness.
    assert all(not run.errors for s in result.scenarios for run in s.runs)


async def test_strict_turns_conventions_into_failures(nursery: trio.Nursery) -> None:
    result = await run_against_third_party(nursery, strict=True)
    verdicts = {s.name: s.verdict for s in result.scenarios}
    assert {n for n, v in verdicts.items() if v is Verdict.FAIL} == FAILING | NON_STRICT
    assert result.count(Verdict.NON_STRICT) == 0
    # An untested race stays UNTESTED (it has no finding to fail), and fails the run.
    assert {n for n, v in verdicts.items() if v is Verdict.UNTESTED} == UNTESTED
    assert result.exit_code == 1


async def test_the_readme_walkthrough_through_the_cli(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """README's "Validating your own server", step 4, as a user types it."""
    port = free_port()
    url = await nursery.start(serve_third_party, f"http://127.0.0.1:{port}/v1")
    reports = {kind: tmp_path / f"sessctl.{kind}" for kind in ("xml", "json", "md")}
    done = await trio.run_process(
        [sys.executable, "-m", "sessctl", "run-scenarios", "--target", url,
         "--upstream-listen", f"127.0.0.1:{port}", "--profile", "records-tool-400",
         "--flavor", "sglang",
         "--junit", str(reports["xml"]), "--json", str(reports["json"]),
         "--markdown", str(reports["md"])],
        capture_stdout=True, capture_stderr=True, check=False,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "120"},
    )  # fmt: skip
    out = done.stdout.decode()
    (tmp_path / "walkthrough.txt").write_text(out)
    print(out)  # README quotes this output (pytest -s shows it)
    assert done.returncode == 1, out + done.stderr.decode()
    assert "Traceback" not in out + done.stderr.decode()
    assert "NON-STRICT  bad-input-values  on " in out
    assert "FAIL  concurrent-writers-no-phantom  on " in out
    assert (
        f"{len(FAILING | NON_STRICT | PASSING | UNTESTED)} scenario results: "
        f"{len(PASSING)} passed, {len(NON_STRICT)} non-strict, {len(UNTESTED)} untested, "
        f"{len(FAILING)} failed, 0 errors"
    ) in out
    assert f"{len(UNTESTED)} not tested (the race was never placed" in out
    summary = json.loads(reports["json"].read_text())["summary"]
    assert summary["non_strict"] == len(NON_STRICT)
    assert {entry["scenario"] for entry in summary["not_tested"]} == UNTESTED
    assert sorted(summary["safety_failures"]) == sorted(PLANTED)
    suites = ET.parse(reports["xml"]).getroot()
    assert int(suites.get("failures") or suites[0].get("failures") or 0) == len(FAILING)
    assert int(suites[0].get("skipped") or 0) == len(UNTESTED)
    assert "bad-input-values" in reports["md"].read_text()
    nursery.cancel_scope.cancel()


async def test_a_connection_dropped_after_a_500_costs_one_resend_not_an_error(
    nursery: trio.Nursery,
) -> None:
    chaos = ChaosUpstream("sglang")
    await nursery.start(chaos.serve)
    assert chaos.url is not None
    url = await nursery.start(serve_third_party, chaos.url)
    client = TargetClient(url, request_timeout=5.0, health_path="/health")
    created = await client.send("s1", "create", "POST", "/sessions")
    session_id = created.body["session_id"]
    # Malformed JSON on a kept-alive connection: a 500, and the worker is gone.
    broken = await client.send(
        "bad", "request", "POST", f"/sessions/{session_id}/v1/chat/completions", raw_body=b"{"
    )
    after = await client.send("g1", "get", "GET", f"/sessions/{session_id}")
    await client.aclose()
    assert broken.status == 500
    assert after.status == 200
    assert after.retried_after is not None  # the dropped connection, then a fresh one
    nursery.cancel_scope.cancel()


async def test_profile_check_through_the_cli_writes_the_profile_that_fits(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """README's step 3, as a user types it: the suggested profile is the one that
    step 4 then runs with."""
    port = free_port()
    url = await nursery.start(serve_third_party, f"http://127.0.0.1:{port}/v1")
    written = tmp_path / "my-server.yaml"
    done = await trio.run_process(
        [sys.executable, "-m", "sessctl", "profile", "check", "--target", url,
         "--upstream-listen", f"127.0.0.1:{port}", "--flavor", "sglang",
         "--output", str(written)],
        capture_stdout=True, capture_stderr=True, check=False,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "120"},
    )  # fmt: skip
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "note: an upstream 503 was passed to the agent" in out
    suggested = load_profile(str(written))
    expected = load_profile("records-tool-400")
    assert suggested.model_dump(exclude={"name", "description"}) == expected.model_dump(
        exclude={"name", "description"}
    )
    nursery.cancel_scope.cancel()
