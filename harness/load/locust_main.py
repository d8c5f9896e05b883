"""Locust as a library: ``python -m harness.load.locust_main master|worker``.

``sessctl load`` starts these processes; it never imports this module (Locust
monkey-patches with gevent at import, and sessctl's own code runs on trio).

* The master waits for its workers, starts the agents, stops them after the run
  time, waits until every worker has sent the last of its history, and writes,
  in its output directory: ``history.jsonl`` (whole sessions, as they come),
  ``progress.json`` (every second), ``stats.json`` (Locust's statistics per
  operation) and, when asked, Locust's CSV files and HTML report.
* A worker connects to the master and runs the agents it is given, with the
  settings the master sends (``harness.load.settings``).

Exit status: 0 ran, 3 the workers did not all connect in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import locust  # noqa: F401  (first: Locust monkey-patches the process with gevent)
from locust import argument_parser, events
from locust.env import Environment
from locust.html import get_html_report
from locust.log import setup_logging
from locust.runners import MasterRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history

from .agent import DONE_MESSAGE, HISTORY_MESSAGE, SessionAgent

PROGRESS_EVERY = 1.0
NO_WORKERS_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.load.locust_main")
    roles = parser.add_subparsers(dest="role", required=True)
    master = roles.add_parser("master")
    master.add_argument("--settings-file", type=Path, required=True)
    master.add_argument("--out", type=Path, required=True)
    master.add_argument("--users", type=int, required=True)
    master.add_argument("--spawn-rate", type=float, required=True)
    master.add_argument("--run-time", type=float, required=True)
    master.add_argument("--expect-workers", type=int, required=True)
    master.add_argument("--bind-host", default="127.0.0.1")
    master.add_argument("--bind-port", type=int, default=5557)
    master.add_argument("--worker-wait", type=float, default=60.0)
    master.add_argument("--stop-timeout", type=float, default=30.0)
    master.add_argument("--web", default=None, metavar="HOST:PORT")
    master.add_argument("--csv", default=None, metavar="PREFIX")
    master.add_argument("--html", type=Path, default=None)
    worker = roles.add_parser("worker")
    worker.add_argument("--master-host", required=True)
    worker.add_argument("--master-port", type=int, default=5557)
    worker.add_argument("--log", type=Path, default=None)
    options = parser.parse_args(argv)
    # Locust's web UI parses sys.argv with its own parser, which refuses ours:
    # it sees what it would have seen had Locust been started with no option.
    sys.argv = sys.argv[:1]
    if options.role == "worker":
        return run_worker(options.master_host, options.master_port, options.log)
    return run_master(options)


def run_worker(master_host: str, master_port: int, log: Path | None) -> int:
    setup_logging("INFO", str(log) if log else None)
    environment = Environment(user_classes=[SessionAgent], events=events)
    runner = environment.create_worker_runner(master_host, master_port)
    runner.greenlet.join()
    return 0


class _Collector:
    """The master's side of the history: whole sessions, appended as they arrive."""

    def __init__(self, out: Path) -> None:
        self.path = out / "history.jsonl"
        self.file = self.path.open("a", encoding="utf-8")
        self.operations = 0
        self.races: dict[str, int] = {}
        self.done: dict[int, dict[str, Any]] = {}
        self._done_nodes: set[str] = set()
        self.final_reports: set[str] = set()

    def on_history(self, environment: Environment, msg: Any, **_: Any) -> None:
        data = msg.data
        for op in data["ops"]:
            self.file.write(json.dumps(op, separators=(",", ":")) + "\n")
        self.file.flush()
        self.operations += len(data["ops"])
        for name, count in (data.get("races") or {}).items():
            self.races[name] = self.races.get(name, 0) + int(count)

    def on_done(self, environment: Environment, msg: Any, **_: Any) -> None:
        self.done[int(msg.data["worker"])] = dict(msg.data)
        self._done_nodes.add(msg.node_id)

    def on_report(self, client_id: str, **_: Any) -> None:
        # A worker's statistics after its last history are its final ones.
        if client_id in self._done_nodes:
            self.final_reports.add(client_id)

    def settled(self, workers: int) -> bool:
        return len(self.done) >= workers and len(self.final_reports) >= workers


