"""The chaos timeline as a browser shows it: headless Chromium's screenshots, read pixel by
pixel, not only the HTML.

Marked ``browser`` and left out of the default run (a fresh machine has no
Chromium); ``.ci/run`` installs Debian's Chromium and runs ``pytest -m browser``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness.chaos.history import Operation
from harness.chaos.linearizability import CheckResult, Finding
from harness.report.timeline import render_timeline

pytestmark = pytest.mark.browser

WHITE = (255, 255, 255)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "these tests need Chromium: apt-get install chromium (.ci/run does)"
    return found


def screenshot(page: Path, out: Path, width: int, height: int) -> Image.Image:
    """``page`` as headless Chromium draws it at 1 px per CSS px (flags as this
    machine's notes give them: no network, no first-run work)."""
    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={out.parent / 'profile'}", "--hide-scrollbars",
         "--force-device-scale-factor=1", f"--window-size={width},{height}",
         f"--screenshot={out}", page.as_uri()],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return Image.open(out).convert("RGB")


def rgb(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    pixel = image.getpixel((x, y))
    assert isinstance(pixel, tuple)
    return pixel[0], pixel[1], pixel[2]


def blend(hex_colour: str, opacity: float = 0.75) -> tuple[int, int, int]:
    """A bar's fill as drawn over the white page."""
    rgb = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    r, g, b = (round(c * opacity + 255 * (1 - opacity)) for c in rgb)
    return r, g, b


def close(seen: tuple[int, ...], wanted: tuple[int, int, int], slack: int = 12) -> bool:
    return all(abs(a - b) <= slack for a, b in zip(seen[:3], wanted, strict=True))


def test_a_chaos_runs_timeline_shows_its_findings_and_their_bars(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", "chaos", "--emulate", "split-lock", "--ops", "3000",
         "--no-shrink", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    # The first screenful: the count of findings, then the first drawings.
    image = screenshot(out / "timeline.html", tmp_path / "page.png", 1000, 1200)
    width, height = image.size
    colours = [rgb(image, x, y) for x in range(0, width, 2) for y in range(0, height, 2)]
    # Text (the headline, the list of findings, the axes) and green 2xx bars are drawn.
    assert sum(1 for c in colours if max(c) < 80) > 500
    assert sum(1 for c in colours if close(c, blend("#4caf50"))) > 200


def test_no_completed_bar_is_hidden_behind_one_that_never_completed(tmp_path: Path) -> None:
    ops = [Operation(0, 0, "create", "s", 0.0, 0.001, 201)]
    # Client 1's GET never completes; its next operations run beside it, and
    # client 2's overlaps them all.
    for n, (client, start, end, status) in enumerate(
        [(1, 0.002, None, None), (1, 0.004, 0.006, 200), (1, 0.007, 0.009, 404),
         (2, 0.003, 0.008, 200)],
        start=1,
    ):  # fmt: skip
        ops.append(Operation(n, client, "get", "s", start, end, status))
    finding = Finding("linearizability", "s", "every operation of the session", tuple(ops))
    page = render_timeline(CheckResult("invalid", len(ops), 1, [finding]), ops)
    # One drawing alone at the page's corner: its SVG coordinates are pixels.
    svg = page[page.index("<svg") : page.index("</svg>") + 6]
    html = tmp_path / "drawing.html"
    html.write_text(f"<!doctype html><html><body style='margin:0'>{svg}</body></html>")
    image = screenshot(html, tmp_path / "drawing.png", 960, 400)
    bars = re.findall(
        r'<rect x="([\d.]+)" y="(\d+)" width="([\d.]+)" height="18" rx="3" fill="(#[0-9a-f]{6})"',
        svg,
    )
    completed = [(float(x), int(y), float(w), c) for x, y, w, c in bars if c != "#9e9e9e"]
    assert len(completed) == 4  # the create, and the three that completed
    for x, y, w, fill in completed:
        # Inside the bar, right of its label and inside its outline: its own colour.
        seen = rgb(image, int(x + w - 4), y + 16)
        assert close(seen, blend(fill)), (x, y, w, fill, seen)
