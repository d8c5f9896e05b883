"""Shrinking a failing chaos run to a minimal YAML scenario that replays it.

The case model, and reading and writing it, are in ``case.py``; this module
runs the search.

1. **From history to a case.** The failing session's operations, up to the
   end of the failing window, become scenario steps, each run in the
   background. The order the history shows is forced at three kinds of point:
   a request is sent; a held upstream call is released (where the history
   shows it answered); the client hangs up (where it gave up). After every
   point the scenario settles, so the server has taken in everything before
   the next point. Every chat's upstream call is held (after any scripted
   faults), so no answer outruns its place; calls the history never saw
   answered are released at the end, one by one.

2. **What the scenario expects.** The reference server is the contract's
   executable specification, so each candidate is first replayed on it
   (in-process, where settling is exact), and what it answered becomes the
   expectations: every step's status; for the upstream, no call for a turn
   it refused and a cancelled, unanswered call for a turn it preempted. The
   scenario defaults (durable, no 2xx after DELETE) stay on.

3. **Delta debugging.** A candidate still fails if, with those expectations,
   its replay on the target is a FAIL. ddmin removes operations (a chat whose
   base was removed builds on that base's base instead; a retry of a removed
   chat becomes a plain chat), then each chat is simplified where the
   failure survives: a plain answer instead of a hold, no scripted faults, no
   hang-up. The result is replayed a few more times on both servers, and the
   report says how often it failed on the target and passed on the reference.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import trio

from harness.model.loader import parse_scenario
from harness.model.profile import REFERENCE_PROFILE
from harness.model.scenario import Scenario
from harness.results import RunResult, Verdict
from harness.run.client import TargetClient
from harness.run.runner import RunSettings, ScenarioRun
from harness.upstream.chaos_upstream import ChaosUpstream

from .case import (
    Case,
    CaseOp,
    Expectations,
    ScenarioText,
    case_from_history,
    expectations_from,
    render,
)
from .ddmin import ddmin
from .history import Operation
from .linearizability import Finding

# -- replaying ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Replayer:
    """Runs scenarios on the target and on the reference server, through one upstream."""

    upstream: ChaosUpstream
    target: TargetClient
    reference: TargetClient
    settings: RunSettings

    async def run(self, scenario: Scenario, *, on_reference: bool, index: int = 0) -> RunResult:
        client = self.reference if on_reference else self.target
        # The target is read through its profile; the reference judge through its own.
        settings = (
            replace(self.settings, profile=REFERENCE_PROFILE) if on_reference else self.settings
        )
        return await ScenarioRun(scenario, client, self.upstream, index, settings).run()


@dataclass(frozen=True)
class ShrinkSettings:
    max_tests: int = 400
    """Replays of candidates (each is one run on each server) before stopping."""
    time_budget: float = 60.0
    """Seconds before stopping with the smallest failing case found so far."""
    confirm_runs: int = 5
    """Replays of the result on each server, to show it is deterministic."""
    findings_tried: int = 5
    """Findings to start from, smallest session first, until one replays."""


@dataclass(frozen=True)
class ShrinkResult:
    name: str
    text: str
    """The scenario file, ready to write."""
    finding: Finding
    """The chaos finding it was shrunk from."""
    operations_before: int
    operations_after: int
    steps: int
    tests: int
    seconds: float
    exhausted: bool
    """The budget ran out: smaller than the history, but maybe not 1-minimal."""
    confirm_runs: int
    target_failures: int
    reference_passes: int


class _Oracle:
    """ "Does this case, as a scenario, still FAIL on the target?", memoised and budgeted."""

    def __init__(
        self,
        replayer: Replayer,
        text: ScenarioText,
        settings: ShrinkSettings,
        tests: int,
        started: float,
    ) -> None:
        self.replayer = replayer
        self.text = text
        self.settings = settings
        self.tests = tests
        """Counted across every finding tried, as the budget is."""
        self.deadline = started + settings.time_budget
        self.exhausted = False
        self._seen: dict[str, str | None] = {}
        self.judged: dict[str, tuple[Case, Expectations, RunResult]] = {}
        """Written scenario -> what it was made of, and its failing run on the target."""

    async def scenario_for(self, case: Case, *, beyond_budget: bool = False) -> str | None:
        """The scenario text (with expectations) if the case still fails, else None."""
        plain = render(case, self.text)
        if plain in self._seen:
            return self._seen[plain]
        over = self.tests >= self.settings.max_tests or trio.current_time() > self.deadline
        if over and not beyond_budget:
            self.exhausted = True
            return None
        self.tests += 1
        found = await self._judge(case, plain)
        self._seen[plain] = found
        return found

    async def fails(self, case: Case) -> bool:
        return await self.scenario_for(case) is not None

    async def _judge(self, case: Case, plain: str) -> str | None:
        if not case.ops:
            return None
        reference = await self.replayer.run(
            parse_scenario(plain, "<shrink>"), on_reference=True, index=self.tests
        )
        if reference.verdict is not Verdict.PASS:
            return None  # the reference cannot run this order: no spec to judge by
        expected = expectations_from(case, reference)
        if expected is None:
            return None
        text = render(case, self.text, expected)
        target = await self.replayer.run(
            parse_scenario(text, "<shrink>"), on_reference=False, index=self.tests
        )
        if target.verdict is not Verdict.FAIL:
            return None
        self.judged[text] = (case, expected, target)
        return text


async def shrink(
    history: Sequence[Operation],
    findings: Sequence[Finding],
    replayer: Replayer,
    text_for: Callable[[Finding], ScenarioText],
    settings: ShrinkSettings | None = None,
) -> ShrinkResult | None:
    """The smallest scenario that still fails on the target, or None if none replays."""
    settings = settings or ShrinkSettings()
    started = trio.current_time()
    sizes = Counter(o.session for o in history)
    candidates = sorted(findings, key=lambda f: sizes[f.session])[: settings.findings_tried]
    oracle: _Oracle | None = None
    for finding in candidates:
        text = text_for(finding)
        tests_so_far = oracle.tests if oracle else 0
        oracle = _Oracle(replayer, text, settings, tests_so_far, started)
        as_run = [case_from_history(history, finding, arrival) for arrival in ("sent", "upstream")]
        # Last, the window alone: replayed, an operation that the run refused can
        # succeed and block the session (a chat that got 409 there holds the lock here).
        window = {f"{o.op[0]}{o.id}" for o in finding.window}
        alone = as_run[0].without({o.name for o in as_run[0].ops} - window)
        case = await _first_that_fails([*as_run, alone], oracle)
        if case is None:
            continue
        before = len(case.ops)
        case = await _minimise(case, oracle)
        # Renaming the steps (c1, d2, ...) changes no behaviour, but it is a new
        # scenario: judge it, and fall back on the case as found if it differs.
        written = await oracle.scenario_for(
            case.renamed(), beyond_budget=True
        ) or await oracle.scenario_for(case, beyond_budget=True)
        if written is None:
            continue
        written = _named_for_what_it_shows(written, text, oracle)
        scenario = parse_scenario(written, "<shrink>")
        failures, passes = await _confirm(scenario, replayer, settings.confirm_runs)
        return ShrinkResult(
            name=scenario.name,
            text=written,
            finding=finding,
            operations_before=before,
            operations_after=len(case.ops),
            steps=len(scenario.steps),
            tests=oracle.tests,
            seconds=trio.current_time() - started,
            exhausted=oracle.exhausted,
            confirm_runs=settings.confirm_runs,
            target_failures=failures,
            reference_passes=passes,
        )
    return None


async def _first_that_fails(cases: Sequence[Case], oracle: _Oracle) -> Case | None:
    for case in cases:
        if await oracle.fails(case):
            return case
    return None


async def _minimise(case: Case, oracle: _Oracle) -> Case:
    for _ in range(3):  # simplifying a chat can make more operations removable
        names = [o.name for o in case.ops]

        async def fails_with(kept: list[str], case: Case = case, names: list[str] = names) -> bool:
            return await oracle.fails(case.without(set(names) - set(kept)))

        kept = await ddmin(names, fails_with)
        case = case.without(set(names) - set(kept))
        simpler = await _simplify(case, oracle)
        if simpler == case:
            break
        case = simpler
    return case


async def _simplify(case: Case, oracle: _Oracle) -> Case:
    for name in [o.name for o in case.ops if o.op == "chat"]:
        for simpler in (_plain_answer, _no_faults, _no_hang_up):
            variant = simpler(case, case.op(name))
            if variant is not None and await oracle.fails(variant):
                case = variant
    return case


def _plain_answer(case: Case, op: CaseOp) -> Case | None:
    """The upstream answers at once: no hold, no release point."""
    if op.final != "hold":
        return None
    return case.with_op(replace(op, final="respond"), drop=["release"])


def _no_faults(case: Case, op: CaseOp) -> Case | None:
    return case.with_op(replace(op, faults=())) if op.faults else None


def _no_hang_up(case: Case, op: CaseOp) -> Case | None:
    if not any(p.op == op.name and p.action == "cancel" for p in case.points):
        return None
    return case.with_op(op, drop=["cancel"])


def _named_for_what_it_shows(written: str, text: ScenarioText, oracle: _Oracle) -> str:
    """Describe the shrunk scenario by the failure it shows on the target, which
    may not be the chaos finding it started from (a split-lock history's finding
    may shrink to a phantom commit): its description and property must name the
    race its steps contain."""
    judged = oracle.judged.get(written)
    if judged is None:
        return written
    case, expected, run = judged
    # Findings labelled with the property the text was given say nothing new;
    # a specific cause (a phantom commit, say) says what the steps show.
    specific = [f for f in run.failures if f.label and f.label != text.safety_property]
    shown_findings = specific or [f for f in run.failures if f.label]
    labels = list(dict.fromkeys(f.label for f in shown_findings))
    if not labels:
        return written
    first = shown_findings[0]
    shown = (
        f"{text.description.split(' then shrunk.')[0]} then shrunk. On the target it "
        f"shows: {', '.join(labels)} ({first.step or 'the run'}: expected "
        f"{first.expected}; got {first.actual})."
    )
    prefix = re.match(r"^(chaos-seed\d+)-", text.name)
    name = f"{prefix.group(1)}-{_slug(labels[0])}" if prefix else text.name
    named = replace(text, name=name, description=shown, safety_property=labels[0])
    return render(case, named, expected)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:60] or "failure"


async def _confirm(scenario: Scenario, replayer: Replayer, runs: int) -> tuple[int, int]:
    failures = passes = 0
    for index in range(runs):
        target = await replayer.run(scenario, on_reference=False, index=index)
        failures += target.verdict is Verdict.FAIL
        reference = await replayer.run(scenario, on_reference=True, index=index)
        passes += reference.verdict is Verdict.PASS
    return failures, passes


__all__ = [
    "Replayer",
    "ShrinkResult",
    "ShrinkSettings",
    "shrink",
]
