"""The sessctl side of ``sessctl load``: set up, run Locust's processes, check, shrink.

It runs on trio and never imports Locust: it starts the master (and any local
workers) as processes of their own (``python -m harness.load.locust_main``),
reads the whole sessions the master writes as they arrive, checks them with
chaos mode's checker while the run goes on, and checks the whole history at
the end, with the chaos upstream's events attached.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from harness.chaos.case import ScenarioText, shrunk_text
from harness.chaos.history import Operation, UpstreamEvent, operation_from_json
from harness.chaos.linearizability import CheckResult, Finding, check_history
from harness.chaos.shrink import ShrinkResult, ShrinkSettings
from harness.chaos.workload import (
    CHAOS_RETRY,
    chaos_cannot_check,
    describe_target,
    serve_embedded,
    shrink_on,
    why_not_shrunk,
)
from harness.errors import LoadFailed, TargetUnreachable, UsageError
from harness.model.profile import REFERENCE_PROFILE, Profile
from harness.run.client import TargetClient
from harness.run.preflight import require_target, wait_until_up
from harness.upstream.chaos_upstream import ChaosUpstream
from refserver.server import ServerConfig

from .settings import LoadSettings, Workload, clock_offset, engine_urls

CHECK_EVERY = 5.0
"""Seconds between checks of the sessions that arrived while the run goes on."""
PROGRESS_EVERY = 1.0


@dataclass(frozen=True)
class LoadPlan:
    """How much load, from which processes, written where."""

    users: int = 100
    spawn_rate: float = 50.0
    run_time: float = 30.0
    workers: int = 1
    """Local worker processes to start."""
    expect_workers: int | None = None
    """Workers to wait for before starting (default: ``workers``); more connect from
    other machines with ``sessctl load --worker --master-host``."""
    master_host: str = "127.0.0.1"
    """Where the master listens for workers."""
    master_port: int = 0
    """0: any free port (local workers only)."""
    worker_wait: float = 60.0
    stop_timeout: float = 30.0
    """Seconds the agents get, once the run time is up, to finish the session they live."""
    web: str | None = None
    """HOST:PORT for Locust's web UI (watching only: the run is headless)."""
    csv: str | None = None
    html: Path | None = None
    out: Path | None = None
    """Where the Locust processes write (default: a temporary directory)."""


@dataclass(frozen=True, kw_only=True)
class LoadSetup(Workload):
    """What the load runs against, and the agents' workload."""

    profile: Profile = REFERENCE_PROFILE
    target_wait: float = 5.0


@dataclass(frozen=True)
class Progress:
    seconds: float
    users: int
    requests: int
    failures: int
    requests_per_second: float
    operations: int
    sessions_checked: int
    findings: int


@dataclass(frozen=True)
class LoadReport:
    history: list[Operation]
    result: CheckResult
    stats: dict[str, Any]
    """Locust's statistics, per operation and in total (``stats.json``)."""
    elapsed: float
    check_seconds: float
    out: Path
    races: dict[str, int]
    """``placed:KIND`` / ``missed:KIND``: the races set up, and those that could not be."""
    notes: list[str]
    shrunk: ShrinkResult | None = None
    shrink_attempted: bool = False
    shrink_skipped: str | None = None
    interrupted: bool = False

    @property
    def ops_per_second(self) -> float:
        return len(self.history) / self.elapsed if self.elapsed else 0.0


