"""What ``sessctl load`` sustains with 1, 2 and 4 workers, and what limits it.

    python benchmarks/load_bench.py [--workers 1,2,4] [--users 200] [--seconds 20]
                                    [--runs 3] [--upstream-seconds 10]

Each run starts its own reference server (``sessctl serve``) and chaos upstream
(``sessctl upstream``), each a process of its own, and runs ``sessctl load
--target --engine`` against them, so that every part's CPU is its own process's
(read from /proc before and after the run):

* the server under test;
* the chaos upstream (every engine call, and the workers' control calls that
  script, wait on and release its calls);
* the Locust workers (and master), and sessctl load itself (the checks).

A part that used a whole core (0.9 or more; each is one Python process) is what
limits the rate; if none did, the machine's cores are (the parts' sum is
near their count). Runs are interleaved by worker count. Reported per count:
recorded operations per second (median, min, max over the runs; every
operation is a request), Locust's p50/p99 over all requests, each part's CPU
in cores, and the verdict (every run must be VALID).

Baseline, side by side in the same run: ``sessctl chaos`` (one process: its
clients, its upstream, and the reference server in a child) for as long.

Then what one chaos upstream sustains on its own: ``--upstream-seconds`` of
plain chat completions from three client processes (keep-alive, 16
connections each, no server in between), its requests per second and CPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Process, Queue
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sessctl_process

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def locust_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"harness.load.locust_main" in command:
                pids.append(int(entry.name))
    return pids


def run_load(target: str, engine: str, workers: int, users: int, seconds: float) -> dict:
    """One ``sessctl load`` run; the CPU each part used in it."""
    _children_cpu()  # from here: earlier children (a server, an upstream) are not this run's
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "out.json"
        command = [
            sys.executable, "-m", "sessctl", "load", "--target", target, "--engine", engine,
            "--workers", str(workers), "--users", str(users), "--spawn-rate", str(users),
            "--run-time", f"{seconds:g}s", "--no-shrink", "--json", str(report),
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The Locust processes' CPU, sampled while they live (they exit before the report).
        seen: dict[int, float] = {}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for pid in locust_pids():
                    seen[pid] = max(seen.get(pid, 0.0), cpu_seconds(pid))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, stderr = process.communicate(timeout=seconds + 300)
        stop.set()
        sampler.join()
        parent_cpu = _children_cpu()
        if process.returncode not in (0, 1):
            raise SystemExit(f"sessctl load failed ({process.returncode}): {stderr.decode()}")
        document = json.loads(report.read_text())
    return {
        "verdict": document["verdict"],
        "ops_per_second": document["run"]["operations_per_second"],
        "seconds": document["run"]["seconds"],
        "p50_ms": document["locust"]["total"]["median_ms"],
        "p99_ms": document["locust"]["total"]["p99_ms"],
        "locust_cpu": sum(seen.values()),
        # The Locust processes are sessctl load's children, counted in its own figure.
        "load_cpu": max(0.0, parent_cpu - sum(seen.values())),
    }


_last_children_cpu = 0.0


def _children_cpu() -> float:
    """CPU of this script's waited-for children since the last call (sessctl load itself)."""
    global _last_children_cpu
    times = os.times()
    total = times.children_user + times.children_system
    used, _last_children_cpu = total - _last_children_cpu, total
    return used


def upstream_rate(seconds: float, clients: int = 3, connections: int = 16) -> tuple[float, float]:
    """Requests per second one chaos upstream answers, and its CPU in cores meanwhile."""
    with sessctl_process("upstream", "--listen", "127.0.0.1:0", url_prefix="chaos upstream") as up:
        parts = urlsplit(up.url)
        results: Queue[int] = Queue()
        before = cpu_seconds(up.pid)
        started = time.perf_counter()
        hammers = [
            Process(
                target=_hammer, args=(parts.hostname, parts.port, connections, seconds, results)
            )
            for _ in range(clients)
        ]
        for hammer in hammers:
            hammer.start()
        done = sum(results.get() for _ in hammers)
        for hammer in hammers:
            hammer.join()
        elapsed = time.perf_counter() - started
        return done / elapsed, (cpu_seconds(up.pid) - before) / elapsed


