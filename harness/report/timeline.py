"""An HTML timeline of the failing windows of a checked history.

Every finding is listed; the first ``max_findings`` are drawn, one section each:
one lane per client, each operation of the session as a bar from its
invocation to its completion (open-ended when the outcome is unknown),
coloured by outcome, with the upstream's events marked on it and a time axis
with ticks. A client's operations that overlap in time (an operation whose
outcome never came, and the ones the client sent after it) get rows of their
own, so no bar hides another. The finding that was shrunk links to its
scenario file and replay command. A single self-contained file with inline
SVG: no scripts, nothing to fetch.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from harness.chaos.history import Operation
from harness.chaos.linearizability import CheckResult, Finding

ROW_HEIGHT = 34
LEFT = 90
WIDTH = 960
AXIS = 34
TICKS = 6
EVENT_MARKS = {
    "received": "▲",
    "sent": "·",
    "answered": "●",
    "cancelled": "✕",
    "dropped": "◆",
}


def _colour(op: Operation) -> str:
    if op.status is None:
        return "#9e9e9e"
    if op.status // 100 == 2:
        return "#4caf50"
    if op.status // 100 == 4:
        return "#ff9800"
    return "#e53935"


def _context(finding: Finding, history: Sequence[Operation]) -> list[Operation]:
    """The finding's window, plus every operation of its session that overlaps it."""
    start = min(op.invoke for op in finding.window)
    end = max((op.complete or op.invoke) for op in finding.window)
    ids = {op.id for op in finding.window}
    return sorted(
        (
            op
            for op in history
            if op.session == finding.session
            and (op.id in ids or (op.invoke <= end and (op.complete or end) >= start))
        ),
        key=lambda op: op.invoke,
    )


def _rows(ops: Sequence[Operation], end: float) -> dict[int, int]:
    """Operation id -> its row: each client's lane split into as many rows as its
    operations overlap (an operation never completed runs to the end)."""
    rows: dict[int, int] = {}
    next_row = 0
    for client in sorted({op.client for op in ops}):
        busy_until: list[float] = []  # per row of this client: when it is free again
        for op in sorted((o for o in ops if o.client == client), key=lambda o: o.invoke):
            finish = op.complete if op.complete is not None else end
            row = next((i for i, free in enumerate(busy_until) if free <= op.invoke), None)
            if row is None:
                busy_until.append(finish)
                row = len(busy_until) - 1
            else:
                busy_until[row] = finish
            rows[op.id] = next_row + row
        next_row += max(1, len(busy_until))
    return rows


def _svg(ops: Sequence[Operation], highlighted: set[int]) -> str:
    start = min(op.invoke for op in ops)
    ends = [op.complete for op in ops if op.complete is not None]
    ends += [e.at for op in ops for e in op.upstream]
    end = max([*ends, start + 1e-3])
    scale = (WIDTH - LEFT - 20) / (end - start)
    rows = _rows(ops, end)
    # Operations never completed are drawn first, under the ones that were.
    ordered = sorted(ops, key=lambda op: (op.complete is not None, op.invoke))

    def x(t: float) -> float:
        return LEFT + (t - start) * scale

    height = ROW_HEIGHT * (max(rows.values()) + 1) + 10 + AXIS
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}">']
    first_row: dict[int, int] = {}
    for op in ops:
        first_row[op.client] = min(first_row.get(op.client, rows[op.id]), rows[op.id])
    for client, row in sorted(first_row.items()):
        parts.append(
            f'<text x="4" y="{row * ROW_HEIGHT + 26}" font-size="12">client {client}</text>'
        )
    axis_top = height - AXIS
    for tick in range(TICKS):
        t = start + (end - start) * tick / (TICKS - 1)
        tx = x(t)
        # The end ticks' labels stay inside the drawing.
        anchor = "start" if tick == 0 else "end" if tick == TICKS - 1 else "middle"
        parts.append(
            f'<line x1="{tx:.1f}" y1="6" x2="{tx:.1f}" y2="{axis_top + 4}" stroke="#ddd"/>'
            f'<text x="{tx:.1f}" y="{axis_top + 18}" font-size="10" text-anchor="{anchor}" '
            f'class="tick">+{(t - start) * 1000:.1f} ms</text>'
        )
    for row in range(max(rows.values()) + 1):
        y = row * ROW_HEIGHT + 10
        parts.append(
            f'<line x1="{LEFT}" y1="{y + 24}" x2="{WIDTH - 10}" y2="{y + 24}" stroke="#eee"/>'
        )
    for op in ordered:
        y = rows[op.id] * ROW_HEIGHT + 10
        left = x(op.invoke)
        right = x(op.complete) if op.complete is not None else WIDTH - 20
        stroke = ' stroke="#000" stroke-width="2"' if op.id in highlighted else ""
        if op.complete is None:  # never completed: an open, dashed bar
            stroke = stroke or ' stroke="#555" stroke-width="1"'
        dash = ' stroke-dasharray="4 2"' if op.complete is None else ""
        label = html.escape(f"#{op.id} {op.op} {op.status if op.status is not None else '?'}")
        title = html.escape(op.describe())
        parts.append(
            f'<g class="op" data-id="{op.id}" data-row="{rows[op.id]}"><title>{title}</title>'
            f'<rect x="{left:.1f}" y="{y}" '
            f'width="{max(2.0, right - left):.1f}" height="18" rx="3" fill="{_colour(op)}" '
            f'fill-opacity="0.75"{stroke}{dash}/>'
            f'<text x="{left + 3:.1f}" y="{y + 13}" font-size="11">{label}</text></g>'
        )
        for event in op.upstream:
            mark = EVENT_MARKS.get(event.kind, "?")
            parts.append(
                f'<text x="{x(event.at) - 4:.1f}" y="{y + 30}" font-size="10">'
                f"<title>upstream {html.escape(event.kind)} at {event.at:.4f}</title>{mark}</text>"
            )
    parts.append(
        f'<text x="{WIDTH - 160}" y="{height - 2}" font-size="10">time since the first '
        "operation shown</text></svg>"
    )
    return "".join(parts)


