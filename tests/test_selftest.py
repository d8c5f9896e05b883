"""The self-test: which scenario catches which variant, and its verdict."""

from __future__ import annotations

import subprocess
import sys

from harness.model.loader import load_scenarios
from harness.run.runner import RunSettings
from harness.run.selftest import run_selftest
from harness.run.suite import SuiteSettings

UNTIMED = SuiteSettings(run=RunSettings(timing_bounds=False))


async def test_selftest_matrix_and_verdict() -> None:
    scenarios = load_scenarios([], "chat-never-existed,delete-mid-proxy,rapid-create-*")
    result = await run_selftest(
        scenarios, UNTIMED, variants=["autocreate-after-delete", "commit-on-disconnect"]
    )
    assert result.clean_problems == []
    assert result.caught_by("autocreate-after-delete") == ["chat-never-existed"]
    assert result.reliably_caught_by("autocreate-after-delete") == ["chat-never-existed"]
    assert result.uncaught_variants == ["commit-on-disconnect"]
    assert result.idle_scenarios == ["delete-mid-proxy", "rapid-create-chat-delete-cycles"]
    assert result.exit_code == 1  # a variant went uncaught
    report = result.to_json()
    assert report["variants"]["autocreate-after-delete"]["caught_by"] == ["chat-never-existed"]
    assert report["matrix"]["chat-never-existed"]["clean"] == {"caught_runs": 0, "runs": 1}


async def test_selftest_passes_when_every_variant_is_caught() -> None:
    scenarios = load_scenarios([], "client-disconnect-mid-proxy,chat-never-existed")
    result = await run_selftest(
        scenarios, UNTIMED, variants=["autocreate-after-delete", "commit-on-disconnect"]
    )
    assert result.uncaught_variants == []
    assert result.exit_code == 0


def test_emulate_list_names_every_variant_with_its_bug() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", "serve", "--emulate", "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    for name in ("split-lock", "delete-waits", "queued-proceed", "leak-upstream"):
        assert name in done.stdout
    assert "phantom commit" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "sessctl", "serve", "--emulate", "nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "unknown variant" in bad.stderr


def test_a_variant_that_only_differs_in_conventions_is_not_caught() -> None:
    from harness.results import RunResult, ScenarioResult, SuiteResult, Verdict
    from harness.run.selftest import CLEAN, SelftestResult

    def result(target: str, *verdicts: Verdict) -> ScenarioResult:
        runs = [RunResult(i, v, {}) for i, v in enumerate(verdicts)]
        return ScenarioResult("s", "", "x", target, runs, [])

    suite = SuiteResult(
        [CLEAN, "v"],
        [result(CLEAN, Verdict.PASS, Verdict.PASS), result("v", Verdict.NON_STRICT, Verdict.FAIL)],
    )
    selftest = SelftestResult(suite, ["s"], ["v"])
    assert selftest.cell("s", "v").caught_runs == 1  # the FAIL, not the NON-STRICT
    assert selftest.cell("s", CLEAN).caught_runs == 0
    clean_non_strict = SuiteResult([CLEAN], [result(CLEAN, Verdict.NON_STRICT)])
    assert SelftestResult(clean_non_strict, ["s"], []).clean_problems == ["s"]
