"""An HTML timeline of the failing windows of a checked history.

One section per finding: one lane per client, each operation of the session
as a bar from its invocation to its completion (open-ended when the outcome
is unknown), coloured by outcome, with the upstream's events marked on it.
A single self-contained file with inline SVG: no scripts, nothing to fetch.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from harness.chaos.history import Operation
from harness.chaos.linearizability import CheckResult, Finding

LANE_HEIGHT = 34
LEFT = 90
WIDTH = 960
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


def _svg(ops: Sequence[Operation], highlighted: set[int]) -> str:
    clients = sorted({op.client for op in ops})
    lane = {client: index for index, client in enumerate(clients)}
    start = min(op.invoke for op in ops)
    ends = [op.complete for op in ops if op.complete is not None]
    ends += [e.at for op in ops for e in op.upstream]
    end = max([*ends, start + 1e-3])
    scale = (WIDTH - LEFT - 20) / (end - start)

    def x(t: float) -> float:
        return LEFT + (t - start) * scale

    height = LANE_HEIGHT * len(clients) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}">']
    for client, index in lane.items():
        y = index * LANE_HEIGHT + 10
        parts.append(f'<text x="4" y="{y + 16}" font-size="12">client {client}</text>')
        parts.append(
            f'<line x1="{LEFT}" y1="{y + 24}" x2="{WIDTH - 10}" y2="{y + 24}" stroke="#eee"/>'
        )
    for op in ops:
        y = lane[op.client] * LANE_HEIGHT + 10
        left = x(op.invoke)
        right = x(op.complete) if op.complete is not None else WIDTH - 20
        stroke = ' stroke="#000" stroke-width="2"' if op.id in highlighted else ""
        if op.complete is None:  # never completed: an open, dashed bar
            stroke = stroke or ' stroke="#555" stroke-width="1"'
        dash = ' stroke-dasharray="4 2"' if op.complete is None else ""
        label = html.escape(f"#{op.id} {op.op} {op.status if op.status is not None else '?'}")
        title = html.escape(op.describe())
        parts.append(
            f'<g><title>{title}</title><rect x="{left:.1f}" y="{y}" '
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
    axis_y = height - 6
    parts.append(
        f'<text x="{LEFT}" y="{axis_y}" font-size="10">+0 ms</text>'
        f'<text x="{WIDTH - 80}" y="{axis_y}" font-size="10">+{(end - start) * 1000:.1f} ms</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def render_timeline(
    result: CheckResult, history: Sequence[Operation], max_findings: int = 10
) -> str:
    sections = []
    for number, finding in enumerate(result.findings[:max_findings], start=1):
        ops = _context(finding, history)
        highlighted = {op.id for op in finding.window}
        sections.append(
            f"<h2>{number}. {html.escape(finding.kind)} in session "
            f"<code>{html.escape(finding.session)}</code></h2>"
            f"<p>{html.escape(finding.explanation)}</p>{_svg(ops, highlighted)}"
        )
    legend = (
        "bars: green 2xx, orange 4xx, red 5xx, grey unknown outcome (dashed: never "
        "completed); outlined: the operations that show the problem. Upstream events: "
        "▲ received, · a chunk sent, ● answered, ✕ cancelled (the server hung up), "
        "◆ dropped (reset)."
    )
    body = "".join(sections) or "<p>No findings: the history is valid.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sessctl chaos timeline</title>"
        "<style>body{font-family:sans-serif;margin:20px} code{font-size:90%}</style></head>"
        f"<body><h1>sessctl chaos: {html.escape(result.verdict)}</h1>"
        f"<p>{result.operations} operations in {result.sessions} sessions. {legend}</p>"
        f"{body}</body></html>"
    )