@dataclass(frozen=True)
class ShrunkLink:
    """The scenario a finding was shrunk to: where it was written, and how to replay it."""

    finding: Finding
    path: str
    replay: str | None


def render_timeline(
    result: CheckResult,
    history: Sequence[Operation],
    max_findings: int = 10,
    shrunk: ShrunkLink | None = None,
) -> str:
    findings = result.findings
    sections = []
    for number, finding in enumerate(findings[:max_findings], start=1):
        ops = _context(finding, history)
        highlighted = {op.id for op in finding.window}
        sections.append(
            f'<h2 id="finding-{number}">{number}. {html.escape(finding.kind)} in session '
            f"<code>{html.escape(finding.session)}</code></h2>"
            f"<p>{html.escape(finding.explanation)}</p>{_shrunk_note(finding, shrunk)}"
            f"{_svg(ops, highlighted)}"
        )
    legend = (
        "bars: green 2xx, orange 4xx, red 5xx, grey unknown outcome (dashed: never "
        "completed); outlined: the operations that show the problem; a client's "
        "operations that overlap in time get rows of their own. Upstream events: "
        "▲ received, · a chunk sent, ● answered, ✕ cancelled (the server hung up), "
        "◆ dropped (reset)."
    )
    drawn = min(len(findings), max_findings)
    note = listing = ""
    if findings:
        more = (
            f"the first {drawn} are drawn below, and all {len(findings)} are "
            f'<a href="#all-findings">listed at the end</a>'
            if len(findings) > drawn
            else 'all are drawn below and <a href="#all-findings">listed at the end</a>'
        )
        note = f"<p class='count'>{len(findings)} finding(s): {more}.</p>"
        rows = "".join(
            f"<tr><td>{_link(number, drawn)}</td><td>{html.escape(f.kind)}</td>"
            f"<td><code>{html.escape(f.session)}</code></td><td>{html.escape(f.explanation)}"
            f"</td></tr>"
            for number, f in enumerate(findings, start=1)
        )
        listing = (
            f'<h2 id="all-findings">All {len(findings)} finding(s)</h2>'
            f'<table class="findings"><tr><th>#</th><th>kind</th><th>session</th>'
            f"<th>what happened</th></tr>{rows}</table>"
        )
    top = _shrunk_note(None, shrunk)
    body = note + "".join(sections) + listing or "<p>No findings: the history is valid.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sessctl chaos timeline</title>"
        "<style>body{font-family:sans-serif;margin:20px} code{font-size:90%} "
        "table.findings{border-collapse:collapse} table.findings td,table.findings th"
        "{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}</style>"
        f"</head><body><h1>sessctl chaos: {html.escape(result.verdict)}</h1>"
        f"<p>{result.operations} operations in {result.sessions} sessions. {legend}</p>"
        f"{top}{body}</body></html>"
    )


def _link(number: int, drawn: int) -> str:
    return f'<a href="#finding-{number}">{number}</a>' if number <= drawn else str(number)


def _shrunk_note(finding: Finding | None, shrunk: ShrunkLink | None) -> str:
    """Under the finding that was shrunk (or, with ``finding`` None, at the top):
    its scenario file and the command that replays it."""
    if shrunk is None or (finding is not None and finding != shrunk.finding):
        return ""
    replay = (
        f" Replay: <code class='replay'>{html.escape(shrunk.replay)}</code>"
        if shrunk.replay
        else ""
    )
    what = (
        "This finding was" if finding is not None else f"A {html.escape(shrunk.finding.kind)} was"
    )
    return (
        f"<p class='shrunk'>{what} shrunk to a scenario: "
        f'<a href="{html.escape(shrunk.path)}">{html.escape(shrunk.path)}</a>.{replay}</p>'
    )


def finding_drawing(finding: Finding, history: Sequence[Operation]) -> str:
    """One finding's window drawn as an SVG timeline, for pages of other reports."""
    return _svg(_context(finding, history), {op.id for op in finding.window})