def run_master(options: argparse.Namespace) -> int:
    out: Path = options.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "stop").unlink(missing_ok=True)
    setup_logging("INFO", str(out / "master.log"))
    settings_json = options.settings_file.read_text(encoding="utf-8")
    environment = Environment(
        user_classes=[SessionAgent], events=events, stop_timeout=options.stop_timeout
    )
    parsed = argument_parser.get_empty_argument_parser()
    argument_parser.setup_parser_arguments(parsed)
    environment.parsed_options = parsed.parse(args=[])
    environment.parsed_options.headless = True
    environment.parsed_options.expect_workers = options.expect_workers
    # A custom option travels to every worker in Locust's spawn message.
    environment.parsed_options.sessctl_settings = settings_json
    runner = environment.create_master_runner(options.bind_host, options.bind_port)
    assert isinstance(runner, MasterRunner)
    collector = _Collector(out)
    runner.register_message(HISTORY_MESSAGE, collector.on_history)
    runner.register_message(DONE_MESSAGE, collector.on_done)
    environment.events.worker_report.add_listener(collector.on_report)
    if options.web:
        host, _, port = options.web.rpartition(":")
        environment.create_web_ui(host or "127.0.0.1", int(port))
    _write_json(out / "progress.json", {"phase": "waiting for workers", "workers": 0})
    deadline = time.monotonic() + options.worker_wait
    while len(runner.clients.ready) < options.expect_workers:
        if time.monotonic() > deadline:
            _write_json(
                out / "progress.json",
                {
                    "phase": "no workers",
                    "workers": len(runner.clients.ready),
                    "expected": options.expect_workers,
                },
            )
            runner.quit()
            return NO_WORKERS_EXIT
        gevent.sleep(0.1)
    workers = len(runner.clients.ready)
    gevent.spawn(stats_history, runner)
    csv_writer = None
    if options.csv:
        csv_writer = StatsCSVFileWriter(environment, PERCENTILES_TO_REPORT, options.csv)
        gevent.spawn(csv_writer.stats_writer)
    started = time.monotonic()
    runner.start(options.users, options.spawn_rate)

    def report_progress() -> None:
        while True:
            _write_json(out / "progress.json", _progress(runner, collector, started, workers))
            gevent.sleep(PROGRESS_EVERY)

    reporter = gevent.spawn(report_progress)
    # The run time, or until sessctl asks for an early stop (a Ctrl-C it caught).
    until = started + options.run_time
    while time.monotonic() < until and not (out / "stop").exists():
        gevent.sleep(min(0.1, max(0.0, until - time.monotonic())))
    elapsed = time.monotonic() - started
    # Each worker is told to quit: it stops its agents (each may finish the session
    # it lives, up to the stop timeout), sends the last of its history and its
    # final count, then its final statistics. Locust's own "stop" would keep a
    # worker asleep for the stop timeout before it reads the quit.
    for client in list(runner.clients.all):
        runner.send_message("quit", None, client.id)
    waited = time.monotonic() + options.stop_timeout + 30.0
    while not collector.settled(workers) and time.monotonic() < waited:
        gevent.sleep(0.1)
    reporter.kill()
    _write_json(out / "progress.json", _progress(runner, collector, started, workers))
    _write_json(out / "stats.json", _stats(environment, collector, elapsed, workers))
    if options.html is not None:
        options.html.write_text(get_html_report(environment), encoding="utf-8")
    runner.quit()
    if csv_writer is not None:
        csv_writer.close_files()
    collector.file.close()
    return 0


def _progress(
    runner: MasterRunner, collector: _Collector, started: float, workers: int
) -> dict[str, Any]:
    total = runner.stats.total
    return {
        "phase": runner.state,
        "seconds": round(time.monotonic() - started, 1),
        "workers": workers,
        "users": runner.user_count,
        "requests": total.num_requests,
        "failures": total.num_failures,
        "requests_per_second": round(total.current_rps, 1),
        "operations_recorded": collector.operations,
    }


def _stats(
    environment: Environment, collector: _Collector, elapsed: float, workers: int
) -> dict[str, Any]:
    stats = environment.runner.stats if environment.runner else environment.stats

    def entry(item: Any) -> dict[str, Any]:
        return {
            "name": item.name,
            "method": item.method,
            "requests": item.num_requests,
            "failures": item.num_failures,
            "median_ms": item.median_response_time,
            "p95_ms": item.get_response_time_percentile(0.95),
            "p99_ms": item.get_response_time_percentile(0.99),
            "max_ms": round(item.max_response_time, 1),
            "requests_per_second": round(item.num_requests / elapsed, 1) if elapsed else 0.0,
        }

    return {
        "seconds": round(elapsed, 3),
        "workers": workers,
        "workers_done": sorted(collector.done.values(), key=lambda d: int(d["worker"])),
        "operations_recorded": collector.operations,
        "races": collector.races,
        "operations": [entry(item) for item in stats.entries.values()],
        "total": entry(stats.total),
        "errors": [
            {
                "name": e.name,
                "method": e.method,
                "error": str(e.error),
                "occurrences": e.occurrences,
            }
            for e in stats.errors.values()
        ],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
