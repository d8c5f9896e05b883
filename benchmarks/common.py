"""What the benchmark scripts share: sessctl in a child process, and percentiles."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each while the block runs: a loaded CI
    machine, beside which a verdict must not flip."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@dataclass(frozen=True)
class Child:
    url: str
    """The last word of the line that announced it."""
    pid: int


@contextmanager
def sessctl_process(
    *args: str,
    url_prefix: str,
    launcher: tuple[str, ...] = ("-m", "sessctl"),
    code: Path | None = None,
) -> Iterator[Child]:
    """Start ``sessctl ARGS`` (``launcher``: how python runs it); yield once it
    prints a line starting with url_prefix. ``code``: a checkout whose sessctl runs
    instead of this one's (a baseline revision's worktree)."""
    # SESSCTL_BENCH_LOGS=DIR keeps each child's log (stderr) in DIR, named by its command.
    logs = os.environ.get("SESSCTL_BENCH_LOGS")
    stderr: Any = subprocess.DEVNULL
    if logs:
        stderr = open(Path(logs) / f"{args[0]}-{time.time_ns()}.log", "w")  # noqa: SIM115
    env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen(
        [sys.executable, *launcher, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=code,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    try:
        for line in stdout:
            if line.startswith(url_prefix):
                # Keep draining: a child whose output fills the pipe blocks.
                threading.Thread(target=lambda: [*stdout], daemon=True).start()
                yield Child(line.rsplit(" ", 1)[-1].strip(), proc.pid)
                return
        raise SystemExit(f"sessctl {' '.join(args)} exited before it was ready")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def worktree_at(revision: str) -> Iterator[Path]:
    """This repository's code at git ``revision``, checked out in a temporary
    worktree for the block (a baseline measured side by side), then removed."""
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), revision],
            check=True,
            capture_output=True,
        )
        try:
            yield worktree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                check=False,
                capture_output=True,
            )


def json_from_code(code: Path, snippet: str, *args: str) -> dict[str, Any]:
    """Run ``snippet`` (Python, with ``args`` as its argv) against the code at ``code``
    (this checkout, or a baseline's worktree) in a process of its own; the JSON object
    it printed last."""
    done = subprocess.run(
        [sys.executable, "-c", snippet, *args],
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def run_beside_baseline(
    main: Callable[[argparse.Namespace, Path | None], Awaitable[int]], args: argparse.Namespace
) -> int:
    """``main(args, worktree)`` under trio: the worktree of ``args.baseline_rev`` when
    one was asked for (a baseline measured side by side), else None."""
    import trio

    if not args.baseline_rev:
        return trio.run(main, args, None)
    with worktree_at(args.baseline_rev) as worktree:
        return trio.run(main, args, worktree)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_sessctl(*args: str) -> tuple[int, str, float]:
    """``sessctl ARGS`` to its end: its exit status, its output, and the seconds it took."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", *args], capture_output=True, text=True, check=False
    )
    return done.returncode, done.stdout, time.perf_counter() - started
