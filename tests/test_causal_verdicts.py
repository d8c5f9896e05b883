"""Verdicts that name what broke, through the CLI, on a server with the seed's shape.

``tests/lockstep_server.py`` holds its lock across the engine call, so none of
the library's races can fail on it; its breakage is elsewhere (a first chat
refused, garbage committed, a malformed answer). Each must be reported by its
cause: a race whose setup was refused is UNTESTED with the server's answer
quoted, a malformed answer is a server fault, garbage is judged, never a crash.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import trio

from .conftest import free_port, sessctl_cli
from .lockstep_server import Faults, serve_lockstep


async def run_cli_against(
    nursery: trio.Nursery, tmp_path: Path, faults: Faults, *extra: str
) -> tuple[int, str, dict[str, Any], ET.Element]:
    """``sessctl run-scenarios`` against the lockstep server as a user runs it: the
    exit status, the terminal report, and the JSON and JUnit files it wrote."""
    port = free_port()
    url = await nursery.start(serve_lockstep, f"http://127.0.0.1:{port}/v1", faults)
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    code, out = await sessctl_cli(
        "run-scenarios", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", "records-tool-400", "--flavor", "sglang",
        "--json", str(report), "--junit", str(junit), *extra,
    )  # fmt: skip
    assert "Traceback" not in out, out
    assert "internal error" not in out, out
    return code, out, json.loads(report.read_text()), ET.parse(junit).getroot()


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["verdict"] for s in report["scenarios"]}


async def test_a_refused_first_chat_leaves_races_untested_not_failed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    faults = Faults(first_chat_fails=True, refuse_null_tool_content=False)
    code, out, report, junit = await run_cli_against(nursery, tmp_path, faults)
    seen = verdicts(report)
    assert "fail" not in seen.values(), out
    assert "error" not in seen.values(), out
    untested = {name for name, verdict in seen.items() if verdict == "untested"}
    # Every scenario that chats starts with the refused chat.
    assert {"delete-mid-proxy", "concurrent-writers-no-phantom", "delete-mid-stream"} <= untested
    assert {"double-delete-sequential", "upstream-abort-then-success"} <= untested
    for entry in report["summary"]["not_tested"]:
        # The server's own words: its warm-up refusal, or its refusal to stream.
        quoted = ("engine warm-up failed for this session", "stream: true is not supported")
        assert any(words in entry["because"]["actual"] for words in quoted), entry
    assert report["summary"]["safety_failures"] == []
    assert code == 0, out  # not a failure of the run, unless --strict
    assert f"{len(untested)} not tested (the race was never placed" in out
    assert "not tested: the race was never placed, so 'delete-mid-proxy'" in out
    skipped = [case for case in junit.iter("testcase") if case.find("skipped") is not None]
    assert len(skipped) == len(untested)
    for case in skipped:
        message = case.find("skipped").get("message") or ""  # type: ignore[union-attr]
        assert message.startswith("not tested: "), message
        assert any(words in message for words in quoted), message
    nursery.cancel_scope.cancel()


async def test_strict_makes_an_untested_race_fail_the_run(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    faults = Faults(first_chat_fails=True, refuse_null_tool_content=False)
    code, out, report, _ = await run_cli_against(
        nursery, tmp_path, faults, "--strict", "--filter", "delete-mid-proxy"
    )
    assert verdicts(report) == {"delete-mid-proxy": "untested"}
    assert code == 1, out
    nursery.cancel_scope.cancel()


async def test_a_refused_tool_call_with_null_content_is_quoted_as_the_cause(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The seed's server refuses SGLang's ``content: null`` tool calls: each race
    that needed a turn answered says so, with the server's own words."""
    code, out, report, _ = await run_cli_against(
        nursery, tmp_path, Faults(), "--filter", "double-delete-sequential,delete-mid-proxy"
    )
    assert verdicts(report) == {
        "double-delete-sequential": "untested",
        # Its turn is held at the engine and never answered: the race runs.
        "delete-mid-proxy": "non-strict",
    }, out
    assert "assistant message content is None" in out
    assert code == 0
    nursery.cancel_scope.cancel()


