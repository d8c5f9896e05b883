"""Machine-readable reports: JSON, JUnit XML and Markdown. No rich here."""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from harness.results import Finding, Kind, RunResult, ScenarioResult, SuiteResult, Verdict
from harness.run.suite import Target


def reproduce_command(result: ScenarioResult, target: Target | None) -> str:
    option = target.command_option if target else ""
    # Built-in scenarios are found by name; a file of the user's is named by path.
    source = "" if result.source.startswith("builtin:") else f"{shlex.quote(result.source)} "
    return f"sessctl run-scenarios {source}--filter {result.name}{option}"


def _finding(f: Finding) -> dict[str, Any]:
    return {
        "step": f.step,
        "kind": f.kind.value,
        "label": f.label,
        "follows": f.follows,
        "expected": f.expected,
        "actual": f.actual,
        "reproduce": f.reproduce,
    }


def _run(run: RunResult) -> dict[str, Any]:
    return {
        "index": run.index,
        "verdict": run.verdict.value,
        "observations": {
            step: {
                "op": o.op,
                "status": o.status,
                "error_type": o.error_type,
                "latency_ms": round(o.latency_ms, 3),
                "transport_error": o.transport_error,
                "hung_up_by_harness": o.cancelled_by_scenario,
                "retried_on_a_fresh_connection_after": o.retried_after,
            }
            for step, o in run.observations.items()
        },
        "untested": [_finding(f) for f in run.untested],
        "failures": [_finding(f) for f in run.failures],
        "errors": [_finding(f) for f in run.errors],
        "upstream_events": run.upstream_events,
    }


def to_json(suite: SuiteResult, targets: dict[str, Target]) -> dict[str, Any]:
    return {
        "summary": {
            "passed": suite.count(Verdict.PASS),
            "non_strict": suite.count(Verdict.NON_STRICT),
            "untested": suite.count(Verdict.UNTESTED),
            "failed": suite.count(Verdict.FAIL),
            "errors": suite.count(Verdict.ERROR),
            "exit_code": suite.exit_code,
            "unreachable": suite.unreachable,
            "safety_failures": suite.labels(Kind.SAFETY),
            "server_faults": suite.labels(Kind.FAULT),
            "non_strict_conventions": suite.labels(Kind.CONVENTION),
            "not_tested": [
                {
                    "scenario": s.name,
                    "target": s.target,
                    "because": _finding(cause) if (cause := s.untested_because) else None,
                }
                for s in suite.untested()
            ],
        },
        "scenarios": [
            {
                "name": s.name,
                "target": s.target,
                "verdict": s.verdict.value,
                "source": s.source,
                "description": s.description,
                "reproduce": reproduce_command(s, targets.get(s.target)),
                "steps": [
                    {
                        "step": step.step,
                        "op": step.op,
                        "expected": step.expected,
                        "observed": dict(step.cells),
                    }
                    for step in s.steps
                ],
                "runs": [_run(run) for run in s.runs],
            }
            for s in suite.scenarios
        ],
    }


def write_json(path: Path, suite: SuiteResult, targets: dict[str, Target]) -> None:
    path.write_text(json.dumps(to_json(suite, targets), indent=2) + "\n", encoding="utf-8")


def write_junit(path: Path, suite: SuiteResult, targets: dict[str, Target]) -> None:
    root = ET.Element("testsuites", name="sessctl")
    for target in suite.targets:
        results = [s for s in suite.scenarios if s.target == target]
        element = ET.SubElement(
            root,
            "testsuite",
            name=f"sessctl.{target}",
            tests=str(len(results)),
            failures=str(sum(1 for s in results if s.verdict is Verdict.FAIL)),
            errors=str(sum(1 for s in results if s.verdict is Verdict.ERROR)),
            skipped=str(sum(1 for s in results if s.verdict is Verdict.UNTESTED)),
        )
        for result in results:
            case = ET.SubElement(
                element, "testcase", classname=f"sessctl.{target}", name=result.name
            )
            run = result.first_problem_run
            if run is None:
                continue
            findings = run.errors or run.failures
            if result.verdict is Verdict.UNTESTED:
                # Not a pass and not a failure: CI tools show a skipped case with why.
                cause = run.untested[0] if run.untested else None
                message = f"not tested: {_one_line(cause)}" if cause else "not tested"
                skipped = ET.SubElement(case, "skipped", message=message)
                lines = [_one_line(f) for f in run.untested + run.failures]
                lines.append(f"reproduce: {reproduce_command(result, targets.get(target))}")
                skipped.text = "\n".join(lines)
                continue
            if result.verdict is Verdict.NON_STRICT:
                # Safe, so the case passes; what differs is kept where CI shows it.
                notes = ET.SubElement(case, "system-out")
                notes.text = "non-strict:\n" + "\n".join(_one_line(f) for f in findings)
                continue
            tag = "error" if result.verdict is Verdict.ERROR else "failure"
            detail = ET.SubElement(case, tag, message=_one_line(findings[0]) if findings else tag)
            lines = [_one_line(f) for f in findings]
            lines.append(f"reproduce: {reproduce_command(result, targets.get(target))}")
            detail.text = "\n".join(lines)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def write_markdown(path: Path, suite: SuiteResult, targets: dict[str, Target]) -> None:
    lines = ["# sessctl scenario report", ""]
    lines.append(
        f"{suite.count(Verdict.PASS)} passed, {suite.count(Verdict.NON_STRICT)} non-strict, "
        f"{suite.count(Verdict.UNTESTED)} untested, "
        f"{suite.count(Verdict.FAIL)} failed, {suite.count(Verdict.ERROR)} errors"
    )
    lines.append("")
    names = list(dict.fromkeys(s.name for s in suite.scenarios))
    lines.append("| scenario | " + " | ".join(suite.targets) + " |")
    lines.append("|---|" + "---|" * len(suite.targets))
    by_key = {(s.name, s.target): s for s in suite.scenarios}
    for name in names:
        cells = [
            by_key[(name, t)].verdict.value.upper() if (name, t) in by_key else "-"
            for t in suite.targets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    problems = [s for s in suite.scenarios if s.verdict is not Verdict.PASS]
    if problems:
        lines += ["", "## Failures", ""]
    for result in problems:
        run = result.first_problem_run
        lines.append(f"### {result.name} on {result.target}: {result.verdict.value.upper()}")
        lines.append("")
        if run is not None and run.untested:
            lines.append(f"- not tested: {_one_line(run.untested[0])}")
        for finding in (run.errors + run.failures) if run else []:
            lines.append(f"- {_one_line(finding)}")
        lines += ["", "```", reproduce_command(result, targets.get(result.target)), "```", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _one_line(finding: Finding) -> str:
    where = f"{finding.step}: " if finding.step else ""
    kind = "[non-strict] " if finding.kind is Kind.CONVENTION else ""
    follows = f" (follows from {finding.follows})" if finding.follows else ""
    return f"{where}{kind}expected {finding.expected}; got {finding.actual}{follows}"
