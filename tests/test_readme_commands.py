"""README's commands, run as a user runs them (subprocesses), and its quoted output checked
(and the output quoted in the pages of ``docs/`` it links to).

The walkthrough of "Seeing a failing report": a variant served by ``sessctl
serve``, raced by ``sessctl run-scenarios --target``. The matrix README quotes
for it must be what the run prints (with this run's port), so the README
cannot drift from the tool. (The "Validating your own server" walkthrough is
``tests/test_third_party.py``; chaos and check are ``tests/test_chaos.py``.)
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import HANG_GUARD, free_port, start_sessctl_serve

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ENV = {"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"}


def quoted_block(after: str, document: Path = README) -> list[str]:
    """The lines of the first plain code block after the line containing ``after``
    (in README, or a page of ``docs/``)."""
    lines = document.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    opening = next(i for i in range(start, len(lines)) if lines[i] == "```")
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    return lines[opening + 1 : closing]


def test_seeing_a_failing_report_as_the_readme_shows_it() -> None:
    port = free_port()
    server, url = start_sessctl_serve(
        "--upstream", f"http://127.0.0.1:{port}/v1", "--emulate", "split-lock",
        stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sessctl", "run-scenarios", "--target", url,
             "--upstream-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120, env=ENV,
        )  # fmt: skip
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=HANG_GUARD)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    shown = done.stdout.replace(url.removeprefix("http://"), "127.0.0.1:8000")
    quoted = quoted_block("commit of a split-lock server")
    # The header and the matrix, line for line (ids and timings differ run to run).
    matrix = [line.rstrip() for line in quoted[:6]]
    printed = [line.rstrip() for line in shown.splitlines()]
    assert matrix[0] in printed, shown
    start = printed.index(matrix[0])
    assert printed[start : start + 6] == matrix, shown
    for finding in ("a phantom commit", "expected exactly one of c1, c2 gets 200"):
        assert finding in shown
    assert re.search(
        r"reproduce: sessctl run-scenarios --filter concurrent-writers-no-phantom --target "
        r"http://127\.0\.0\.1:8000",
        shown,
    )


def test_the_passing_report_as_the_readme_shows_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", "run-scenarios", "--filter", "delete-mid-proxy"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    quoted = [line.rstrip() for line in quoted_block("marks an expected cell")]
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    start = printed.index(quoted[0])
    assert printed[start : start + len(quoted)] == quoted


def test_the_streamed_failure_report_as_the_streaming_page_shows_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", "run-scenarios", "--emulate", "commit-partial-stream",
         "--filter", "upstream-cut-mid-stream"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    quoted = [
        line.rstrip()
        for line in quoted_block("commits the partial answer when", DOCS / "streaming.md")
    ]
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    # The header and the matrix, line for line; then the findings and the summary.
    start = printed.index(quoted[0])
    assert printed[start : start + 9] == quoted[:9]
    for line in quoted[9:]:
        if "..." not in line and "curl" not in line:
            assert line in printed, line
    assert any(line.startswith("      curl -sS -N -X POST http://127.0.0.1:") for line in printed)
