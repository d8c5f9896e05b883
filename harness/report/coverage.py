"""An exploration's coverage: phase by interferer by engine behaviour, in the terminal,
as JSON and as HTML.

The terminal table has a row per phase and a column per interferer; each entry is
the worst of its behaviours (✗ a cell failed, ? one was untested, ✓ all passed,
· none applies) with the count of cells behind it. Failed cells are listed after
it with their finding, untested ones grouped by why. JSON and HTML have every
cell, with its behaviour.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.chaos.case import PROPERTY_OF_FINDING
from harness.explore.cells import BEHAVIOURS, INTERFERERS, PHASES
from harness.explore.driver import CellResult, Outcome
from harness.explore.explore import OUTCOMES, ExploreReport

from .console import plural
from .timeline import finding_drawing

MARKS: dict[Outcome, tuple[str, str]] = {
    "failed": ("✗", "bold red"),
    "untested": ("?", "yellow"),
    "passed": ("✓", "green"),
    "not applicable": ("·", "dim"),
}
COLOURS: dict[Outcome, str] = {
    "failed": "#d32f2f",
    "untested": "#f9a825",
    "passed": "#43a047",
    "not applicable": "#e0e0e0",
}


def _grid(report: ExploreReport) -> dict[tuple[str, str], list[CellResult]]:
    grid: dict[tuple[str, str], list[CellResult]] = defaultdict(list)
    for result in report.results:
        grid[(result.cell.phase, result.cell.interferer)].append(result)
    return grid


def _worst(results: list[CellResult]) -> Outcome:
    present = {r.outcome for r in results}
    order: tuple[Outcome, ...] = ("failed", "untested", "passed", "not applicable")
    return next((o for o in order if o in present), "passed")


def render_coverage(console: Console, report: ExploreReport, what: str) -> None:
    grid = _grid(report)
    phases = [p for p in PHASES if any(k[0] == p for k in grid)]
    interferers = [i for i in INTERFERERS if any(k[1] == i for k in grid)]
    table = Table(title=f"exploration of {what}", show_lines=False, title_justify="left")
    table.add_column("phase \\ interferer")
    for interferer in interferers:
        table.add_column(interferer, justify="center")
    for phase in phases:
        row: list[Text | str] = [phase]
        for interferer in interferers:
            results = grid.get((phase, interferer), [])
            if not results:
                row.append("")
                continue
            worst = _worst(results)
            mark, style = MARKS[worst]
            count = sum(1 for r in results if r.outcome == worst)
            row.append(Text(f"{mark}{count}", style=style))
        table.add_row(*row)
    console.print(table)
    console.print(
        "each entry: the worst of its engine behaviours (✗ failed, ? untested, ✓ passed, "
        "· not applicable) and how many cells had it; every cell is in the JSON and HTML"
    )
    # Failed cells grouped by their first finding's kind: one explanation each, the
    # cells named (the JSON and HTML have every explanation).
    by_kind: dict[str, list[CellResult]] = defaultdict(list)
    for result in report.failed:
        by_kind[result.findings[0].kind if result.findings else "failed"].append(result)
    for kind, results in by_kind.items():
        label = PROPERTY_OF_FINDING.get(kind, kind)
        line = Text(f"✗ {plural(len(results), 'cell')}: {kind} ({label}): ", style="bold red")
        line.append(_names(results), style="")
        console.print(line)
        console.print(Text(f"  e.g. {results[0].cell.name}: {results[0].why}"), highlight=False)
    untested = Counter(r.why for r in report.results if r.outcome == "untested")
    for why, count in untested.most_common():
        named = [r for r in report.results if r.outcome == "untested" and r.why == why]
        line = Text(f"? {plural(count, 'cell')} untested ({_names(named)}): ", style="yellow")
        line.append(why, style="")
        console.print(line, highlight=False)
    console.print(summary(report))


def _names(results: list[CellResult], shown: int = 3) -> str:
    names = [r.cell.name for r in results]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def summary(report: ExploreReport) -> Text:
    parts = [f"{report.count(o)} {o}" for o in OUTCOMES]
    verdict = "FAIL" if report.failed else "PASS"
    style = "bold red" if report.failed else "bold green"
    text = Text(f"{verdict}: ", style=style)
    text.append(f"{len(report.results)} cells: " + ", ".join(parts))
    text.append(f" in {report.elapsed:.1f} s")
    if report.interrupted:
        text.append(" (interrupted: the cells that ran)")
    return text


def coverage_json(report: ExploreReport, what: str) -> dict[str, Any]:
    return {
        "target": what,
        "verdict": "fail" if report.failed else "pass",
        "summary": {o: report.count(o) for o in OUTCOMES} | {"cells": len(report.results)},
        "elapsed_seconds": round(report.elapsed, 3),
        "interrupted": report.interrupted,
        "dimensions": {
            "phases": PHASES,
            "interferers": INTERFERERS,
            "behaviours": BEHAVIOURS,
        },
        "cells": [
            {
                "cell": r.cell.name,
                "phase": r.cell.phase,
                "interferer": r.cell.interferer,
                "behaviour": r.cell.behaviour,
                "outcome": r.outcome,
                "why": r.why,
                "findings": [
                    {
                        "kind": f.kind,
                        "property": PROPERTY_OF_FINDING[f.kind],
                        "explanation": f.explanation,
                    }
                    for f in r.findings
                ],
            }
            for r in report.results
        ],
    }


def coverage_html(report: ExploreReport, what: str, max_drawn: int = 20) -> str:
    """One self-contained page: the matrix (a square per behaviour in each entry,
    its outcome and why on hover), the failed cells with their findings drawn, and
    the untested cells with why."""
    grid = _grid(report)
    behaviours = list(BEHAVIOURS)
    head = "".join(f"<th>{html.escape(i)}</th>" for i in INTERFERERS)
    rows = []
    for phase in PHASES:
        cells = []
        for interferer in INTERFERERS:
            by_behaviour = {r.cell.behaviour: r for r in grid.get((phase, interferer), [])}
            squares = []
            for behaviour in behaviours:
                result = by_behaviour.get(behaviour)
                if result is None:
                    squares.append("<span class='sq none'></span>")
                    continue
                title = f"{result.cell.name}: {result.outcome}. {result.why}"
                anchor = f"#{_anchor(result)}" if result.outcome == "failed" else None
                square = (
                    f"<span class='sq' style='background:{COLOURS[result.outcome]}' "
                    f"title='{html.escape(title, quote=True)}'></span>"
                )
                squares.append(f"<a href='{anchor}'>{square}</a>" if anchor else square)
            cells.append(f"<td>{''.join(squares)}</td>")
        rows.append(
            f"<tr><th title='{html.escape(PHASES[phase], quote=True)}'>{html.escape(phase)}</th>"
            f"{''.join(cells)}</tr>"
        )
    legend = " ".join(
        f"<span class='sq' style='background:{COLOURS[o]}'></span> {o}" for o in OUTCOMES
    )
    order = ", ".join(f"{i + 1}. {html.escape(b)}" for i, b in enumerate(behaviours))
    failed_sections = []
    for number, result in enumerate(report.failed, start=1):
        findings = "".join(
            f"<li><b>{html.escape(f.kind)}</b> ({html.escape(PROPERTY_OF_FINDING[f.kind])}): "
            f"{html.escape(f.explanation)}</li>"
            for f in result.findings
        )
        drawing = ""
        if number <= max_drawn and result.findings and result.findings[0].window:
            drawing = finding_drawing(result.findings[0], result.history)
        failed_sections.append(
            f"<h3 id='{_anchor(result)}'>{html.escape(result.cell.name)}</h3>"
            f"<p>{html.escape(result.cell.describe())}</p><ul>{findings}</ul>{drawing}"
        )
    untested = [r for r in report.results if r.outcome == "untested"]
    untested_rows = "".join(
        f"<tr><td><code>{html.escape(r.cell.name)}</code></td><td>{html.escape(r.why)}</td></tr>"
        for r in untested
    )
    dimension_rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(v)}</td></tr>"
        for table in (PHASES, INTERFERERS, BEHAVIOURS)
        for k, v in table.items()
    )
    counts = ", ".join(f"{report.count(o)} {o}" for o in OUTCOMES)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sessctl explore</title>"
        "<style>body{font-family:sans-serif;margin:20px} table{border-collapse:collapse}"
        " td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
        " .sq{display:inline-block;width:10px;height:10px;margin:1px;border-radius:2px}"
        " .none{background:transparent;border:1px dashed #ddd;width:8px;height:8px}</style>"
        f"</head><body><h1>sessctl explore: {'FAIL' if report.failed else 'PASS'}</h1>"
        f"<p>Against {html.escape(what)}: {len(report.results)} cells, {counts}, "
        f"in {report.elapsed:.1f} s.</p><p>{legend}</p>"
        f"<p>Each entry has a square per engine behaviour, in this order: {order}. "
        "Hover for the cell's outcome and why; a failed one links to its findings.</p>"
        f"<table class='matrix'><tr><th>phase \\ interferer</th>{head}</tr>{''.join(rows)}"
        "</table>"
        f"<h2>Failed cells ({len(report.failed)})</h2>"
        + ("".join(failed_sections) or "<p>None.</p>")
        + f"<h2>Untested cells ({len(untested)})</h2>"
        + (
            f"<table><tr><th>cell</th><th>why</th></tr>{untested_rows}</table>"
            if untested
            else "<p>None.</p>"
        )
        + f"<h2>The dimensions</h2><table>{dimension_rows}</table></body></html>"
    )


def _anchor(result: CellResult) -> str:
    return "cell-" + result.cell.name.replace("/", "-")