class _History:
    """The history as the master writes it: whole sessions, read as they arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.raw: list[dict[str, Any]] = []

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as source:
            source.seek(self._offset)
            data = source.read()
        end = data.rfind(b"\n") + 1  # whole lines only: the master may be mid-write
        self._offset += end
        fresh = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.raw.extend(fresh)
        return fresh


class _Events:
    """The chaos upstreams' events by tag: in this process, or over their control
    routes (fetched as they come: each refresh asks only for what is new). With
    several upstreams, each one's events are put on the first one's clock, which
    the workers time their operations on."""

    def __init__(self, upstream: ChaosUpstream | None, controls: list[str], run_id: str) -> None:
        self.upstream = upstream
        self.controls = controls
        """None of them for a real engine, which has no events to read."""
        self.run_id = run_id
        self._next = [0] * len(controls)
        self._offsets = [0.0] * len(controls)
        self._by_tag: dict[str, list[UpstreamEvent]] = {}
        self._answers: list[dict[str, list[dict[str, Any]]]] = [{} for _ in controls]

    async def start(self) -> None:
        if self.upstream is None and len(self.controls) > 1:
            first = await trio.to_thread.run_sync(_clock_offset, self.controls[0])
            for index, control in enumerate(self.controls[1:], start=1):
                mine = await trio.to_thread.run_sync(_clock_offset, control)
                self._offsets[index] = mine - first

    async def refresh(self) -> None:
        if self.upstream is not None:
            return
        for index, control in enumerate(self.controls):
            url = f"{control}/_sessctl/events?prefix={self.run_id}.&after={self._next[index]}"
            fetched = await trio.to_thread.run_sync(partial(_get_json, url))
            offset = self._offsets[index]
            for event in fetched["events"]:
                self._by_tag.setdefault(event["tag"], []).append(
                    UpstreamEvent.from_json(event, offset)
                )
            self._answers[index].update(fetched.get("answers", {}))
            self._next[index] = int(fetched.get("next", self._next[index]))
        if len(self.controls) > 1:
            for events in self._by_tag.values():
                events.sort(key=lambda e: e.at)

    def events(self, tag: str) -> list[UpstreamEvent]:
        if self.upstream is not None:
            return [UpstreamEvent.of(e) for e in self.upstream.events(tag)]
        return list(self._by_tag.get(tag, ()))

    def answers(self, tag: str) -> list[dict[str, Any]]:
        if self.upstream is not None:
            return self.upstream.answers(tag)
        return [answer for by_tag in self._answers for answer in by_tag.get(tag, ())]


def _clock_offset(control: str) -> float:
    """An upstream's clock minus this process's ``time.monotonic()``."""
    offset, _ = clock_offset(lambda: float(_get_json(f"{control}/_sessctl/clock")["now"]))
    return offset


def _get_json(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response:
        result = json.loads(response.read())
    assert isinstance(result, dict)
    return result


def as_history(raw: list[dict[str, Any]], events: _Events) -> list[Operation]:
    """The workers' records as one history: upstream events attached, ordered by
    invocation, numbered, each (worker, agent) a client."""
    ordered = sorted(raw, key=lambda r: float(r["invoke"]))
    clients: dict[tuple[int, int], int] = {}
    history = []
    by_tag: dict[str, list[UpstreamEvent]] = {}
    for number, record in enumerate(ordered, start=1):
        record = dict(record)
        agent = (int(record.pop("worker")), int(record.pop("user")))
        tag = record.pop("tag", None)
        client = clients.setdefault(agent, len(clients))
        op = operation_from_json(record | {"id": number, "client": client})
        if tag:
            if tag not in by_tag:
                by_tag[tag] = events.events(tag)
            answered = events.answers(tag)
            op = replace(
                op,
                upstream=[e for e in by_tag[tag] if e.at >= op.invoke],
                answer_if_committed=answered[-1]
                if op.unknown and answered
                else op.answer_if_committed,
            )
        history.append(op)
    return history


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def _locust_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("locust") is not None


async def run_load(
    setup: LoadSetup,
    plan: LoadPlan,
    target_url: str | None = None,
    *,
    emulate: str | None = None,
    engine_url: str | None = None,
    upstream_host: str = "127.0.0.1",
    upstream_port: int = 0,
    on_upstream_ready: Callable[[str], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    shrink_settings: ShrinkSettings | None = None,
    on_shrinking: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> LoadReport:
    """Locust's agents against a target (default: the embedded reference server),
    their history checked as it arrives and at the end."""
    if not _locust_installed():
        raise LoadFailed(
            "sessctl load needs Locust, an optional extra: pip install 'sessctl[load]'"
        )
    unsupported = chaos_cannot_check(setup.profile)
    if unsupported is not None:
        raise UsageError(f"sessctl load: {unsupported.replace('sessctl chaos', 'sessctl load')}")
    out = (
        plan.out or Path(os.environ.get("TMPDIR", "/tmp")) / f"sessctl-load-{secrets.token_hex(4)}"
    )
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("history.jsonl", "progress.json", "stats.json"):
        (out / stale).unlink(missing_ok=True)
    run_id = f"load{secrets.token_hex(3)}"
    upstream: ChaosUpstream | None = None
    async with trio.open_nursery() as nursery:
        if engine_url is None:
            upstream = ChaosUpstream(
                setup.flavor,  # type: ignore[arg-type]
                tool_call_content=setup.profile.engine.content,
            )
            engine_url = await nursery.start(partial(upstream.serve, upstream_host, upstream_port))
            if on_upstream_ready is not None:
                on_upstream_ready(engine_url)
        assert engine_url is not None
        engines = engine_urls(engine_url)
        controls = [url.removesuffix("/v1") for url in engines]
        url = target_url
        embedded = ServerConfig(port=0, upstream_url=engines[0], emulate=emulate, retry=CHAOS_RETRY)
        if url is None:
            url = (await nursery.start(serve_embedded, embedded)).url
        client = TargetClient(
            url, request_timeout=setup.request_timeout, health_path=setup.profile.health_path
        )
        try:
            if upstream is not None:
                await require_target(
                    client,
                    upstream,
                    setup.profile,
                    wait=setup.target_wait,
                    external=target_url is not None,
                )
            else:
                # Wired to an engine elsewhere: whether it is ours cannot be asked here.
                problem = await wait_until_up(client, setup.target_wait)
                if problem is not None:
                    raise TargetUnreachable(f"{url}: {problem}")
        finally:
            await client.aclose()
        settings = LoadSettings(
            target=url,
            upstream=engine_url,
            profile=setup.profile.model_dump(mode="json"),
            run_id=run_id,
            **setup.workload(),
        )
        events = _Events(upstream, [] if setup.real_engine else controls, run_id)
        await events.start()
        locust = _LocustProcesses(plan, out, settings)
        started = trio.current_time()
        checked: set[str] = set()
        findings: list[Finding] = []
        history = _History(out / "history.jsonl")
        last_check = started

        async def check_new() -> None:
            """Check the sessions that arrived whole since the last check: in a thread,
            so that the chaos upstream in this process keeps answering meanwhile."""
            fresh = history.read_new()
            if not fresh:
                return
            ops = as_history(fresh, events)
            result = await trio.to_thread.run_sync(
                partial(
                    check_history,
                    ops,
                    model=setup.profile.trajectory.model,
                    rollback=setup.profile.rollback == "one-step",
                )
            )
            findings.extend(result.findings)
            checked.update(op.session for op in ops)

        try:
            await locust.start(nursery)
            while not await locust.finished(timeout=PROGRESS_EVERY):
                if should_stop():
                    locust.ask_to_stop()
                now = trio.current_time()
                if now - last_check >= CHECK_EVERY:
                    last_check = now
                    await events.refresh()
                    await check_new()
                if on_progress is not None:
                    progress = locust.progress()
                    on_progress(
                        Progress(
                            seconds=now - started,
                            users=int(progress.get("users", 0)),
                            requests=int(progress.get("requests", 0)),
                            failures=int(progress.get("failures", 0)),
                            requests_per_second=float(progress.get("requests_per_second", 0.0)),
                            operations=int(progress.get("operations_recorded", 0)),
                            sessions_checked=len(checked),
                            findings=len(findings),
                        )
                    )
        finally:
            await locust.close()
        elapsed = trio.current_time() - started
        locust.raise_if_failed()
        history.read_new()
        raw = history.raw
        # Holds still in place answer now: the agents are gone.
        if upstream is not None:
            for tag in {r["tag"] for r in raw if r.get("tag")}:
                upstream.release(tag)
        await events.refresh()
        operations = as_history(raw, events)
        if not operations:
            raise LoadFailed(
                f"the load ran {elapsed:.0f} s and recorded no operation (see {out}/master.log "
                "and the workers' logs there)"
            )
        stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
        checked_at = trio.current_time()
        result = check_history(
            operations,
            model=setup.profile.trajectory.model,
            rollback=setup.profile.rollback == "one-step",
        )
        check_seconds = trio.current_time() - checked_at
        notes = locust.notes(stats)
        shrunk = None
        attempt = shrink_settings is not None and bool(result.findings)
        cannot = None
        if upstream is None:
            cannot = (
                "not shrunk: a real engine cannot be scripted to replay it"
                if setup.real_engine
                else "not shrunk: the chaos upstream runs in another process (--engine), "
                "and shrinking replays against one it scripts here"
            )
        skipped = (
            why_not_shrunk(setup.profile, interrupted=should_stop(), cannot=cannot)
            if attempt
            else None
        )
        attempt = attempt and skipped is None
        if attempt:
            assert shrink_settings is not None
            assert upstream is not None
            if on_shrinking is not None:
                on_shrinking()
            against = describe_target(target_url, emulate)

            def text_for(finding: Finding) -> ScenarioText:
                return shrunk_text(
                    f"load-{finding.kind}", f"sessctl load (against {against})", finding
                )

            shrunk, unreadable = await shrink_on(
                nursery,
                upstream,
                target_url,
                embedded,
                operations,
                result.findings,
                setup.profile,
                min(setup.request_timeout, 5.0),
                shrink_settings,
                text_for,
            )
            if unreadable is not None:
                attempt, skipped = False, unreadable
        nursery.cancel_scope.cancel()
    return LoadReport(
        operations,
        result,
        stats,
        elapsed,
        check_seconds,
        out,
        stats.get("races", {}),
        notes,
        shrunk,
        attempt,
        skipped,
        interrupted=should_stop(),
    )


class _LocustProcesses:
    """The master and the local workers, as child processes in a session of their own
    (a Ctrl-C at the terminal reaches sessctl, which asks the master to stop)."""

    def __init__(self, plan: LoadPlan, out: Path, settings: LoadSettings) -> None:
        self.plan = plan
        self.out = out
        self.settings = settings
        self.master: trio.Process | None = None
        self.workers: list[trio.Process] = []
        self._logs: list[Any] = []
        self.port = plan.master_port or _free_port(plan.master_host)

    async def _spawn(self, args: list[str], log: Path) -> trio.Process:
        handle = log.open("wb")
        self._logs.append(handle)
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "harness.load.locust_main", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    async def start(self, nursery: trio.Nursery) -> None:
        plan = self.plan
        settings_file = self.out / "settings.json"
        settings_file.write_text(self.settings.to_json(), encoding="utf-8")
        expect = plan.workers if plan.expect_workers is None else plan.expect_workers
        args = [
            "master",
            "--settings-file", str(settings_file),
            "--out", str(self.out),
            "--users", str(plan.users),
            "--spawn-rate", str(plan.spawn_rate),
            "--run-time", str(plan.run_time),
            "--expect-workers", str(expect),
            "--bind-host", plan.master_host,
            "--bind-port", str(self.port),
            "--worker-wait", str(plan.worker_wait),
            "--stop-timeout", str(plan.stop_timeout),
        ]  # fmt: skip
        if plan.web:
            args += ["--web", plan.web]
        if plan.csv:
            args += ["--csv", plan.csv]
        if plan.html:
            args += ["--html", str(plan.html)]
        self.master = await self._spawn(args, self.out / "master.out")
        connect_to = "127.0.0.1" if plan.master_host in ("0.0.0.0", "") else plan.master_host
        for index in range(plan.workers):
            log = self.out / f"worker-{index}.log"
            worker_args = ["worker", "--master-host", connect_to, "--master-port", str(self.port)]
            self.workers.append(await self._spawn([*worker_args, "--log", str(log)], log))

    async def finished(self, timeout: float) -> bool:
        assert self.master is not None
        with trio.move_on_after(timeout):
            await self.master.wait()
            return True
        return False

    def ask_to_stop(self) -> None:
        (self.out / "stop").touch()  # the master looks for it every 0.1 s

    def progress(self) -> dict[str, Any]:
        try:
            data = json.loads((self.out / "progress.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    async def close(self) -> None:
        """Wait for the workers to quit after the master (then make them)."""
        with trio.move_on_after(15):
            for process in self.workers:
                await process.wait()
        for process in [*self.workers, *([self.master] if self.master else [])]:
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()
        for handle in self._logs:
            handle.close()

    def raise_if_failed(self) -> None:
        assert self.master is not None
        code = self.master.returncode
        if code == 0 and (self.out / "stats.json").exists():
            return
        progress = self.progress()
        if progress.get("phase") == "no workers":
            raise LoadFailed(
                f"the Locust master waited {self.plan.worker_wait:g} s and "
                f"{progress.get('workers', 0)} of {progress.get('expected')} workers "
                f"connected (see {self.out}/worker-*.log)"
            )
        raise LoadFailed(
            f"the Locust master stopped with status {code} before writing its statistics; "
            f"its log: {self.out}/master.out"
        )

    def notes(self, stats: dict[str, Any]) -> list[str]:
        notes = []
        done = {int(d["worker"]) for d in stats.get("workers_done", [])}
        if len(done) < int(stats.get("workers", 0)):
            notes.append(
                f"{int(stats['workers']) - len(done)} worker(s) sent no final count: "
                "sessions they were living when the run stopped are missing (the ones "
                "that arrived are whole, and checked)"
            )
        lag = sum(float(d.get("lag", 0.0)) for d in stats.get("workers_done", []))
        if lag >= 0.1 * float(stats.get("seconds", 0.0) or 1.0):
            notes.append(
                f"the workers lagged {lag:.1f} s in all: too busy to look, their patience "
                "was not counted then; more workers, or fewer users, would keep up"
            )
        return notes


__all__ = ["LoadPlan", "LoadReport", "LoadSetup", "Progress", "as_history", "run_load"]
