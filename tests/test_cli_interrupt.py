"""Ctrl-C stops a long command, every time, with exit 130; a chaos run shows its progress.

SIGINT used to reach trio as a ``KeyboardInterrupt`` raised wherever Python was,
and once in 17 tries that was a weakref callback, where Python drops it: the run
went on and ended VALID. Now a task of the run receives it (``sessctl/interrupt.py``).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import trio

SLOW_GUARD = 60.0
"""Bounds a test that waits on a child process; never a verdict on its speed."""


async def _start_chaos() -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "sessctl", "chaos", "--ops", "200000", "--no-shrink"],
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


async def test_ctrl_c_stops_chaos_mid_run_with_exit_130_each_time() -> None:
    for _ in range(3):
        process = await _start_chaos()
        seen = bytearray()
        with trio.fail_after(SLOW_GUARD):
            # The progress line counts operations as they finish: the run is under way.
            await _read_until(process, b"ops/s", seen)
            process.send_signal(signal.SIGINT)
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some():
                seen.extend(chunk)
            code = await process.wait()
        out = seen.decode(errors="replace")
        assert code == 130, out
        assert "interrupted" in out
        assert "Traceback" not in out
        assert "VALID" not in out
