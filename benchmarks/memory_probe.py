"""What each held turn's memory is: ``tracemalloc`` in a server holding turns,
and pymalloc's own accounts in a second server holding the same.

    python benchmarks/memory_probe.py [--turns 1000] [--top 25]

Each server (``sessctl serve``, default settings) runs under this script's
``--serve`` mode, and on SIGUSR1 writes what it is asked to keep. The first
starts ``tracemalloc`` (one frame per allocation, so the cost is small and each
block is attributed to the line that allocated it) and writes a snapshot. The
second runs untraced, as users run it (``tracemalloc`` replaces the allocator,
and pymalloc then reports nothing), and writes ``sys._debugmallocstats()`` and
its RSS. The driver, with a chaos upstream for each server in a process of its
own: a reading of the idle server, ``--turns`` chats held at the upstream on
their own sessions, a second reading; both servers in turn.

Reported, per held turn: the traced memory the turns added, by the source line
that allocated it (the largest ``--top``) and grouped by package; then the
untraced server's RSS, and what pymalloc's arenas (every object of up to 512
bytes) added: the objects in use, and the slack kept resident beside them (free
blocks and free pools in arenas that still hold a live object, which pymalloc
never returns: the ramp's short-lived objects leave it behind). The baselines
are each server's own idle reading, taken in the same process.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tracemalloc
from collections import defaultdict
from pathlib import Path
from types import FrameType

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from common import sessctl_process
from scale_bench import TAG, Level, rss_mb


def serve(readings: Path, traced: bool, argv: list[str]) -> None:
    """``sessctl serve`` that writes a reading on each SIGUSR1: a tracemalloc
    snapshot (``traced``), else pymalloc's statistics and the RSS."""
    from sessctl.cli import app

    if traced:
        tracemalloc.start(1)
    taken = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        target = readings / f"{taken}.reading"
        temporary = target.with_suffix(".tmp")
        if traced:
            tracemalloc.take_snapshot().dump(str(temporary))
        else:
            write_pymalloc_stats(temporary)
            with temporary.open("a") as out:
                out.write(f"\nRSS MB = {rss_mb(os.getpid())}\n")
        temporary.replace(target)

    signal.signal(signal.SIGUSR1, on_signal)
    app(argv, prog_name="sessctl")


def write_pymalloc_stats(path: Path) -> None:
    """``sys._debugmallocstats()`` into ``path``: it writes to the C-level stderr only."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("w") as out:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


UNTRACED_FIGURES = {
    "RSS": re.compile(r"RSS MB = ([\d.]+)"),
    "pymalloc: objects in use": re.compile(r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
    "pymalloc: free blocks in used pools": re.compile(
        r"# bytes in available blocks\s*=\s*([\d,]+)"
    ),
    "pymalloc: free pools in used arenas": re.compile(r"unused pools \* \d+ bytes\s*=\s*([\d,]+)"),
    "pymalloc: pool headers, rounding, arena alignment": re.compile(
        r"# bytes lost to (?:pool headers|quantization|arena alignment)\s*=\s*([\d,]+)"
    ),
}


def untraced_figures(text: str) -> dict[str, float]:
    """A reading of the untraced server, in bytes."""
    figures: dict[str, float] = {}
    for name, pattern in UNTRACED_FIGURES.items():
        found = pattern.findall(text)
        if not found:
            raise SystemExit(f"no {name!r} in the server's reading: {text[:300]!r}")
        figures[name] = sum(float(value.replace(",", "")) for value in found)
    figures["RSS"] *= 1024 * 1024
    return figures


async def reading(pid: int, readings: Path, number: int) -> Path:
    os.kill(pid, signal.SIGUSR1)
    path = readings / f"{number}.reading"
    while not await trio.Path(path).exists():  # noqa: ASYNC110 (another process writes it)
        await trio.sleep(0.05)
    return path


ROOT = Path(__file__).resolve().parent.parent


def package_of(filename: str) -> str:
    """The top-level package a traced file belongs to: this project's, or an installed
    one's (the standard library's by its module's file name)."""
    path = Path(filename)
    if "site-packages" in path.parts:  # before ROOT: a venv may sit inside the checkout
        rest = path.parts[path.parts.index("site-packages") + 1 :]
        return rest[0] if rest else filename
    if path.is_relative_to(ROOT):
        return path.relative_to(ROOT).parts[0]
    return path.name


