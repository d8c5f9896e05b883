"""A server shaped like AReaL's proxy, raced with no adapter: ``--profile areal-proxy``,
the admin key in ``AREAL_ADMIN_KEY``, and the chaos upstream on SGLang's native
``/generate`` (``--flavor sglang-generate``).

``tests/areal_server.py`` grants capacity and starts sessions with an admin key,
takes chats at its root with a per-session API key, ends sessions at
``rl/end_session``, exports (once) at ``export_trajectories``, records every call,
and calls ``/generate`` with the prompt tokenized by the tokenizer sessctl ships
(or as text). Through the CLI: the clean build gets no FAIL and no ERROR with
either engine input; each planted defect FAILs, labelled by its cause; the admin
key never reaches a report.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import trio

from refserver.server import serve_asgi

from .areal_server import create_areal_app
from .conftest import free_port, sessctl_cli

ADMIN_KEY = "admin-key-for-the-test-9f3a"
ENV = {"AREAL_ADMIN_KEY": ADMIN_KEY}


async def start(
    nursery: trio.Nursery, *, defects: frozenset[str], engine_input: str = "ids"
) -> tuple[str, int]:
    port = free_port()
    app = create_areal_app(
        f"http://127.0.0.1:{port}",
        admin_key=ADMIN_KEY,
        engine_input=engine_input,
        defects=defects,
    )
    url: str = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
    return url, port


def args(url: str, port: int, *more: str) -> list[str]:
    return [
        "run-scenarios", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", "areal-proxy", "--flavor", "sglang-generate", *more,
    ]  # fmt: skip


@pytest.mark.parametrize("engine_input", ["ids", "text"])
async def test_the_clean_build_gets_no_fail_and_no_error(
    nursery: trio.Nursery, tmp_path: Path, engine_input: str
) -> None:
    url, port = await start(nursery, defects=frozenset(), engine_input=engine_input)
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    code, out = await sessctl_cli(
        *args(url, port, "--json", str(report), "--junit", str(junit)), env=ENV
    )
    assert code == 0, out
    document = json.loads(report.read_text())
    assert document["summary"]["failed"] == 0, out
    assert document["summary"]["errors"] == 0, out
    verdicts = {s["name"]: s["verdict"] for s in document["scenarios"]}
    # The races a log server with an export can be raced on were judged, not skipped.
    for name in ("delete-mid-proxy", "delete-between-engine-attempts", "chat-and-get-after-delete"):
        assert verdicts[name] in ("pass", "non-strict"), (name, out)
    # A scenario only a read before the end observes cannot be judged on an export.
    assert verdicts["rapid-create-chat-delete-cycles"] == "untested"
    assert "the read is an export" in out
    assert "native calls go to" in out
    assert "/generate" in out
    # The admin key is sent, never shown: reports say where it comes from.
    for text in (out, report.read_text(), junit.read_text()):
        assert ADMIN_KEY not in text
    assert '"authorization: Bearer $AREAL_ADMIN_KEY"' in out


@pytest.mark.parametrize(
    ("defect", "scenario", "label", "follows"),
    [
        # The end does not stop the turn in flight: it answers 200 once the
        # engine does, after the export, which therefore lacks it.
        ("end_does_not_stop", "delete-mid-proxy", "in-flight turn not preempted", "phantom commit"),
        # An engine failure retried after the end: a call no one will stop.
        ("retry_after_end", "delete-between-engine-attempts", "engine call after DELETE", None),
        # A chat between the end and the export, accepted and recorded.
        ("chat_after_end", "chat-and-get-after-delete", "success after DELETE", None),
    ],
)
async def test_each_planted_defect_fails_labelled_by_its_cause(
    nursery: trio.Nursery,
    tmp_path: Path,
    defect: str,
    scenario: str,
    label: str,
    follows: str | None,
) -> None:
    url, port = await start(nursery, defects=frozenset({defect}))
    report = tmp_path / "report.json"
    code, out = await sessctl_cli(
        *args(url, port, "--filter", scenario, "--json", str(report)), env=ENV
    )
    assert code == 1, out
    assert "Traceback" not in out
    (result,) = json.loads(report.read_text())["scenarios"]
    assert result["verdict"] == "fail", out
    failures = [f for run in result["runs"] for f in run["failures"]]
    assert label in {f["label"] for f in failures}, out
    if follows is not None:
        assert follows in {f["label"] for f in failures if f.get("follows")}, out


async def test_without_the_admin_key_it_says_which_variable_and_runs_nothing(
    nursery: trio.Nursery,
) -> None:
    url, port = await start(nursery, defects=frozenset())
    code, out = await sessctl_cli(*args(url, port))
    assert code == 2, out
    assert "AREAL_ADMIN_KEY" in out
    assert "not set" in out
    assert "Traceback" not in out


async def test_a_wrong_admin_key_is_a_target_that_cannot_be_raced(
    nursery: trio.Nursery,
) -> None:
    url, port = await start(nursery, defects=frozenset())
    code, out = await sessctl_cli(*args(url, port), env={"AREAL_ADMIN_KEY": "wrong"})
    assert code == 3, out
    assert "POST /grant_capacity" in out
    assert "403" in out
    assert "wrong" not in out.replace("is the admin key right", "")


async def test_chaos_says_it_cannot_judge_a_log_and_points_to_the_scenarios() -> None:
    code, out = await sessctl_cli("chaos", "--profile", "areal-proxy", "--ops", "10", env=ENV)
    assert code == 2, out
    assert "run-scenarios" in out
    assert "Traceback" not in out


async def test_profile_check_recognises_the_shape_and_its_suggestion_runs_once_the_key_is_set(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    url, port = await start(nursery, defects=frozenset())
    suggested = tmp_path / "suggested.yaml"
    probe = [
        "profile", "check", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--flavor", "sglang-generate", "--output", str(suggested),
    ]  # fmt: skip
    # Without the key: the shape is recognised from routes that answer 403, and
    # the suggestion is partial, saying which variable it needs.
    code, out = await sessctl_cli(*probe)
    assert code == 1, out
    assert "POST /rl/start_session" in out
    assert "403" in out
    assert "set AREAL_ADMIN_KEY and run profile check again" in out
    text = suggested.read_text()
    assert "admin_key_env: AREAL_ADMIN_KEY" in text
    assert "# not probed" in text
    # With it: checked end to end, and the library runs on the file as written.
    code, out = await sessctl_cli(*probe, env=ENV)
    assert code == 0, out
    assert "checked: a session was made" in out
    assert ADMIN_KEY not in out + suggested.read_text()
    report = tmp_path / "report.json"
    code, out = await sessctl_cli(
        "run-scenarios", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", str(suggested), "--flavor", "sglang-generate",
        "--filter", "delete-mid-proxy,chat-and-get-after-delete", "--json", str(report),
        env=ENV,
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(report.read_text())["summary"]["failed"] == 0