def _hammer(host: str, port: int, connections: int, seconds: float, results: Queue[int]) -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hello [[sessctl:bench.1]]"}]}
    )
    counts = [0] * connections
    deadline = time.monotonic() + seconds

    def loop(index: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        while time.monotonic() < deadline:
            connection.request(
                "POST", "/v1/chat/completions", body, {"content-type": "application/json"}
            )
            connection.getresponse().read()
            counts[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(sum(counts))


def run_chaos_baseline(seconds: float) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        command = ["sessctl", "chaos", "--duration", f"{seconds:g}", "--no-shrink"]
        done = subprocess.run(
            [sys.executable, "-m", *command, "--out", scratch],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"the chaos baseline was not valid: {done.stdout.decode()[-500:]}")
        rate: float = json.loads((Path(scratch) / "report.json").read_text())["run"][
            "operations_per_second"
        ]
        return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--upstream-seconds", type=float, default=10.0)
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    print(
        f"sessctl load, {args.users} agents for {args.seconds:g} s, against sessctl serve "
        f"and sessctl upstream in processes of their own; {args.runs} runs, interleaved; "
        f"{os.cpu_count()} cores"
    )
    rows: dict[int, list[dict]] = {count: [] for count in counts}
    baseline: list[float] = []
    for run in range(args.runs):
        for count in counts:
            with (
                sessctl_process(
                    "upstream", "--listen", "127.0.0.1:0", url_prefix="chaos upstream"
                ) as up,
                sessctl_process(
                    "serve", "--port", "0", "--upstream", up.url,
                    url_prefix="sessctl reference server on",
                ) as served,
            ):  # fmt: skip
                server_before, upstream_before = cpu_seconds(served.pid), cpu_seconds(up.pid)
                row = run_load(served.url, up.url, count, args.users, args.seconds)
                elapsed = row["seconds"]
                row["server"] = (cpu_seconds(served.pid) - server_before) / elapsed
                row["upstream"] = (cpu_seconds(up.pid) - upstream_before) / elapsed
                row["workers"] = row["locust_cpu"] / elapsed
                row["load"] = row["load_cpu"] / elapsed
            rows[count].append(row)
            print(
                f"  run {run + 1}, {count} worker(s): {row['ops_per_second']:,.0f} ops/s "
                f"{row['verdict'].upper()}; cores: server {row['server']:.2f}, upstream "
                f"{row['upstream']:.2f}, Locust {row['workers']:.2f}, sessctl load "
                f"{row['load']:.2f}",
                flush=True,
            )
        baseline.append(run_chaos_baseline(args.seconds))
        print(f"  run {run + 1}, baseline sessctl chaos: {baseline[-1]:,.0f} ops/s", flush=True)
    print()
    print("| workers | ops/s median (min-max) | p50 / p99 ms | server | upstream | Locust "
          "(all) | sessctl load | limited by | verdicts |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for count in counts:
        runs = rows[count]
        rates = [r["ops_per_second"] for r in runs]

        def median(key: str, runs: list[dict] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        parts = {"the server": median("server"), "the upstream": median("upstream")}
        per_worker = median("workers") / count
        limit = max(parts, key=lambda k: parts[k])
        if parts[limit] < 0.9 and per_worker >= 0.9:
            limit = "the workers"
        elif parts[limit] < 0.9:
            total = sum(parts.values()) + median("workers") + median("load")
            limit = f"the machine ({total:.1f} of {os.cpu_count()} cores busy)"
        verdicts = ", ".join(sorted({r["verdict"] for r in runs}))
        print(
            f"| {count} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {median('p50_ms'):.0f} / {median('p99_ms'):.0f} | {median('server'):.2f} "
            f"| {median('upstream'):.2f} | {median('workers'):.2f} ({per_worker:.2f} a worker) "
            f"| {median('load'):.2f} | {limit} | {verdicts} |"
        )
    print(
        f"| baseline: sessctl chaos | {statistics.median(baseline):,.0f} "
        f"({min(baseline):,.0f}-{max(baseline):,.0f}) | | | | | | | |"
    )
    if args.upstream_seconds > 0:
        rate, cores = upstream_rate(args.upstream_seconds)
        print()
        print(
            f"one sessctl upstream on its own: {rate:,.0f} chat completions/s "
            f"(3 client processes, 48 connections), using {cores:.2f} cores"
        )


if __name__ == "__main__":
    main()