SELF = str(Path(__file__).resolve())


async def hold(turns: int, traced: bool) -> tuple[Path, Path]:
    """One server's idle reading and its reading with ``turns`` turns held."""
    readings = Path(f"/tmp/sessctl-memory-{os.getpid()}-{'traced' if traced else 'untraced'}")
    await trio.Path(readings).mkdir(exist_ok=True)
    launcher = (SELF, "--serve", str(readings), "traced" if traced else "untraced")
    with (
        sessctl_process("upstream", "--listen", "127.0.0.1:0", url_prefix="chaos upstream") as up,
        sessctl_process(
            "serve", "--port", "0", "--upstream", up.url, "--no-access-log",
            url_prefix="sessctl reference server on", launcher=launcher,
        ) as served,
    ):  # fmt: skip
        upstream = up.url.removesuffix("/v1")
        limits = httpx.Limits(max_connections=turns + 16)
        timeout = httpx.Timeout(600.0, connect=60.0)
        async with (
            httpx.AsyncClient(base_url=served.url, timeout=timeout) as control,
            httpx.AsyncClient(base_url=served.url, limits=limits, timeout=timeout) as agents,
        ):
            run = Level(control, [agents], upstream)
            await control.post(f"{upstream}/_sessctl/steps/{TAG}", json={"script": ["hold"]})
            sessions = [await run.create() for _ in range(turns)]
            before = await reading(served.pid, readings, 1)
            async with trio.open_nursery() as nursery:
                for session_id in sessions:
                    nursery.start_soon(run.held_chat, session_id)
                # Polling another process: there is no event to wait on.
                while await run.received() < turns:  # noqa: ASYNC110
                    await trio.sleep(0.2)
                after = await reading(served.pid, readings, 2)
                for session_id in sessions:
                    await control.delete(f"/sessions/{session_id}")
    return before, after


async def main(args: argparse.Namespace) -> int:
    turns = args.turns
    before_path, after_path = await hold(turns, traced=True)
    before = tracemalloc.Snapshot.load(str(before_path))
    after = tracemalloc.Snapshot.load(str(after_path))
    idle_total = sum(stat.size for stat in before.statistics("filename"))
    lines = after.compare_to(before, "lineno")
    added = sum(stat.size_diff for stat in lines)
    print(
        f"{turns} held turns added {added / 1024 / turns:.1f} KB a turn of traced memory "
        f"(the idle server traced {idle_total / 1024 / 1024:.1f} MB in all)"
    )
    packages: dict[str, int] = defaultdict(int)
    for stat in lines:
        packages[package_of(stat.traceback[0].filename)] += stat.size_diff
    print("by package, per turn:")
    for name, size in sorted(packages.items(), key=lambda item: -item[1])[:12]:
        print(f"  {size / 1024 / turns:6.2f} KB  {name}")
    print(f"by line, per turn (the {args.top} largest):")
    for stat in lines[: args.top]:
        frame = stat.traceback[0]
        where = f"{package_of(frame.filename)}/{Path(frame.filename).name}:{frame.lineno}"
        print(
            f"  {stat.size_diff / 1024 / turns:6.2f} KB  {stat.count_diff / turns:5.1f} blocks  "
            f"{where}"
        )
    idle_path, held_path = await hold(turns, traced=False)
    idle = untraced_figures(idle_path.read_text())
    held = untraced_figures(held_path.read_text())
    print(f"the same {turns} turns on an untraced server, added per turn:")
    for name in UNTRACED_FIGURES:
        print(f"  {(held[name] - idle[name]) / 1024 / turns:6.2f} KB  {name}")
    slack = sum(held[name] - idle[name] for name in UNTRACED_FIGURES if "free" in name)
    print(
        f"  pymalloc's slack (free blocks and pools it keeps): {slack / 1024 / turns:.2f} KB "
        "a turn of the RSS"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), sys.argv[3] == "traced", sys.argv[4:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25)
    sys.exit(trio.run(main, parser.parse_args()))
