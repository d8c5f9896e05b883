"""The self-test: the library against the clean reference server and every known-broken variant.

A race suite that only ever passes proves little. This runs every scenario
against the clean server (which must pass everything) and against each
variant in ``refserver.variants`` (each of which must be caught by at least
one scenario), and says which scenario catches which bug, and how reliably:
a cell counts the runs in which the scenario failed on the variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.model.scenario import Scenario
from harness.results import SuiteResult, Verdict
from refserver.variants import VARIANTS

from .suite import SuiteHooks, SuiteSettings, Target, run_suite

CLEAN = "clean"


@dataclass(frozen=True)
class Cell:
    caught_runs: int
    runs: int

    @property
    def caught(self) -> bool:
        return self.caught_runs > 0


@dataclass(frozen=True)
class SelftestResult:
    suite: SuiteResult
    scenarios: list[str]
    variants: list[str]

    def cell(self, scenario: str, target: str) -> Cell:
        """Runs that caught something: on a variant a FAIL or ERROR (a convention that
        merely differs catches no bug); on the clean server anything but PASS."""
        result = next(s for s in self.suite.scenarios if s.name == scenario and s.target == target)
        catching = (Verdict.FAIL, Verdict.ERROR)
        if target == CLEAN:
            caught = sum(1 for run in result.runs if run.verdict is not Verdict.PASS)
        else:
            caught = sum(1 for run in result.runs if run.verdict in catching)
        return Cell(caught, len(result.runs))

    @property
    def clean_problems(self) -> list[str]:
        return [s for s in self.scenarios if self.cell(s, CLEAN).caught]

    def caught_by(self, variant: str) -> list[str]:
        return [s for s in self.scenarios if self.cell(s, variant).caught]

    def reliably_caught_by(self, variant: str) -> list[str]:
        """Scenarios that catch the variant in every one of their runs."""
        cells = ((s, self.cell(s, variant)) for s in self.scenarios)
        return [s for s, c in cells if c.caught_runs == c.runs]

    @property
    def uncaught_variants(self) -> list[str]:
        return [v for v in self.variants if not self.caught_by(v)]

    @property
    def idle_scenarios(self) -> list[str]:
        """Scenarios that catch no variant: not pulling their weight (yet)."""
        return [s for s in self.scenarios if not any(self.cell(s, v).caught for v in self.variants)]

    @property
    def exit_code(self) -> int:
        if self.suite.unreachable:
            return 3
        return 1 if self.clean_problems or self.uncaught_variants else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "clean": {
                "passed": not self.clean_problems,
                "not_passing": self.clean_problems,
            },
            "variants": {
                v: {
                    "bug": VARIANTS[v].bug,
                    "caught_by": self.caught_by(v),
                    "caught_in_every_run_by": self.reliably_caught_by(v),
                }
                for v in self.variants
            },
            "uncaught_variants": self.uncaught_variants,
            "idle_scenarios": self.idle_scenarios,
            "matrix": {
                s: {
                    t: {"caught_runs": self.cell(s, t).caught_runs, "runs": self.cell(s, t).runs}
                    for t in [CLEAN, *self.variants]
                }
                for s in self.scenarios
            },
        }


async def run_selftest(
    scenarios: Sequence[Scenario],
    settings: SuiteSettings,
    hooks: SuiteHooks | None = None,
    variants: Sequence[str] | None = None,
) -> SelftestResult:
    chosen = list(variants or VARIANTS)
    targets = [Target(CLEAN, None)] + [Target(v, None, emulate=v) for v in chosen]
    suite = await run_suite(scenarios, targets, settings, hooks)
    return SelftestResult(suite, [s.name for s in scenarios], chosen)
