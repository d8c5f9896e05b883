"""Machine-readable reports: JSON, JUnit XML and Markdown. No rich here."""

from __future__ import annotations

import json
import re
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
            "interrupted": suite.interrupted,
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
    """JUnit as CI tools read it: totals and times on every level, a failure's
    ``type`` (the safety label of its first cause, "phantom commit") and a
    ``message`` naming every property that broke; an UNTESTED scenario is a skipped
    case whose message is its cause."""
    root = ET.Element("testsuites", name="sessctl")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    total_time = 0.0
    for target in suite.targets:
        results = [s for s in suite.scenarios if s.target == target]
        # Viewers in the Jenkins style split a classname at its dots: a host's
        # dots and a port's colon would make packages of an address.
        classname = "sessctl." + re.sub(r"[^A-Za-z0-9_-]", "_", target)
        counts = {
            "tests": len(results),
            "failures": sum(1 for s in results if s.verdict is Verdict.FAIL),
            "errors": sum(1 for s in results if s.verdict is Verdict.ERROR),
            "skipped": sum(1 for s in results if s.verdict is Verdict.UNTESTED),
        }
        seconds = sum(_seconds(result) for result in results)
        element = ET.SubElement(root, "testsuite", name=classname, time=f"{seconds:.3f}")
        for key, value in counts.items():
            element.set(key, str(value))
            totals[key] += value
        total_time += seconds
        for result in results:
            case = ET.SubElement(
                element,
                "testcase",
                classname=classname,
                name=result.name,
                time=f"{_seconds(result):.3f}",
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
            causes = [f for f in findings if f.follows is None and f.kind is not Kind.CONVENTION]
            labels = list(dict.fromkeys(f.label for f in causes if f.label))
            kinds = list(dict.fromkeys(f.kind.value for f in causes))
            message = "; ".join(labels) or (_one_line(findings[0]) if findings else tag)
            # The type is what CI dashboards group by: the safety label of the first
            # cause ("phantom commit"); its kind where a cause has no label.
            kind = labels[0] if labels else ", ".join(kinds)
            detail = ET.SubElement(
                case, tag, message=message, type=kind if tag == "failure" else tag
            )
            # The causes first, then what follows from them.
            ordered = sorted(findings, key=lambda f: f.follows is not None)
            lines = [_one_line(f) for f in ordered]
            lines.append(f"reproduce: {reproduce_command(result, targets.get(target))}")
            detail.text = "\n".join(lines)
    root.set("time", f"{total_time:.3f}")
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _seconds(result: ScenarioResult) -> float:
    """How long a scenario's runs took, from their first request to their last answer."""
    total = 0.0
    for run in result.runs:
        observations = list(run.observations.values())
        if observations:
            total += max(o.ended for o in observations) - min(o.started for o in observations)
    return total


def write_markdown(path: Path, suite: SuiteResult, targets: dict[str, Target]) -> None:
    """For a pull-request comment: the verdict and what broke first, each scenario
    that did not pass in a section of its kind (failures, not tested, non-strict),
    its details folded; the table of every scenario last, folded too."""
    errors = suite.count(Verdict.ERROR)
    lines = ["# sessctl scenario report", ""]
    lines.append(
        f"**{suite.count(Verdict.PASS)} passed, {suite.count(Verdict.NON_STRICT)} non-strict, "
        f"{suite.count(Verdict.UNTESTED)} untested, {suite.count(Verdict.FAIL)} failed, "
        f"{errors} error{'' if errors == 1 else 's'}**"
    )
    safety = suite.labels(Kind.SAFETY) + suite.labels(Kind.FAULT)
    if safety:
        lines += ["", f"Safety failures: {', '.join(safety)}"]
    for target, problem in suite.unreachable.items():
        lines += ["", f"Target {target} unusable: {problem}"]
    sections = (
        ("Failures", (Verdict.FAIL, Verdict.ERROR)),
        ("Not tested (the race was never placed)", (Verdict.UNTESTED,)),
        ("Non-strict (conventions that differ, safely)", (Verdict.NON_STRICT,)),
    )
    for title, verdicts in sections:
        shown = [s for s in suite.scenarios if s.verdict in verdicts]
        if not shown:
            continue
        lines += ["", f"## {title}", ""]
        for result in shown:
            run = result.first_problem_run
            findings = (run.untested + run.errors + run.failures) if run else []
            causes = [f for f in findings if f.follows is None]
            headline = "; ".join(dict.fromkeys(f.label for f in causes if f.label))
            summary = f"{result.name} on {result.target}: {result.verdict.value.upper()}"
            lines.append(
                f"<details><summary>{_escape(summary)}"
                + (f" ({_escape(headline)})" if headline else "")
                + "</summary>"
            )
            lines.append("")
            for finding in sorted(findings, key=lambda f: f.follows is not None):
                lines.append(f"- {_escape(_one_line(finding))}")
            lines += ["", "```", reproduce_command(result, targets.get(result.target)), "```"]
            lines += ["", "</details>", ""]
    names = list(dict.fromkeys(s.name for s in suite.scenarios))
    by_key = {(s.name, s.target): s for s in suite.scenarios}
    lines += ["", "<details><summary>Every scenario</summary>", ""]
    lines.append("| scenario | " + " | ".join(suite.targets) + " |")
    lines.append("|---|" + "---|" * len(suite.targets))
    for name in names:
        cells = [
            by_key[(name, t)].verdict.value.upper() if (name, t) in by_key else "-"
            for t in suite.targets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "</details>"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _escape(text: str) -> str:
    """Findings quote the server's answers: keep them from reading as HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _one_line(finding: Finding) -> str:
    where = f"{finding.step}: " if finding.step else ""
    kind = "[non-strict] " if finding.kind is Kind.CONVENTION else ""
    follows = f" (follows from {finding.follows})" if finding.follows else ""
    return f"{where}{kind}expected {finding.expected}; got {finding.actual}{follows}"
