"""What each held turn's memory is: ``tracemalloc`` in a server holding turns.

    python benchmarks/memory_probe.py [--turns 1000] [--top 25]

The server (``sessctl serve``, default settings) runs under this script's
``--serve`` mode, which starts ``tracemalloc`` (one frame per allocation, so
the cost is small and each block is attributed to the line that allocated it)
and, on SIGUSR1, writes a snapshot. The driver, with the chaos upstream in a
process of its own: a snapshot of the idle server, ``--turns`` chats held at the
upstream on their own sessions, a second snapshot. Reported: the memory the
held turns added, per turn, by the source line that allocated it (the largest
``--top``), and grouped by package; the baseline is the idle server's own
traced total, measured side by side in the same process.
"""

from __future__ import annotations

import argparse
import os
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
from scale_bench import TAG, Level


def serve(snapshots: Path, argv: list[str]) -> None:
    from sessctl.cli import app

    tracemalloc.start(1)
    taken = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        target = snapshots / f"{taken}.snapshot"
        tracemalloc.take_snapshot().dump(str(target.with_suffix(".tmp")))
        target.with_suffix(".tmp").replace(target)

    signal.signal(signal.SIGUSR1, on_signal)
    app(argv, prog_name="sessctl")


async def snapshot(pid: int, snapshots: Path, number: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = trio.Path(snapshots / f"{number}.snapshot")
    while not await path.exists():  # noqa: ASYNC110 (another process writes it)
        await trio.sleep(0.05)
    return tracemalloc.Snapshot.load(str(path))


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


async def main(args: argparse.Namespace) -> int:
    snapshots = Path(f"/tmp/sessctl-memory-{os.getpid()}")
    await trio.Path(snapshots).mkdir(exist_ok=True)
    launcher = (SELF, "--serve", str(snapshots))
    with (
        sessctl_process("upstream", "--listen", "127.0.0.1:0", url_prefix="chaos upstream") as up,
        sessctl_process(
            "serve", "--port", "0", "--upstream", up.url, "--no-access-log",
            url_prefix="sessctl reference server on", launcher=launcher,
        ) as served,
    ):  # fmt: skip
        upstream = up.url.removesuffix("/v1")
        limits = httpx.Limits(max_connections=args.turns + 16)
        timeout = httpx.Timeout(600.0, connect=60.0)
        async with (
            httpx.AsyncClient(base_url=served.url, timeout=timeout) as control,
            httpx.AsyncClient(base_url=served.url, limits=limits, timeout=timeout) as agents,
        ):
            run = Level(control, [agents], upstream)
            await control.post(f"{upstream}/_sessctl/steps/{TAG}", json={"script": ["hold"]})
            sessions = [await run.create() for _ in range(args.turns)]
            before = await snapshot(served.pid, snapshots, 1)
            async with trio.open_nursery() as nursery:
                for session_id in sessions:
                    nursery.start_soon(run.held_chat, session_id)
                # Polling another process: there is no event to wait on.
                while await run.received() < args.turns:  # noqa: ASYNC110
                    await trio.sleep(0.2)
                after = await snapshot(served.pid, snapshots, 2)
                for session_id in sessions:
                    await control.delete(f"/sessions/{session_id}")
    idle_total = sum(stat.size for stat in before.statistics("filename"))
    lines = after.compare_to(before, "lineno")
    added = sum(stat.size_diff for stat in lines)
    turns = args.turns
    print(
        f"{turns} held turns added {added / 1024 / turns:.1f} KB a turn of traced memory "
        f"(the idle server traced {idle_total / 1024 / 1024:.1f} MB in all; the process's "
        "RSS per turn is higher: the allocator's own overhead and fragmentation)"
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
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), sys.argv[3:])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25)
    sys.exit(trio.run(main, parser.parse_args()))
