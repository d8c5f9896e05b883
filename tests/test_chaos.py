"""Chaos mode end to end: the clean server's history is valid; a split lock is found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import trio.testing
import yaml

from harness.chaos.shrink import ShrinkSettings
from harness.chaos.workload import ChaosSettings, run_chaos
from harness.errors import ScenarioFileError


def sessctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``sessctl ARGS`` in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sessctl", *args], capture_output=True, text=True, timeout=timeout
    )


async def test_the_reference_server_gives_a_valid_history() -> None:
    # Any finding here is a real bug in the reference server or the checker.
    # 2,400 operations: enough that the rarer outcomes below are there under
    # any load (800 saw about 6 cancelled calls, and once, on a busy CI run, none).
    report = await run_chaos(ChaosSettings(seed=3, ops=2400))
    assert report.result.verdict == "valid", report.result.findings[:3]
    assert len(report.history) == 2400
    ops = {op.op for op in report.history}
    assert ops == {"create", "chat", "get", "delete"}
    assert any(op.unknown for op in report.history)  # hang-ups are in the mix
    assert any(e.kind == "cancelled" for op in report.history for e in op.upstream)


async def test_a_split_lock_server_is_caught() -> None:
    report = await run_chaos(ChaosSettings(seed=1, ops=3000), emulate="split-lock")
    assert report.result.verdict == "invalid"
    kinds = {f.kind for f in report.result.findings}
    assert "linearizability" in kinds


async def test_a_seed_always_makes_the_same_plan() -> None:
    first = await run_chaos(ChaosSettings(seed=5, ops=300))
    second = await run_chaos(ChaosSettings(seed=5, ops=300))
    other = await run_chaos(ChaosSettings(seed=6, ops=300))
    assert first.plans == second.plans
    assert first.plans != other.plans
    assert [len(plan) for plan in first.plans] == [19] * 12 + [18] * 4  # 300 over 16 clients


def test_sessctl_chaos_saves_a_history_that_sessctl_check_agrees_with(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = sessctl(
        "chaos", "--ops", "300", "--emulate", "autocreate-after-delete", "--out", str(out)
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "INVALID" in done.stdout
    rechecked = sessctl("check", str(out / "history.jsonl"))
    assert rechecked.returncode == 1
    assert (out / "report.json").read_text().startswith("{")
    # The failure was shrunk to a scenario that replays it, and the command was printed.
    (scenario,) = out.glob("chaos-seed1-*.yaml")
    replay = f"sessctl run-scenarios {scenario} --emulate autocreate-after-delete"
    assert f"replay: {replay}" in " ".join(done.stdout.split())
    report = json.loads((out / "report.json").read_text())
    assert report["shrunk"]["file"] == str(scenario)
    # The run's own figures, the harness's lag among them (what its patience did not count).
    run = report["run"]
    assert run["seconds"] > 0
    assert f"({run['operations_per_second']:.0f} ops/s)" in done.stdout
    assert 0 <= run["harness_lag_seconds"] < run["seconds"]
    replayed = sessctl(*replay.split()[1:])
    assert replayed.returncode == 1, replayed.stdout
    assert "FAIL" in replayed.stdout
    # The scenario names the race its steps show, which the replay's summary confirms.
    written = yaml.safe_load(scenario.read_text())
    assert f"safety failure ({written['property']}" in " ".join(replayed.stdout.split())
    assert f"shows: {written['property']}" in " ".join(written["description"].split())
    assert sessctl("run-scenarios", str(scenario)).returncode == 0  # the reference passes it
    bad = sessctl("chaos", "--faults", "meteor")
    assert bad.returncode == 2
    assert "unknown fault 'meteor'" in bad.stderr


def test_unreachable_targets_and_bad_options_are_clear_errors() -> None:
    dead = ["--target", "http://127.0.0.1:9", "--upstream-listen", "127.0.0.1:0"]
    for args in (["chaos", "--ops", "20", *dead], ["profile", "check", *dead]):
        done = sessctl(*args, timeout=60)
        # Not "VALID, 0 operations", and not a traceback from inside a nursery.
        assert done.returncode == 3, args
        assert "is unreachable" in done.stderr, args
        assert "Traceback" not in done.stderr + done.stdout, args
        assert "listening on http://127.0.0.1:0/" not in done.stdout, args  # the bound port
    bad = sessctl("chaos", "--duration", "-1", timeout=60)
    assert bad.returncode == 2
    assert "--duration must be a positive number" in bad.stderr


def test_an_output_path_that_cannot_be_written_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", "chaos", "--ops", "20", "--out", str(blocker / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"cannot write {blocker / 'run'}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_streamed_chats_of_the_reference_server_give_a_valid_history() -> None:
    report = await run_chaos(ChaosSettings(seed=3, ops=2400, stream_ratio=0.5))
    assert report.result.verdict == "valid", report.result.findings[:3]
    ends = {op.stream.split(":")[0] for op in report.history if op.stream is not None}
    assert {"done", "error"} <= ends  # streams completed, and were cut or preempted
    assert any(op.stream == "done" and op.assembled == op.answer for op in report.history)
    scripts = [json.dumps(op.script) for op in report.history if op.stream is not None]
    assert any("_after" in script for script in scripts)  # faults after a chunk


def test_a_server_that_commits_a_cut_stream_is_caught_and_shrunk(tmp_path: Path) -> None:
    # Which finding shrinks depends on the run's timing: a finding whose window
    # holds cannot force is reported unshrunk (seen in about one run in five here),
    # so the next seed is tried for the scenario. A run may also miss the bug: of
    # about 85 scripted cuts in 3,000 operations, about 10 end a stream with an
    # upstream error, and one run in about 44 (four side by side) showed none of
    # those committed. One miss is allowed, never two.
    written: list[Path] = []
    runs = ""
    misses = 0
    for seed in ("1", "2", "3", "4"):
        out = tmp_path / f"run{seed}"
        done = sessctl(
            "chaos", "--ops", "3000", "--stream-ratio", "0.5", "--seed", seed,
            "--emulate", "commit-partial-stream", "--out", str(out),
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stdout + done.stderr
        runs += done.stdout
        misses += done.returncode == 0
        assert misses <= 1, runs
        written = list(out.glob(f"chaos-seed{seed}-*.yaml"))
        if written:
            break
    assert len(written) == 1, runs  # shrunk, and confirmed 5/5 and 5/5 by then
    (scenario,) = written
    assert "stream: true" in scenario.read_text()
    on_variant = sessctl("run-scenarios", str(scenario), "--emulate", "commit-partial-stream")
    on_reference = sessctl("run-scenarios", str(scenario))
    assert (on_variant.returncode, on_reference.returncode) == (1, 0), (
        runs + on_variant.stdout + on_reference.stdout
    )
    assert sessctl("chaos", "--stream-ratio", "1.5").returncode == 2


async def test_chaos_answers_with_tool_calls_and_recovers_after_cuts() -> None:
    """What exploration found chaos never did: tool-call answers, and a reset (a cut
    mid-stream included) followed by a whole answer; the clean server stays valid."""
    from harness.chaos.workload import ChaosSettings, run_chaos

    settings = ChaosSettings(seed=5, ops=600, stream_ratio=0.5, fault_rate=0.6)
    report = await run_chaos(settings)
    assert report.result.verdict == "valid", report.result.findings[:1]
    scripts = [op.script for op in report.history if op.op == "chat" and op.script]
    assert any(isinstance(s[-1], dict) and s[-1].get("tool_call") for s in scripts)
    recovering = [s for s in scripts if (len(s) == 2 and s[0] == "reset") or (
        isinstance(s[0], dict) and "reset_after" in s[0] and len(s) == 2)]  # fmt: skip
    assert recovering, "no reset followed by an answer"
    assert any(isinstance(s[0], dict) for s in recovering), "no cut mid-stream then an answer"
    # Some DELETEs went to a session with a held turn and a chat in flight.
    assert any(op.to_busy_session is not None for plan in report.plans for op in plan)


async def test_a_delete_that_waits_for_the_engine_is_caught() -> None:
    # Patience is counted from when the DELETE left, on a clock that slows when
    # the harness lags: a server whose DELETE waits is still caught. A later DELETE
    # of the same session (404, it is closing) must not hide the one outwaited: when
    # it did, this seed found nothing in about one run in five.
    report = await run_chaos(ChaosSettings(seed=1, ops=2000), emulate="delete-waits")
    assert report.result.verdict == "invalid"
    assert {f.kind for f in report.result.findings} == {"delete-waits"}
    finding = next(f for f in report.result.findings if f.kind == "delete-waits")
    assert "2 s after the DELETE was sent it still had no answer" in finding.explanation


async def test_a_server_that_runs_on_a_stream_its_client_left_is_caught_mid_stream() -> None:
    # commit-abandoned-stream reads a stream to its end after its client hung up.
    # Chaos caught it in about 4 runs in 10 of 10 s: its hang-ups came on a timer,
    # seldom while a streamed call was held, and a DELETE of the session (half go
    # to a session with a held call) then ended the call before the 2 s of patience
    # were up. A streamed hang-up now comes after the chunk its hold comes after,
    # the hold lasts until the client has hung up, and DELETEs of the session wait
    # until the hang-up is judged.
    from harness.chaos.workload import Fault

    def settings(seed: int) -> ChaosSettings:
        held = frozenset({Fault.HOLD, Fault.DISCONNECT})
        return ChaosSettings(seed=seed, ops=600, sessions=16, stream_ratio=1.0, faults=held)

    # Whether a planned hang-up gets to stream at all depends on the run (most chats
    # of a busy session are refused 409): a run has 0 to 7 held mid-stream hang-ups,
    # about one in twelve none, and on a loaded machine a run may judge no hang-up
    # at all. Up to four seeds, until one is caught mid-stream.
    mid_stream = []
    for seed in (1, 2, 3, 4):
        report = await run_chaos(settings(seed), emulate="commit-abandoned-stream")
        assert {f.kind for f in report.result.findings} <= {"hangup-ignored"}
        mid_stream = [
            f for f in report.result.findings if any(op.stream == "hung up" for op in f.window)
        ]
        if mid_stream:
            break
    assert mid_stream, "no hang-up after a chunk was judged"
    clean = await run_chaos(settings(1))
    assert clean.result.verdict == "valid", clean.result.findings[:3]
    # Hung up after a chunk: an unknown outcome (a hang-up while the rest of an
    # unheld stream flows may be too late to stop it, so nothing more is asked).
    hung_up = [op for op in clean.history if op.stream == "hung up"]
    assert hung_up
    assert all(op.unknown and op.status is None for op in hung_up)


async def test_a_server_that_answers_with_an_aborted_completion_is_caught() -> None:
    # The contract retries an aborted completion (finish_reason "abort": SGLang's
    # answer while it updates weights) and never answers with it. commit-aborted does;
    # in statuses alone that is a plain 200, so chaos missed it. The history now
    # records, for a 200 whose answer the engine gave on no successful attempt, the
    # answers it did give, and the checker (sessctl check too) names it.
    from harness.chaos.history import operation_from_json
    from harness.chaos.linearizability import check_history
    from harness.chaos.workload import Fault

    settings = ChaosSettings(seed=1, ops=400, faults=frozenset({Fault.ABORT}))
    report = await run_chaos(settings, emulate="commit-aborted")
    assert report.result.verdict == "invalid"
    assert {f.kind for f in report.result.findings} == {"answer-not-from-engine"}
    assert "which the engine never answered on a successful attempt (no attempt succeeded" in (
        report.result.findings[0].explanation
    )
    saved = [operation_from_json(json.loads(json.dumps(op.to_json()))) for op in report.history]
    assert check_history(saved).findings == report.result.findings
    clean = await run_chaos(settings)
    assert clean.result.verdict == "valid", clean.result.findings[:3]
    assert not any(op.engine_answers is not None for op in clean.history)


async def test_three_hundred_clients_raise_no_false_alarm() -> None:
    # Hundreds of clients in one trio loop make every request wait its turn in
    # the harness: a DELETE answered at once is read seconds later. Before the
    # patience counted from a request's departure on the harness's own clock,
    # this size gave false delete-waits findings beside busy loops.
    settings = ChaosSettings(seed=2, ops=1800, clients=300, sessions=300, stream_ratio=0.3)
    report = await run_chaos(settings)
    assert report.result.verdict == "valid", report.result.findings[:3]
    assert any(op.op == "delete" for op in report.history)
    # Each operation's invocation is when its bytes left, never before it started.
    assert all(op.invoke >= 0 for op in report.history)


async def test_a_run_that_ends_on_its_deadline_loses_no_operation_in_flight() -> None:
    # At the deadline the clients start nothing new and finish what they sent. Cut
    # off instead, a DELETE or a chat in flight went missing from the history while
    # the server had acted on it: a 409 or a 410 that "fits nowhere" (1,000 clients).
    settings = ChaosSettings(
        seed=3, ops=None, duration=0.5, clients=60, sessions=60, stream_ratio=0.3
    )
    report = await run_chaos(settings)
    assert report.result.verdict == "valid", report.result.findings[:3]
    # Every ticket a client took is an operation of the history: none was dropped.
    tickets = sorted(op.id for op in report.history)
    assert tickets == list(range(1, len(tickets) + 1))
    assert len(tickets) > 60


async def test_a_delete_waits_while_a_hang_up_on_its_session_is_judged(
    nursery: trio.Nursery,
) -> None:
    # The gate the mid-stream test above relies on, without a server: a DELETE of a
    # session whose held call is waiting for its client to hang up is not sent until
    # that hang-up is judged (here: at once, since no call is in flight).
    from harness.chaos.workload import ChaosRun
    from harness.results import Observation
    from harness.run.client import TargetClient
    from harness.upstream.chaos_upstream import ChaosUpstream

    client = TargetClient("http://127.0.0.1:9", request_timeout=1.0)  # never sent to
    run = ChaosRun(client, ChaosUpstream(), ChaosSettings())
    run._nursery = nursery
    nursery.start_soon(run.clock.run)
    sent: list[str] = []

    async def end(step: str, session: str, *, on_sent: Any = None) -> Observation:
        sent.append(session)
        now = trio.current_time()
        return Observation("chaos", "delete", None, 204, now, now)

    run.lifecycle.end = end  # type: ignore[method-assign]
    client_done = trio.Event()
    run._release_later("chaos.1", "s", 1, 0.0, client_done)
    nursery.start_soon(run._delete, run.clients[0], run._slots[0], "s", 2)
    nursery.start_soon(run._delete, run.clients[1], run._slots[1], "other", 3)
    await trio.testing.wait_all_tasks_blocked()
    assert sent == ["other"]  # another session's DELETE is not held up
    client_done.set()  # the client hung up (or had its answer)
    await trio.testing.wait_all_tasks_blocked()
    assert sent == ["other", "s"]
    assert run._hang_ups_judged == {}
    await client.aclose()


async def test_at_the_runs_end_a_deleted_sessions_held_call_still_gets_its_patience(
    nursery: trio.Nursery,
) -> None:
    # When the clients were done, every hold used to be released at once. A server
    # slow (under load) to hang up on a deleted session's call then had its engine
    # answer: a false llm-leak. Now a hold waiting for its random moment lets go at
    # once, but one waiting for the server to act still waits, on the same patience.
    from harness.chaos.workload import ChaosRun
    from harness.run.client import TargetClient
    from harness.upstream.chaos_upstream import ChaosUpstream
    from harness.upstream.script import EventKind, parse_behaviour

    upstream = ChaosUpstream()
    client = TargetClient("http://127.0.0.1:9", request_timeout=1.0)  # never sent to
    run = ChaosRun(client, upstream, ChaosSettings())
    run._nursery = nursery
    nursery.start_soon(run.clock.run)
    hold = parse_behaviour("hold")
    upstream._record("chaos.1", EventKind.RECEIVED, 1, hold)  # held at the engine
    upstream._record("chaos.2", EventKind.RECEIVED, 1, hold)
    run._deleted.add("s")  # the DELETE of chaos.1's session was answered 204
    run._release_later("chaos.1", "s", 1, 60.0)
    run._release_later("chaos.2", "t", 2, 60.0)
    run._ending.set()  # the clients are done
    await trio.testing.wait_all_tasks_blocked()
    assert upstream._release_event("chaos.2").is_set()  # nothing to wait for
    assert not upstream._release_event("chaos.1").is_set()  # the server still has to act
    upstream._record("chaos.1", EventKind.CANCELLED, 1, hold)  # it hangs up on the call
    await trio.testing.wait_all_tasks_blocked()
    assert upstream._release_event("chaos.1").is_set()
    await client.aclose()


def test_the_cli_reports_an_aborted_answer_and_a_mid_stream_hang_up(tmp_path: Path) -> None:
    # The two findings this change added, as a user meets them: the rendered report,
    # the saved history, and `sessctl check` of that history.
    out = tmp_path / "aborted"
    done = sessctl(
        "chaos", "--ops", "400", "--faults", "abort", "--emulate", "commit-aborted",
        "--no-shrink", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    shown = " ".join(done.stdout.split())
    assert "answer-not-from-engine" in shown
    assert "which the engine never answered on a successful attempt (no attempt succeeded" in shown
    assert '"engine_answers":[]' in (out / "history.jsonl").read_text()
    rechecked = sessctl("check", str(out / "history.jsonl"))
    assert rechecked.returncode == 1
    assert "answer-not-from-engine" in rechecked.stdout
    out = tmp_path / "abandoned"
    done = sessctl(
        "chaos", "--ops", "600", "--sessions", "16", "--stream-ratio", "1",
        "--faults", "hold,disconnect", "--emulate", "commit-abandoned-stream",
        "--no-shrink", "--out", str(out), "--seed", "4",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hangup-ignored" in done.stdout
    assert '"stream":"hung up"' in (out / "history.jsonl").read_text()


def test_sessctl_chaos_and_run_chaos_have_the_same_defaults() -> None:
    # Written twice, since the CLI shows its defaults without importing the harness:
    # one changed without the other (16 clients on 8 sessions, once 8 on 4) would make
    # `sessctl chaos` run another workload than the library and the benchmarks.
    import inspect

    from harness.chaos.workload import Fault
    from sessctl.cli import chaos_command

    cli = {name: p.default for name, p in inspect.signature(chaos_command).parameters.items()}
    library = ChaosSettings()
    names = ("seed", "ops", "duration", "clients", "sessions", "stream_ratio", "request_timeout")
    for name in (*names, "target_wait"):
        assert cli[name] == getattr(library, name), name
    assert {Fault(f) for f in cli["faults"].split(",")} == set(library.faults)


async def test_a_scenario_the_shrinker_cannot_read_leaves_the_verdict_and_the_history(
    monkeypatch: Any,
) -> None:
    """A shrinker bug (CI once had one: "'c176' is not an earlier step") must not
    turn a found failure into an error that loses the run: the verdict and the
    history stand, and the report says why there is no scenario."""

    def refuse(text: str, source: str) -> Any:
        raise ScenarioFileError(source, 14, 12, "'c176' is not an earlier step")

    monkeypatch.setattr("harness.chaos.shrink.parse_scenario", refuse)
    report = await run_chaos(
        ChaosSettings(seed=1, ops=300),
        emulate="autocreate-after-delete",
        shrink_settings=ShrinkSettings(),
    )
    assert report.result.verdict == "invalid"
    assert len(report.history) == 300
    assert report.shrunk is None
    assert not report.shrink_attempted
    assert report.shrink_skipped is not None
    assert "could not read" in report.shrink_skipped
    assert "'c176' is not an earlier step" in report.shrink_skipped
