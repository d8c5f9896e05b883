"""`sessctl run-scenarios` as CI and engineers run it: exit codes, reports, plain text."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import junitparser
import pytest

from .conftest import HANG_GUARD

WRONG_EXPECTATION = """\
name: expects-the-wrong-thing
description: Claims a chat on a fresh session is a 404, which it is not.
steps:
  - create: s1
  - chat: c1
    expect: {status: 404}
"""


def sessctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )


def test_passing_run_exits_0_and_writes_json_junit_and_markdown(tmp_path: Path) -> None:
    reports = {k: tmp_path / f"report.{k}" for k in ("json", "xml", "md")}
    done = sessctl(
        "run-scenarios",
        "--filter",
        "double-delete-*,delete-mid-proxy",
        "--json",
        str(reports["json"]),
        "--junit",
        str(reports["xml"]),
        "--markdown",
        str(reports["md"]),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\x1b[" not in done.stdout  # plain text when not a terminal
    assert "PASS  delete-mid-proxy" in done.stdout
    assert (
        "3 scenario results: 3 passed, 0 non-strict, 0 untested, 0 failed, 0 errors" in done.stdout
    )

    report = json.loads(reports["json"].read_text())
    assert report["summary"] == {
        "interrupted": False,
        "passed": 3,
        "non_strict": 0,
        "untested": 0,
        "failed": 0,
        "errors": 0,
        "exit_code": 0,
        "unreachable": {},
        "safety_failures": [],
        "server_faults": [],
        "non_strict_conventions": [],
        "not_tested": [],
    }
    names = {s["name"] for s in report["scenarios"]}
    assert names == {"double-delete-sequential", "double-delete-concurrent", "delete-mid-proxy"}
    mid = next(s for s in report["scenarios"] if s["name"] == "delete-mid-proxy")
    assert mid["verdict"] == "pass"
    assert mid["target"] == "reference"
    assert {"step": "d1", "op": "delete", "expected": "204", "observed": {"204": 1}} in mid["steps"]
    assert mid["runs"][0]["observations"]["c1"]["status"] == 410

    suite = ET.parse(reports["xml"]).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "3"
    assert suite.get("failures") == "0"
    assert suite.get("name") == "sessctl.reference"
    assert "| delete-mid-proxy | PASS |" in reports["md"].read_text()


def test_a_failing_scenario_exits_1_and_explains_itself(tmp_path: Path) -> None:
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(WRONG_EXPECTATION)
    junit = tmp_path / "junit.xml"
    done = sessctl("run-scenarios", str(scenario), "--junit", str(junit))
    assert done.returncode == 1
    out = done.stdout
    assert "FAIL  expects-the-wrong-thing" in out
    assert "expected status 404" in out
    assert "got      200" in out
    assert f"reproduce: sessctl run-scenarios {scenario}" in out
    assert "curl -sS -X POST" in out
    root = ET.parse(junit).getroot()
    case = root.find("testsuite/testcase/failure")
    assert case is not None
    # The message names the property that broke (this file names none: its name);
    # the text has every finding, then how to rerun.
    assert case.get("message") == "expects-the-wrong-thing"
    assert case.get("type") == "expects-the-wrong-thing"  # the safety label CI groups by
    assert "c1: expected status 404; got 200" in (case.text or "")
    # Totals and times on every level, as CI dashboards read them.
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("1", "1", "0")
    assert float(root.get("time") or "-1") >= 0
    assert float(root.find("testsuite/testcase").get("time") or "-1") >= 0  # type: ignore[union-attr]
    # As a CI tool's JUnit library reads it.
    xml = junitparser.JUnitXml.fromfile(str(junit))
    (suite,) = list(xml)
    (test,) = list(suite)
    assert test.time >= 0
    assert suite.time >= 0
    (result,) = test.result
    assert isinstance(result, junitparser.Failure)
    assert result.type == "expects-the-wrong-thing"
    assert result.message == "expects-the-wrong-thing"


def test_emulate_runs_a_known_broken_variant_and_says_how_to_rerun_it() -> None:
    name = "concurrent-writers-no-phantom"
    judged_by = ["--profile", "reference", "--flavor", "sglang", "--request-timeout", "7"]
    done = sessctl("run-scenarios", "--filter", name, "--emulate", "split-lock", *judged_by)
    assert done.returncode == 1, done.stdout
    assert "FAIL  concurrent-writers-no-phantom  on split-lock" in done.stdout
    # The rerun repeats every option that judged the run, or it may not fail the same way.
    rerun = " ".join(["--filter", name, "--emulate", "split-lock", *judged_by])
    assert f"reproduce: sessctl run-scenarios {rerun}" in done.stdout


def test_a_malformed_file_exits_2_with_its_location(tmp_path: Path) -> None:
    scenario = tmp_path / "broken.yaml"
    scenario.write_text("name: x\ndescription: d\nsteps:\n  - chat: c1\n    upstream: explode\n")
    done = sessctl("run-scenarios", str(scenario))
    assert done.returncode == 2
    assert f"{scenario}:5:15: upstream: unknown upstream behaviour 'explode'" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_usage_errors_exit_2() -> None:
    for args in (
        ["--target", "not-a-url"],
        ["--upstream-listen", "nonsense"],
        ["--flavor", "llama"],
        ["--filter", "no-such-scenario"],
        ["/no/such/path.yaml"],
        ["--emulate", "no-such-bug"],
        ["--emulate", "split-lock", "--target", "http://127.0.0.1:9"],
    ):
        done = sessctl("run-scenarios", *args)
        assert done.returncode == 2, args
        assert "error:" in done.stderr, args
        assert "Traceback" not in done.stderr, args


def test_an_unreachable_target_exits_3() -> None:
    done = sessctl(
        "run-scenarios",
        "--filter",
        "bad-input",
        "--target",
        "dead=http://127.0.0.1:9",
        "--target-wait",
        "0",
        "--upstream-listen",
        "127.0.0.1:0",
        timeout=HANG_GUARD * 3,
    )
    assert done.returncode == 3
    assert "target dead unusable" in done.stdout
    assert "chaos upstream listening on http://127.0.0.1:" in done.stdout


def test_list_shows_the_library() -> None:
    for args in (["run-scenarios", "--list"], ["list-scenarios"]):
        done = sessctl(*args)
        assert done.returncode == 0
        assert "delete-mid-proxy" in done.stdout
        assert "concurrent-writers-no-phantom" in done.stdout


def test_a_report_that_fails_to_render_still_writes_its_files_and_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import sessctl.run
    from sessctl.cli import app

    def broken_render(*args: object, **kwargs: object) -> None:
        raise KeyError("a rendering bug")

    monkeypatch.setattr(sessctl.run, "render_suite", broken_render)
    reports = {k: tmp_path / f"report.{k}" for k in ("json", "xml", "md")}
    result = CliRunner().invoke(
        app,
        ["run-scenarios", "--filter", "delete-mid-proxy", "--json", str(reports["json"]),
         "--junit", str(reports["xml"]), "--markdown", str(reports["md"])],
    )  # fmt: skip
    assert result.exit_code == 3
    assert "internal error (a sessctl bug, please report it): KeyError" in result.output
    assert "Traceback" not in result.output
    assert json.loads(reports["json"].read_text())["summary"]["passed"] == 1
    assert ET.parse(reports["xml"]).getroot() is not None
    assert "delete-mid-proxy" in reports["md"].read_text()


def test_version_and_short_help_are_understood() -> None:
    version = sessctl("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("sessctl ")
    short = sessctl("-h")
    assert short.returncode == 0, short.stderr
    assert "run-scenarios" in short.stdout


def test_a_report_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    # Not after the whole suite has run and its results are lost.
    done = sessctl("run-scenarios", "--junit", str(tmp_path / "no" / "such" / "r.xml"))
    assert done.returncode == 2
    assert "--junit" in done.stderr
    assert "no such directory" in done.stderr
    assert "scenario results" not in done.stdout  # nothing ran
    folder = sessctl("selftest", "--json", str(tmp_path))
    assert folder.returncode == 2
    assert "is a directory" in folder.stderr


def test_selftest_refuses_a_repeat_below_one() -> None:
    for repeat in ("0", "-3"):
        done = sessctl("selftest", "--repeat", repeat)
        assert done.returncode == 2, done.stdout
        assert "--repeat" in done.stderr


def test_the_upstream_on_a_busy_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = sessctl("upstream", "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: the chaos upstream cannot listen on")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command",
    [["run-scenarios"], ["chaos"], ["selftest"], ["serve"], ["upstream"], ["check"],
     ["profile", "check"]],
    ids=lambda c: " ".join(c),
)  # fmt: skip
def test_help_names_what_an_option_takes_not_its_python_type(command: list[str]) -> None:
    done = sessctl(*command, "--help")
    assert done.returncode == 0
    typed: list[str] = []
    panel = ""
    for line in done.stdout.splitlines():
        if line.startswith("╭─"):
            panel = line
        # Not typer's own: its -h flag, and positional arguments, whose type no
        # metavar reaches (typer 0.29 shows it beside the argument's name).
        if "Arguments" in panel or "--help" in line:
            continue
        if re.search(r"<(str|int|float|path|bool|list\[str\])[^>]*>", line):
            typed.append(line)
    assert typed == []
