"""Trust on a tree: the fixed tree test server never FAILs, and its histories stay valid, loaded.

    python benchmarks/tree_loaded.py [--repeat 10] [--chaos-runs 20] [--chaos-ops 2000]

``tests/tree_server.py`` (without its planted bug) runs in its own process;
two CPU-bound processes (one per core of this machine) run beside
``sessctl run-scenarios --profile tree-turns --repeat N`` and beside
``sessctl chaos --profile tree-turns`` runs of 2,000 operations, one per seed.
Every run must be without FAIL and ERROR, and every history valid: the tree
model (branches, unknown outcomes, reads of a turns route that are two
requests) must not turn a busy machine into a false alarm. The same server
with its bug is run once more, for the other side: the library must FAIL on
the planted bug and nothing else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import run_sessctl

ROOT = Path(__file__).resolve().parent.parent
SERVE = """
import sys, trio
from functools import partial
from refserver.server import serve_asgi
from tests.conftest import free_port
from tests.tree_server import create_tree_app

async def main():
    port = free_port()
    app = create_tree_app(f"http://127.0.0.1:{port}/v1", fixed=sys.argv[1] == "fixed")
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
        print(url, port, flush=True)

trio.run(main)
"""
HOG = "while True: pass"


@contextmanager
def tree_server(kind: str) -> Iterator[list[str]]:
    """The server, and the options that point sessctl at it under its profile."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, kind], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        url, port = process.stdout.readline().split()
        yield ["--target", url, "--upstream-listen", f"127.0.0.1:{port}", "--profile", "tree-turns"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(args: argparse.Namespace) -> int:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
        try:
            with tree_server("fixed") as target:
                code, _, seconds = run_sessctl(
                    "run-scenarios", *target, "--repeat", str(args.repeat), "--quiet",
                    "--json", str(report),
                )  # fmt: skip
                summary = json.loads(report.read_text())["summary"]
                print(
                    f"fixed, under load, run-scenarios --repeat {args.repeat}: exit {code} in "
                    f"{seconds:.1f} s; failed {summary['failed']}, errors {summary['errors']}"
                )
                ok &= code == 0 and summary["failed"] == 0 and summary["errors"] == 0
                verdicts: list[str] = []
                started = time.perf_counter()
                for seed in range(1, args.chaos_runs + 1):
                    code, out, _ = run_sessctl(
                        "chaos", *target, "--ops", str(args.chaos_ops), "--seed", str(seed)
                    )
                    verdict = "valid" if code == 0 else "INVALID" if code == 1 else f"exit {code}"
                    verdicts.append(verdict)
                    if code != 0:
                        print(f"  seed {seed}: {verdict}\n{out}")
                valid = verdicts.count("valid")
                print(
                    f"fixed, under load, {args.chaos_runs} chaos runs of {args.chaos_ops} "
                    f"operations: {valid} valid, {args.chaos_runs - valid} not, in "
                    f"{time.perf_counter() - started:.1f} s"
                )
                ok &= valid == args.chaos_runs
        finally:
            for hog in hogs:
                hog.kill()
        with tree_server("buggy") as target:
            code, _, _ = run_sessctl("run-scenarios", *target, "--json", str(report))
            scenarios = json.loads(report.read_text())["scenarios"]
            failed = sorted(s["name"] for s in scenarios if s["verdict"] == "fail")
            print(f"with the planted bug: exit {code}; FAIL on {', '.join(failed) or 'nothing'}")
            ok &= failed == ["concurrent-writers-no-phantom"]
    print("trustworthy on a tree under load" if ok else "NOT trustworthy on a tree under load")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--chaos-runs", type=int, default=20)
    parser.add_argument("--chaos-ops", type=int, default=2000)
    sys.exit(main(parser.parse_args()))
