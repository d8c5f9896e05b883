"""``memory_probe.py`` reads pymalloc's own accounts from ``sys._debugmallocstats()``,
text CPython prints for people: a release that rewords it must fail here, by the
figure's name, not leave the probe printing zeros."""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

# benchmarks/ is scripts, not a package: found by path.
memory_probe = import_module("memory_probe")


def test_every_figure_is_read_from_this_pythons_statistics(tmp_path: Path) -> None:
    reading = tmp_path / "reading"
    kept = [bytes(40) + bytes([n % 256]) for n in range(20_000)]  # small objects, in use
    memory_probe.write_pymalloc_stats(reading)
    with reading.open("a") as out:
        out.write("\nRSS MB = 12.5\n")
    figures = memory_probe.untraced_figures(reading.read_text())
    assert set(figures) == set(memory_probe.UNTRACED_FIGURES)
    assert figures["pymalloc: objects in use"] > 20_000 * 64  # at least the kept objects
    assert figures["RSS"] == 12.5 * 1024 * 1024
    assert kept


def test_a_reading_without_a_figure_says_which() -> None:
    with pytest.raises(SystemExit, match="pymalloc: objects in use"):
        memory_probe.untraced_figures("RSS MB = 1\n")
