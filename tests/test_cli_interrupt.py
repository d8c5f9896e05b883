"""Ctrl-C stops a long command, every time, with exit 130; a chaos run shows its progress.

SIGINT used to reach trio as a ``KeyboardInterrupt`` raised wherever Python was,
and once in 17 tries that was a weakref callback, where Python drops it: the run
went on and ended VALID. Now a task of the run receives it (``sessctl/interrupt.py``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

SLOW_GUARD = 60.0
"""Bounds a test that waits on a child process; never a verdict on its speed."""


async def _start(*args: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "sessctl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # A terminal as rich sees one, so the progress line is drawn.
        env={"PATH": "/usr/bin:/bin", "TTY_COMPATIBLE": "1", "COLUMNS": "120"},
    )


async def _read_until(process: trio.Process, wanted: bytes, seen: bytearray) -> None:
    assert process.stdout is not None
    while wanted not in seen:
        chunk = await process.stdout.receive_some()
        assert chunk, f"the output ended before {wanted!r}: {seen.decode(errors='replace')}"
        seen.extend(chunk)


async def _interrupt(process: trio.Process, after: bytes, times: int) -> tuple[int, str]:
    seen = bytearray()
    with trio.fail_after(SLOW_GUARD):
        await _read_until(process, after, seen)
        process.send_signal(signal.SIGINT)
        if times == 2:
            # The second once the first is taken (two at once may arrive as one).
            await _read_until(process, b"stopping:", seen)
            process.send_signal(signal.SIGINT)
        assert process.stdout is not None
        while chunk := await process.stdout.receive_some():
            seen.extend(chunk)
        code = await process.wait()
    return code, seen.decode(errors="replace")


async def test_a_second_ctrl_c_stops_chaos_at_once_with_exit_130_each_time() -> None:
    for _ in range(3):
        process = await _start("chaos", "--ops", "200000", "--no-shrink")
        # The progress line counts operations as they finish: the run is under way.
        code, out = await _interrupt(process, b"ops/s", times=2)
        # Stopped, whether the second Ctrl-C came before the history was checked
        # or after: never a run that goes on and exits 0.
        assert code == 130, out
        assert "interrupted" in out
        assert "Traceback" not in out


async def test_one_ctrl_c_stops_chaos_gracefully_and_writes_its_reports(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    process = await _start("chaos", "--ops", "200000", "--no-shrink", "--out", str(out_dir))
    code, out = await _interrupt(process, b"ops/s", times=1)
    assert code == 130, out
    assert "stopping: nothing new starts" in out
    assert "interrupted: the" in out
    assert "operations that ran were checked" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["operations"] > 0
    assert (out_dir / "timeline.html").exists()
    assert "Traceback" not in out


async def test_one_ctrl_c_stops_run_scenarios_with_the_runs_that_finished(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    process = await _start("run-scenarios", "--repeat", "50", "--json", str(report))
    # The progress bar names each run as it finishes: some have.
    code, out = await _interrupt(process, b" pass", times=1)
    assert code == 130, out
    assert "interrupted: the reports hold the" in out
    document = json.loads(report.read_text())
    assert document["summary"]["interrupted"] is True
    assert document["summary"]["failed"] == 0
