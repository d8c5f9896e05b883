"""``sessctl`` with its garbage collections recorded: a child of ``scale_bench.py --gc``.

    python benchmarks/gc_probe.py REPORT_PATH serve --port 0 ...

Runs the CLI as ``python -m sessctl`` would, with a ``gc.callbacks`` hook that
times every collection. On SIGUSR1 it writes to REPORT_PATH (JSON) the
collections since the last report (per generation: how many, their total and
longest time), then the tracked objects and the time of one full collection
run there and then. Nothing in sessctl itself is changed.

What it showed (docs/benchmarks.md, "Garbage collection at scale"): at 9,790 held
turns a full collection takes about a second, and CPython runs one whenever its
oldest generation has grown by a quarter: 16 of them on the way there. What
``sessctl serve`` does about it is ``refserver/collector.py`` (full collections
only in a lull; what grows old frozen meanwhile). Not tried: fewer tracked
objects per held turn (about 170; every frame, task, cancel scope and h11 state
counts), Python 3.14's incremental collector, several server processes.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessctl.cli import app

pauses: list[tuple[int, float]] = []
"""(generation, seconds) of each collection since the last report."""
_started = 0.0


def _timed(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
    else:
        pauses.append((int(info["generation"]), time.perf_counter() - _started))


def _report(path: Path) -> None:
    generations: dict[str, dict[str, float]] = {}
    for generation, seconds in pauses:
        row = generations.setdefault(str(generation), {"count": 0, "total_s": 0.0, "max_s": 0.0})
        row["count"] += 1
        row["total_s"] += seconds
        row["max_s"] = max(row["max_s"], seconds)
    pauses.clear()
    gc.callbacks.remove(_timed)  # the forced collection is reported apart
    started = time.perf_counter()
    gc.collect()
    full_s = time.perf_counter() - started
    gc.callbacks.append(_timed)
    tracked = len(gc.get_objects()) + gc.get_freeze_count()  # frozen ones are not listed
    report = {"collections": generations, "tracked": tracked, "full_s": full_s}
    written = path.with_suffix(".tmp")
    written.write_text(json.dumps(report))
    written.replace(path)  # whole, or not there yet, for the reader polling it


def main() -> None:
    path = Path(sys.argv[1])
    gc.callbacks.append(_timed)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _report(path)

    signal.signal(signal.SIGUSR1, on_signal)
    app(sys.argv[2:], prog_name="sessctl")


if __name__ == "__main__":
    main()