async def test_garbage_committed_is_judged_and_the_reports_are_written(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    faults = Faults(commits_garbage=True, refuse_null_tool_content=False)
    code, out, report, _ = await run_cli_against(
        nursery, tmp_path, faults, "--filter", "get-does-not-wait-for-a-turn"
    )
    # What it committed for c1's user message is not what was sent: judged, by cause.
    assert verdicts(report) == {"get-does-not-wait-for-a-turn": "fail"}, out
    assert report["summary"]["safety_failures"] == ["committed turn altered"]
    assert """message 0 was committed as {"role": ["user"]""" in out
    assert code == 1
    nursery.cancel_scope.cancel()


async def test_a_malformed_answer_is_a_server_fault_not_an_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    faults = Faults(content_length_bug=True, refuse_null_tool_content=False)
    code, out, report, _ = await run_cli_against(
        nursery, tmp_path, faults, "--filter", "double-delete-sequential"
    )
    assert verdicts(report) == {"double-delete-sequential": "fail"}, out
    assert report["summary"]["errors"] == 0
    assert report["summary"]["server_faults"] == ["server fault: malformed HTTP answer"]
    assert "RemoteProtocolError" in out
    assert code == 1
    nursery.cancel_scope.cancel()


async def profile_check_against(
    nursery: trio.Nursery, tmp_path: Path, faults: Faults
) -> tuple[int, str, Path, str, int]:
    """``sessctl profile check`` as a user runs it: exit status, output, the file."""
    port = free_port()
    url = await nursery.start(serve_lockstep, f"http://127.0.0.1:{port}/v1", faults)
    written = tmp_path / "mine.yaml"
    code, out = await sessctl_cli(
        "profile", "check", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--flavor", "sglang", "--output", str(written),
    )  # fmt: skip
    assert "Traceback" not in out, out
    return code, out, written, url, port


async def test_profile_check_finds_the_tool_call_content_a_server_needs(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The seed's server refuses SGLang's content: null tool calls: the probe tries
    content "" and writes it in the profile, which then makes its races testable."""
    code, out, written, url, port = await profile_check_against(nursery, tmp_path, Faults())
    assert code == 0, out
    text = written.read_text()
    assert "tool_call_content: empty" in text
    assert text.startswith("# note: ")
    assert "a tool call with content: null was refused (502" in text
    assert "assistant message content is None" in text  # the server's words, quoted
    _, report = await sessctl_cli(
        "run-scenarios", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--flavor", "sglang", "--profile", str(written),
        "--filter", "double-delete-sequential,exact-retry-replays",
    )  # fmt: skip
    assert "UNTESTED" not in report, report
    assert "0 untested, 0 failed, 0 errors" in report, report
    nursery.cancel_scope.cancel()


async def test_profile_check_writes_a_partial_profile_when_a_probe_fails(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    faults = Faults(refuse_tool_calls=True)
    code, out, written, _, _ = await profile_check_against(nursery, tmp_path, faults)
    assert code == 1, out  # partial: written, and said so
    assert "partial: 1 part(s) of the profile could not be probed" in out
    text = written.read_text()
    assert "# not probed (the reference's value is kept): what may follow an assistant turn" in text
    assert "tool calls are not supported by this deployment" in text
    assert "streaming: unsupported" in text  # the probes after the failed one still ran
    nursery.cancel_scope.cancel()


async def test_a_rollback_applied_before_the_engine_call_is_caught_by_its_cause(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The defect missed in the field: a rewind that fails at the engine loses the
    turn it was to replace, one already answered 200."""
    faults = Faults(rollback_before_engine=True, refuse_null_tool_content=False)
    code, out, report, _ = await run_cli_against(
        nursery, tmp_path, faults, "--filter", "rollback-then-engine-failure"
    )
    assert verdicts(report) == {"rollback-then-engine-failure": "fail"}, out
    assert report["summary"]["safety_failures"] == ["a failed rollback lost a committed turn"]
    assert code == 1
    nursery.cancel_scope.cancel()


async def test_the_same_server_without_the_defect_passes_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    faults = Faults(refuse_null_tool_content=False)
    code, out, report, _ = await run_cli_against(
        nursery, tmp_path, faults, "--filter", "rollback-then-engine-failure"
    )
    assert verdicts(report) == {"rollback-then-engine-failure": "non-strict"}, out  # 400 for 409
    assert code == 0
    nursery.cancel_scope.cancel()


async def test_chaos_that_proves_nothing_quotes_what_the_server_answered(
    nursery: trio.Nursery,
) -> None:
    """Every chat of the workload offers a tool, and this server refuses the engine's
    content: null tool calls: the run gives up, quoting the refusal."""
    port = free_port()
    url = await nursery.start(serve_lockstep, f"http://127.0.0.1:{port}/v1", Faults())
    code, out = await sessctl_cli(
        "chaos", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", "records-tool-400", "--flavor", "sglang", "--ops", "60", "--no-shrink",
    )  # fmt: skip
    assert code == 3, out
    assert "such a history proves nothing; the chats were answered: 502" in out
    assert "assistant message content is None" in out
    nursery.cancel_scope.cancel()


async def test_a_body_that_blocks_the_server_is_a_fault_of_the_server(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Seen on the seed's server: a 9 MiB body blocked its event loop, and that
    request and the next got no answer. A finding about the server, naming the
    request before it, never an ERROR (sessctl ran fine). The server runs in this
    process and sessctl in its own, so only the server is blocked: 4 s of it
    against sessctl's 1 s request timeout."""
    faults = Faults(big_body_blocks=4.0, refuse_null_tool_content=False)
    code, out, report, junit = await run_cli_against(
        nursery, tmp_path, faults, "--filter", "bad-input", "--request-timeout", "1"
    )
    assert verdicts(report) == {"bad-input": "fail"}, out
    assert report["summary"]["errors"] == 0
    assert (
        "server fault: no answer within the request timeout" in report["summary"]["server_faults"]
    )
    assert "too-large: expected an HTTP answer from a server that is up" in out
    assert "no answer within 1 s to a 9437184-byte body" in out
    assert "the request before it was too-large (POST" in out  # the next one names it
    assert "a 9437184-byte body" in out
    assert junit.find(".//error") is None
    assert code == 1
    nursery.cancel_scope.cancel()


def test_each_kind_of_missing_answer_is_named() -> None:
    from harness.results import Kind, Observation, SentRequest
    from harness.run.checks import server_fault

    sent = SentRequest.of("POST", "http://x/sessions/s/v1/chat/completions", {"m": 1}, None)
    before = Observation("c1", "chat", sent, 200, 0.0, 1.0)
    reasons = {
        "no answer within 10 s": "server fault: no answer within the request timeout",
        "RemoteProtocolError: received 82 bytes, expected 86": (
            "server fault: malformed HTTP answer"
        ),
        "ReadError: [Errno 104] Connection reset by peer": (
            "server fault: connection reset or closed without an answer"
        ),
    }
    for reason, label in reasons.items():
        missing = Observation("c2", "chat", sent, None, 2.0, 3.0, transport_error=reason)
        finding = server_fault(missing, {"c1": before, "c2": missing})
        assert finding.kind is Kind.FAULT
        assert finding.label == label
        assert finding.actual.startswith(reason)
        assert "the request before it was c1 (POST http://x/sessions/s" in finding.actual
