"""The Locust side of ``sessctl load``: each Locust user is an agent living sessions.

One session's life, as a task: create it (the profile's way), a few turns (plain
or faulted chats, exact retries, reads, and the races: a second writer, a DELETE
while a turn is held at the engine, a hang-up), then end it. Each operation is
recorded in the history format ``sessctl check`` reads, timed on the chaos
upstream's clock, so the upstream's events and the operations compare in one
history. A session is driven by one user of one worker from start to end, and
its operations are sent to the master when its life ends: what the master has
is a set of whole sessions, checkable at any moment.

The races are structural, as in chaos mode: a held call is released only once
the race is in place (the second turn sent, the DELETE answered or outwaited,
the hang-up answered or outwaited), never after a guessed delay.

This module runs under gevent (Locust monkey-patches the process): it must not
import trio, httpx or anything that does (``tests/test_load.py`` checks).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.lock
from gevent.event import Event
from geventhttpclient import HTTPClient
from locust import FastHttpUser, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

from harness.model.profile import (
    AGENT_TOOLS,
    Profile,
    id_at,
    next_message,
    read_trajectory,
    route_call,
)
from harness.results import Observation, answer_of, describe, error_type_of
from harness.upstream.script import marker, tag_of
from wire.anthropic import MessageAssembler, message_to_chat
from wire.engine import completion_for
from wire.ids import new_session_id
from wire.streaming import ChunkRefused, EventReader, StreamAssembler

from .settings import PATIENCE, LoadSettings, clock_offset, engine_urls

HISTORY_MESSAGE = "sessctl_history"
"""Worker to master: ``{"worker": index, "ops": [...], "races": {...}}``."""
DONE_MESSAGE = "sessctl_history_done"
"""Worker to master, last: ``{"worker": index, "ops": count, "lag": seconds}``."""
FLUSH_EVERY = 1.0
"""Seconds between a worker's batches of finished sessions."""


class UpstreamControl:
    """The chaos upstream's control routes (``/_sessctl/...``), from a worker."""

    def __init__(self, upstream_url: str, timeout: float) -> None:
        parts = urlsplit(upstream_url)
        self._client = HTTPClient(
            parts.hostname or "127.0.0.1",
            parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            concurrency=256,
            connection_timeout=timeout,
            network_timeout=timeout + 35.0,
        )
        self.offset = 0.0
        """The upstream's clock minus this process's ``time.monotonic()``."""
        self.uncertainty = 0.0
        """Half the round trip of the best clock reading: how far ``now`` may be off."""

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        response = self._client.request(method, path, body=payload, headers=headers)
        text = response.read()
        if response.status_code != 200:
            raise RuntimeError(f"the chaos upstream answered {method} {path}: {text[:200]!r}")
        result = json.loads(text)
        assert isinstance(result, dict)
        return result

    def sync_clock(self, probes: int = 7) -> None:
        read = lambda: float(self._call("GET", "/_sessctl/clock")["now"])  # noqa: E731
        self.offset, self.uncertainty = clock_offset(read, probes)

    def now(self) -> float:
        return time.monotonic() + self.offset

    def script(self, tag: str, script: list[Any]) -> None:
        self._call("POST", f"/_sessctl/steps/{tag}", {"script": script})

    def release(self, tag: str) -> None:
        self._call("POST", f"/_sessctl/steps/{tag}/release", {})

    def state(self, tag: str) -> dict[str, Any]:
        return self._call("GET", f"/_sessctl/steps/{tag}")

    def wait(self, tag: str, until: str, count: int, timeout: float) -> dict[str, Any]:
        return self._call(
            "GET", f"/_sessctl/steps/{tag}/wait?until={until}&count={count}&timeout={timeout}"
        )


class SeveralUpstreams(UpstreamControl):
    """Chaos upstreams behind one server (a list it was given, or a load balancer): a
    call reaches one of them, and which one is not known here. Scripts and releases go
    to all; a step's calls are counted over all; the clock is the first one's (the
    master puts the others' events on it)."""

    def __init__(self, urls: list[str], timeout: float) -> None:
        self.parts = [UpstreamControl(url, timeout) for url in urls]
        self.offset = 0.0
        self.uncertainty = 0.0

    def sync_clock(self, probes: int = 7) -> None:
        first = self.parts[0]
        first.sync_clock(probes)
        self.offset, self.uncertainty = first.offset, first.uncertainty

    def _each(self, call: Any, *args: Any) -> list[dict[str, Any]]:
        calls = [gevent.spawn(call, part, *args) for part in self.parts]
        gevent.joinall(calls, raise_error=True)
        return [c.value for c in calls]

    def script(self, tag: str, script: list[Any]) -> None:
        self._each(UpstreamControl.script, tag, script)

    def release(self, tag: str) -> None:
        self._each(UpstreamControl.release, tag)

    def state(self, tag: str) -> dict[str, Any]:
        return _combined(tag, self._each(UpstreamControl.state, tag))

    def wait(self, tag: str, until: str, count: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            states = self._each(UpstreamControl.state, tag)
            total = _combined(tag, states)
            left = deadline - time.monotonic()
            if total[until] >= count or left <= 0:
                return total | {"reached": total[until] >= count}
            # One more call at any of them: each is asked, briefly, for one more than it
            # has; the first that answers ends this round (the others end by themselves).
            asks = [
                gevent.spawn(part.wait, tag, until, state[until] + 1, min(0.25, left))
                for part, state in zip(self.parts, states, strict=True)
            ]
            gevent.wait(asks, count=1)


def _combined(tag: str, states: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tag": tag,
        "received": sum(int(s["received"]) for s in states),
        "ended": sum(int(s["ended"]) for s in states),
        "in_flight": any(bool(s["in_flight"]) for s in states),
    }


class OpaqueEngine(UpstreamControl):
    """A real engine: nothing to script, hold, release or observe. The agents time
    their operations on this process's clock: a session is lived by one worker, and
    with no engine events to compare, nothing compares across workers."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.uncertainty = 0.0

    def sync_clock(self, probes: int = 7) -> None:
        return

    def script(self, tag: str, script: list[Any]) -> None:
        return

    def release(self, tag: str) -> None:
        return


class PatienceClock:
    """Seconds as this worker could look: a tick of 50 ms counts at most 0.1 s, so
    a worker too busy to look does not run a server's patience out (as
    ``harness.run.patience`` does for chaos mode)."""

    TICK = 0.05
    MOST = 0.1

    def __init__(self) -> None:
        self.counted = 0.0
        self.lag = 0.0
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            gevent.sleep(self.TICK)
            now = time.monotonic()
            step = now - last
            last = now
            self.counted += min(step, self.MOST)
            self.lag += max(0.0, step - self.MOST)

    def wait(self, done: Event, seconds: float) -> bool:
        """Wait for ``done`` up to ``seconds`` of this clock; did it happen?"""
        start = self.counted
        while not done.is_set():
            if self.counted - start >= seconds:
                return False
            done.wait(self.TICK)
        return True


@dataclass
class WorkerState:
    """What the users of one worker share: the settings, the upstream, the history."""

    settings: LoadSettings
    profile: Profile
    control: UpstreamControl
    clock: PatienceClock
    index: int
    users: itertools.count[int] = field(default_factory=itertools.count)
    tickets: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    finished: list[dict[str, Any]] = field(default_factory=list)
    """Operations of sessions whose life ended, not yet sent to the master."""
    sent: int = 0
    races: Counter[str] = field(default_factory=Counter)
    """``placed:KIND`` and ``missed:KIND``: races set up, and those that could not be."""

    def tag(self) -> str:
        return f"{self.settings.run_id}.w{self.index}.{next(self.tickets)}"


_state: WorkerState | None = None


_state_read = gevent.lock.Semaphore()
"""One reading of the settings at a time: it talks to the upstream, so it yields."""


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    """Each worker (and a master, which runs no users) reads the settings the master sent."""
    _ensure_state(environment)


def _ensure_state(environment: Environment, *, late: bool = False) -> WorkerState | None:
    """The worker's state, read from the settings the master sent if not yet read
    (``late``: by an agent, test_start having found none; said in the log)."""
    with _state_read:
        if _state is None:
            if late:
                logging.getLogger(__name__).warning(
                    "sessctl load: no settings at test start; read when the agents start"
                )
            _read_state(environment)
    return _state


def _read_state(environment: Environment) -> None:
    global _state
    runner = environment.runner
    options = environment.parsed_options
    raw = getattr(options, "sessctl_settings", None) if options is not None else None
    if raw is None or runner is None or type(runner).__name__ == "MasterRunner":
        return
    settings = LoadSettings.from_json(raw)
    urls = engine_urls(settings.upstream)
    control: UpstreamControl
    if settings.real_engine:
        control = OpaqueEngine()
    elif len(urls) > 1:
        control = SeveralUpstreams(urls, settings.request_timeout)
    else:
        control = UpstreamControl(urls[0], settings.request_timeout)
    control.sync_clock()
    _state = WorkerState(
        settings,
        Profile.model_validate(settings.profile),
        control,
        PatienceClock(),
        max(0, getattr(runner, "worker_index", 0)),
    )
    gevent.spawn(_flush_forever, environment)


def _flush_forever(environment: Environment) -> None:
    while True:
        gevent.sleep(FLUSH_EVERY)
        flush(environment)


def flush(environment: Environment) -> None:
    state, runner = _state, environment.runner
    if state is None or runner is None or not state.finished:
        return
    batch, state.finished = state.finished, []
    state.sent += len(batch)
    runner.send_message(
        HISTORY_MESSAGE, {"worker": state.index, "ops": batch, "races": dict(state.races)}
    )
    state.races.clear()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    """The users are stopped: send what is left, then say how much was sent in all."""
    state, runner = _state, environment.runner
    if state is None or runner is None or type(runner).__name__ == "MasterRunner":
        return
    flush(environment)
    runner.send_message(
        DONE_MESSAGE, {"worker": state.index, "ops": state.sent, "lag": round(state.clock.lag, 3)}
    )


class SessionAgent(FastHttpUser):
    """An agent: session after session, each lived from create to end."""

    host = "http://127.0.0.1"  # replaced by the settings' target
    wait_time = constant(0)
    concurrency = 4
    """Connections of its own: a race has at most three requests in flight, and a
    request never queues in the load generator behind another."""

    def __init__(self, environment: Environment) -> None:
        state = _state
        if state is not None:
            self.host = state.settings.target.rstrip("/")
            self.network_timeout = state.settings.request_timeout
            self.connection_timeout = state.settings.request_timeout
            think = state.settings.think
            self.wait_time = lambda: think  # type: ignore[method-assign]
        super().__init__(environment)
        self.number = next(state.users) if state is not None else 0
        self.lives = 0

    @task
    def live_a_session(self) -> None:
        state = _state
        if state is None:
            # Locust's test_start found no settings (once, on a loaded CI machine,
            # every agent of a worker met this and the run recorded nothing): they
            # travel in the spawn message that started this agent, so read them now.
            state = _ensure_state(self.environment, late=True)
        if state is None:
            self.environment.runner.quit()
            raise StopUser("sessctl load: this worker never received its settings")
        seed = f"{state.settings.seed} {state.index} {self.number} {self.lives}"
        self.lives += 1
        SessionLife(self, state, random.Random(seed)).run()


@dataclass
class _Answer:
    status: int | None
    body: Any
    error: str | None = None
    stream: dict[str, Any] | None = None
    """A chat sent with ``stream: true``: how its stream ended, in the history's fields."""


class SessionLife:
    """One session, from its create to its end, recorded."""

    def __init__(self, user: SessionAgent, state: WorkerState, rng: random.Random) -> None:
        self.user = user
        self.state = state
        self.settings = state.settings
        self.profile = state.profile
        self.rng = rng
        self.ops: list[dict[str, Any]] = []
        self.session: str | None = None
        self.agent: str | None = None
        self.view: list[dict[str, Any]] = []
        self.last_sent: list[dict[str, Any]] | None = None
        self.ended = False
        self._admin_key = self.profile.admin_key()
        self._delete_op: dict[str, Any] | None = None
        self._outwaited_tags: list[str] = []

    # -- the life -----------------------------------------------------------------

    def run(self) -> None:
        try:
            if not self.create():
                return
            low, high = self.settings.turns
            kinds = [k for k, w in self.settings.mix.items() if w > 0]
            weights = [self.settings.mix[k] for k in kinds]
            for _ in range(self.rng.randint(low, high)):
                turn = "turn_" + self.rng.choices(kinds, weights)[0].replace("-", "_")
                if self.settings.real_engine and hasattr(self, turn + "_real"):
                    turn += "_real"  # the race placed by timing: nothing can be held
                getattr(self, turn)()
                if self.ended:
                    break
                if self.settings.real_engine and not self._all_known():
                    # What a real engine answered a turn whose outcome is unknown cannot
                    # be predicted, so a later read could not be judged: the life ends.
                    break
            if not self.ended:
                self.end()
                roll = self.rng.random()
                if roll < 0.3:
                    self.chat(self.extended("after the end"), ["respond"], "chat after end")
                elif roll < 0.45:
                    self.end("end again")
        finally:
            # Whatever ran is recorded, an operation cut off by a stop included
            # (its outcome unknown): a read may have seen what it committed.
            now = self.state.control.now()
            for op in self.ops:
                if op.pop("_open", False):
                    op["gave_up"] = now
            self.state.finished.extend(self.ops)

    def create(self) -> bool:
        if self.profile.creation == "implicit":
            self.session = self.agent = new_session_id()
            now = self.state.control.now()
            self._op("create", invoke=now, complete=now, implicit=True)
            return True
        values = self._values(task=f"sessctl-{new_session_id()[:12]}")
        for route in self.profile.create.before:
            before = self._send("create (before)", route_call(route, values))
            if before.status is None or before.status // 100 != 2:
                return False
        call = route_call(self.profile.create, values)
        op = self._begin("create", "")
        answer = self._send("create", call)
        session = id_at(answer.body, self.profile.create.id_field) if _ok(answer) else None
        agent = session
        if self.profile.create.agent_id_field is not None and session is not None:
            agent = id_at(answer.body, self.profile.create.agent_id_field)
        self._complete(op, answer)
        if session is None or agent is None:
            self.ops.remove(op)  # no session: nothing to check, as in chaos mode
            return False
        op["session"] = session
        self.session, self.agent = session, agent
        return True

    def end(self, label: str = "end") -> None:
        assert self.session is not None
        self.ended = True
        op = self._begin("delete", self.session)
        answer = self._send(label, route_call(self.profile.end, self._values()))
        self._complete(op, answer)

    # -- turns -------------------------------------------------------------------

    def turn_chat(self) -> None:
        stream = self._streams()
        tool_call = self.rng.random() < 0.2
        answer: Any = {"chunks": 3, "tool_call": True} if tool_call else "respond"
        script: list[Any] = [answer]
        if self.rng.random() < self.settings.fault_rate and not self.settings.real_engine:
            fault = self.rng.choice(("delay", "503", "reset", "abort", "garbage"))
            after = self.rng.randrange(3) if stream and self.rng.random() < 0.5 else None
            recovers = self.rng.random() < 0.5
            if fault == "delay":
                script = [{"delay": round(self.rng.uniform(0.001, 0.02), 4)}]
            elif fault == "503":
                script = [{"status": 503}, answer]
            elif fault == "abort":
                script = ["abort", answer]
            elif after is not None:
                # After a chunk has been relayed: every attempt, or once and then
                # a whole answer (a server that retries after relaying shows it).
                cut = {"chunks": 3, f"{fault}_after": after}
                script = [cut, answer] if fault == "reset" and recovers else [cut]
            else:
                script = [fault, answer] if fault == "reset" and recovers else [fault]
        if self.settings.real_engine:
            script = []  # a real engine answers as it does
        self.chat(self.extended("turn"), script, "chat", stream=stream)

    def turn_retry(self) -> None:
        if self.last_sent is None:
            self.turn_chat()
            return
        self.chat(list(self.last_sent), ["respond"], "retry")

    def turn_read(self) -> None:
        self.read()

    def turn_second_writer(self) -> None:
        """A held turn, and a second turn on the same trajectory sent while it is held."""
        first = self.extended("first writer")
        first_tag = tag_of({"messages": first}) or ""
        stream = self._streams()
        held = gevent.spawn(
            self.chat, first, self._hold(stream), "chat (held)", tag=first_tag, stream=stream
        )
        if not self._arrived(first_tag, held):
            self._missed("second-writer")
            self.state.control.release(first_tag)
            held.join()
            return
        self._placed("second-writer")
        second = gevent.spawn(
            self.chat, self.extended("second writer"), ["respond"], "chat (second writer)"
        )
        # The second turn either reaches the engine (a server that lets two
        # writers in at once), is answered (refused, or queued and then...), or
        # waits behind the held one: any of those puts the race in place.
        second.join(timeout=self.rng.uniform(0.01, 0.1))
        self.state.control.release(first_tag)
        gevent.joinall([held, second])
        self.read()  # which of the two committed: the next turns build on it

    def turn_delete_in_flight(self) -> None:
        """A held turn; the session is ended while it is held."""
        assert self.session is not None
        tag_messages = self.extended("held through the end")
        tag = tag_of({"messages": tag_messages}) or ""
        stream = self._streams()
        held = gevent.spawn(
            self.chat, tag_messages, self._hold(stream), "chat (held)", tag=tag, stream=stream
        )
        if not self._arrived(tag, held):
            self._missed("delete-in-flight")
            self.state.control.release(tag)
            held.join()
            return
        self._placed("delete-in-flight")
        queued: list[gevent.Greenlet] = []
        if self.rng.random() < 0.5:
            # Another turn behind the held one (queued, on a server that serialises a
            # session's turns): a DELETE must stop it too, not let it commit after.
            queued.append(
                gevent.spawn(self.chat, self.extended("queued"), ["respond"], "chat (queued)")
            )
            queued[0].join(timeout=self.rng.uniform(0.005, 0.05))
        answered = Event()
        sent = Event()

        def delete() -> None:
            try:
                self.ended = True
                op = self._delete_op = self._begin("delete", self.session or "")
                sent.set()
                call = route_call(self.profile.end, self._values())
                self._complete(op, self._send("end (turn in flight)", call))
            finally:
                sent.set()
                answered.set()

        ending = gevent.spawn(delete)
        sent.wait()
        outwaited = not self.state.clock.wait(answered, PATIENCE)
        if outwaited and self.state.control.state(tag)["in_flight"]:
            # The DELETE waited for the engine: the harness lets the call go, and
            # the DELETE's record says so (the checker's delete-waits).
            self._outwaited_tags.append(tag)
        elif self._delete_op is not None and (self._delete_op["status"] or 0) // 100 == 2:
            self._wait_hung_up_on(tag)
        self.state.control.release(tag)
        gevent.joinall([ending, held, *queued])
        if self._delete_op is not None and self._outwaited_tags:
            self._delete_op["outwaited"] = list(self._outwaited_tags)
        if self.rng.random() < 0.5:
            self.chat(self.extended("after the end"), ["respond"], "chat after end")
        self.read()

    # -- the races with a real engine: no holds, only timing -------------------------

    def turn_second_writer_real(self) -> None:
        """Two turns on the same trajectory, the second sent a moment after the first."""
        first = gevent.spawn(self.chat, self.extended("first writer"), [], "chat")
        gevent.sleep(self.rng.uniform(0.0, 0.02))
        second = self.extended("second writer")
        gevent.joinall([first, gevent.spawn(self.chat, second, [], "chat (second writer)")])
        if self._all_known():
            self.read()

    def turn_delete_in_flight_real(self) -> None:
        """A turn, and the session ended a moment after it was sent."""
        turn = gevent.spawn(self.chat, self.extended("ended meanwhile"), [], "chat")
        gevent.sleep(self.rng.uniform(0.0, 0.02))
        self.end("end (turn in flight)")
        turn.join()
        if self.rng.random() < 0.5:
            self.chat(self.extended("after the end"), [], "chat after end")
        self.read()

    def turn_hangup_real(self) -> None:
        """A turn whose client hangs up a moment after sending it (then the life ends)."""
        assert self.agent is not None
        target = urlsplit(self.settings.target)
        if target.scheme != "http":
            return
        messages = self.extended("hung up on")
        tag = tag_of({"messages": messages}) or ""
        path, headers, body, op = self._prepare_chat(messages, [], tag, self._streams())
        address = (target.hostname or "127.0.0.1", target.port or 80)
        raw = socket.create_connection(address, timeout=self.settings.request_timeout)
        try:
            raw.sendall(_http_request(target, path, headers, body))
            gevent.sleep(self.rng.uniform(0.0, 0.05))
        finally:
            raw.close()
        self._hung_up(op)

    def _hung_up(self, op: dict[str, Any]) -> None:
        """The chat's client hung up: an unknown outcome, and a request in Locust's count."""
        op["gave_up"] = self.state.control.now()
        op.pop("_open", None)
        self.user.environment.events.request.fire(
            request_type="POST",
            name="chat (hung up)",
            response_time=(op["gave_up"] - op["invoke"]) * 1000,
            response_length=0,
            exception=None,
            context={},
        )

    def turn_hangup(self) -> None:
        """A held turn whose client hangs up; the server should stop the engine call."""
        assert self.agent is not None
        assert self.session is not None
        messages = self.extended("hung up on")
        tag = tag_of({"messages": messages}) or ""
        target = urlsplit(self.settings.target)
        if target.scheme != "http":
            self._missed("hangup")  # a raw socket speaks plain HTTP only
            return
        stream = self._streams()
        script = self._hold(stream)
        path, headers, body, op = self._prepare_chat(messages, script, tag, stream)
        address = (target.hostname or "127.0.0.1", target.port or 80)
        raw = socket.create_connection(address, timeout=self.settings.request_timeout)
        try:
            raw.sendall(_http_request(target, path, headers, body))
            arrived = self.state.control.wait(tag, "received", 1, PATIENCE)["reached"]
            chunks = script[0].get("hold_after", 0) if isinstance(script[0], dict) else 0
            if arrived and chunks:
                _read_until_events(raw, chunks, PATIENCE)  # hang up mid-stream
        finally:
            raw.close()  # the hang-up
        self._hung_up(op)
        if not arrived:
            self._missed("hangup")
            self.state.control.release(tag)
            self.read()
            return
        self._placed("hangup")
        state = self.state.control.state(tag)
        if state["in_flight"]:
            ended = self.state.control.wait(tag, "ended", state["ended"] + 1, PATIENCE)
            if not ended["reached"]:
                op["outwaited"] = [tag]
        self.state.control.release(tag)
        self.read()

    # -- requests ------------------------------------------------------------------

    def chat(
        self,
        messages: list[dict[str, Any]],
        script: list[Any],
        label: str,
        *,
        tag: str = "",
        stream: bool = False,
    ) -> None:
        assert self.session is not None
        assert self.agent is not None
        tag = tag or tag_of({"messages": messages}) or ""
        path, headers, body, op = self._prepare_chat(messages, script, tag, stream)
        if stream:
            answer = self._stream(label, path, headers, body)
        else:
            answer = self._post(label, path, headers, body)
        self._complete(op, answer)
        if answer.stream is not None:
            op.update(answer.stream)
            if op.get("stream") not in ("done", "not streamed", "no stream"):
                op["gave_up"] = op.pop("complete", None)  # an unfinished stream: unknown
                op["complete"] = None
        reply = answer_of(Observation("load", "chat", None, answer.status, 0.0, 0.0, answer.body))
        op["answer"] = reply
        if answer.status == 200 and reply is not None and op.get("complete") is not None:
            self.view = [*messages, reply]

    def _prepare_chat(
        self, messages: list[dict[str, Any]], script: list[Any], tag: str, stream: bool
    ) -> tuple[str, dict[str, str], dict[str, Any], dict[str, Any]]:
        """Script the chat's engine call, build its request, and record its invocation."""
        assert self.session is not None
        assert self.agent is not None
        if script and script != ["respond"]:
            self.state.control.script(tag, script)
        request = self._chat_body(messages)
        if stream:
            request["stream"] = True
        path, headers, body = self.profile.chat_request(self.agent, request)
        op = self._begin(
            "chat",
            self.session,
            messages=messages,
            script=script,
            answer_if_committed=None if self.settings.real_engine else self._predicted(body),
            tag=tag,
        )
        self.last_sent = messages
        return path, headers, body, op

    def read(self) -> None:
        assert self.session is not None
        op = self._begin("get", self.session)
        answer = self._send("read", route_call(self.profile.read, self._values()))
        turns_body = None
        turns_path = self.profile.trajectory.turns_path
        if turns_path is not None and answer.status == 200:
            listed = self._get("read (turns)", turns_path.replace("{session}", self.session))
            turns_body = listed.body if listed.status == 200 else None
        self._complete(op, answer)
        state = read_trajectory(self.profile, answer.body, turns_body)
        op.update(messages=state.messages, num_assistant=state.num_assistant, turns=state.turns)
        if answer.status == 200 and state.messages is not None:
            self.view = list(state.messages)

    def _send(self, label: str, call: Any) -> _Answer:
        return self._request(call.method, call.path, call.headers, call.body, label)

    def _post(
        self, label: str, path: str, headers: dict[str, str], body: dict[str, Any]
    ) -> _Answer:
        return self._request("POST", path, headers, body, label)

    def _stream(
        self, label: str, path: str, headers: dict[str, str], body: dict[str, Any]
    ) -> _Answer:
        """POST a chat with ``stream: true`` and read its events to the end, as an
        agent does; how the stream ended is recorded as chaos mode records it."""
        with self.user.client.request(
            "POST", path, name=label, json=body, headers=headers, stream=True, catch_response=True
        ) as response:
            status = response.status_code or None
            if status is None:
                error = str(getattr(response, "error", None) or "no answer")
                response.failure(error)
                return _Answer(None, None, error, {"stream": "no stream"})
            response.success()
            streamed = (response.headers.get("content-type") or "").startswith("text/event-stream")
            if status // 100 != 2 or not streamed:
                text = response.text or ""
                kind = "not streamed" if status // 100 == 2 else "no stream"
                try:
                    parsed: Any = json.loads(text) if text else None
                except ValueError:
                    parsed = {"_raw": text}
                return _Answer(status, parsed, stream={"stream": kind})
            return _read_events(status, response)

    def _get(self, label: str, path: str) -> _Answer:
        return self._request("GET", path, {}, None, label)

    def _request(
        self, method: str, path: str, headers: dict[str, str], body: Any, label: str
    ) -> _Answer:
        with self.user.client.request(
            method, path, name=label, json=body, headers=headers, catch_response=True
        ) as response:
            status = response.status_code or None
            if status is None:
                error = str(getattr(response, "error", None) or "no answer")
                response.failure(error)  # only a missing answer fails in Locust's eyes
                return _Answer(None, None, error)
            response.success()  # a status is the checker's to judge, not Locust's
            text = response.text or ""
        try:
            parsed: Any = json.loads(text) if text else None
        except ValueError:
            parsed = {"_raw": text}
        return _Answer(status, parsed)

    # -- the history ---------------------------------------------------------------

    def _begin(self, op: str, session: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "op": op,
            "session": session,
            "worker": self.state.index,
            "user": self.user.number,
            "invoke": self.state.control.now(),
            "complete": None,
            "status": None,
            "_open": True,
            **fields,
        }
        self.ops.append(record)
        return record

    def _op(self, op: str, **fields: Any) -> None:
        self.ops.append(
            {
                "op": op,
                "session": self.session,
                "worker": self.state.index,
                "user": self.user.number,
                "status": None,
                **fields,
            }
        )

    def _complete(self, op: dict[str, Any], answer: _Answer) -> None:
        op.pop("_open", None)
        now = self.state.control.now()
        if answer.status is None:
            op["gave_up"] = now
            return
        op["complete"] = now
        op["status"] = answer.status
        if answer.status // 100 != 2:
            observation = Observation(
                "load", op["op"], None, answer.status, op["invoke"], now, answer.body
            )
            op["refusal"] = describe(observation, limit=160)

    def _values(self, task: str | None = None) -> dict[str, str]:
        values: dict[str, str] = {}
        if self.session is not None:
            values["session"] = self.session
            values["agent"] = self.agent or self.session
        if task is not None:
            values["task"] = task
        if self._admin_key is not None:
            values["admin_key"] = self._admin_key
        return values

    def extended(self, what: str) -> list[dict[str, Any]]:
        """What the agent sends next: the trajectory it saw, and a user message; or,
        after a tool call, the tool's result, as an agent answers one (where the
        profile takes tool results)."""
        tag = self.state.tag()
        text = f"agent {self.user.number} {what} {marker(tag)}"
        last = self.view[-1] if self.view else {}
        calls = last.get("tool_calls") if last.get("role") == "assistant" else None
        if isinstance(calls, list) and calls and "tool" in self.profile.append_after_assistant:
            result = {"role": "tool", "tool_call_id": calls[0].get("id"), "content": text}
            return [*self.view, result]
        return [*self.view, next_message(self.profile, self.view, text)]

    def _chat_body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        # An agent declares its tools with every turn; the engine may call one.
        return {"model": self.settings.model, "messages": messages, "tools": AGENT_TOOLS}

    def _predicted(self, body: dict[str, Any]) -> dict[str, Any]:
        flavor: Any = self.settings.flavor
        message = completion_for(body, flavor=flavor)["choices"][0]["message"]
        assert isinstance(message, dict)
        return message

    def _arrived(self, tag: str, chat: gevent.Greenlet) -> bool:
        """Wait until the held call reaches the engine (or its chat is answered without)."""
        while not chat.dead:
            if self.state.control.wait(tag, "received", 1, 0.25)["reached"]:
                return True
        return bool(self.state.control.state(tag)["received"])

    def _wait_hung_up_on(self, tag: str) -> None:
        """After a DELETE's 2xx, give the server its patience to hang up on the held call
        (releasing it sooner would make the engine answer a turn that was stopped)."""
        state = self.state.control.state(tag)
        if state["in_flight"]:
            self.state.control.wait(tag, "ended", state["ended"] + 1, PATIENCE)

    def _streams(self) -> bool:
        """Does this chat stream (OpenAI's chunks, or Anthropic's Messages events)?"""
        return self.rng.random() < self.settings.stream_ratio

    def _hold(self, stream: bool) -> list[Any]:
        """A hold before the answer, or (a streamed chat, half the time) after a chunk."""
        if stream and self.rng.random() < 0.5:
            return [{"chunks": 3, "hold_after": self.rng.randrange(1, 3)}]
        return ["hold"]

    def _all_known(self) -> bool:
        """Every operation so far has a known outcome (what an unknown chat committed
        with a real engine cannot be predicted, so nothing read after it is judged)."""
        return not any(_unknown(op) for op in self.ops)

    def _placed(self, race: str) -> None:
        self.state.races[f"placed:{race}"] += 1

    def _missed(self, race: str) -> None:
        self.state.races[f"missed:{race}"] += 1


AFTER_ERROR_KEPT = 5


def _read_until_events(raw: socket.socket, events: int, seconds: float) -> None:
    """Read a streamed answer until ``events`` data events have come (or ``seconds``):
    a client that hangs up mid-stream has seen the start of it."""
    seen = b""
    with gevent.Timeout(seconds, False):
        while seen.count(b"data:") < events:
            part = raw.recv(65536)
            if not part:
                return
            seen += part


def _read_events(status: int, response: Any) -> _Answer:
    """A 2xx event stream, read to its end (``[DONE]``, or Anthropic's
    ``message_stop``), an error event (and on to the end: nothing may follow one),
    or the cut; the answer its chunks assembled into."""
    reader, chunks, messages = EventReader(), StreamAssembler(), MessageAssembler()
    end, error_type = "cut", None
    after_error: list[str] = []
    try:
        for part in response.iter_content(8192, decode_content=False):
            for data in reader.feed(part if isinstance(part, bytes) else part.encode()):
                if end == "error":
                    if len(after_error) < AFTER_ERROR_KEPT:
                        done = data.strip() == b"[DONE]"
                        after_error.append("[DONE]" if done else "a data event")
                    continue
                if data.strip() == b"[DONE]":
                    end = "done"
                    break
                try:
                    event = json.loads(data)
                    kind = event.get("type") if isinstance(event, dict) else None
                    if isinstance(event, dict) and (kind == "error" or "error" in event):
                        end, error_type = "error", error_type_of(event) or "error"
                    elif kind == "message_stop":
                        end = "done"
                        break
                    elif isinstance(kind, str) and kind != "ping" and "choices" not in event:
                        messages.add(kind, event)  # Anthropic's Messages events
                    elif kind != "ping":
                        chunks.add(event)
                except ValueError as refused:
                    end = "error"
                    error_type = (
                        f"(malformed chunk: {refused})"
                        if isinstance(refused, ChunkRefused)
                        else "(an event that is not JSON)"
                    )
            if end == "done":
                break
    except Exception:
        pass
    body: Any = None
    if messages.chunks:
        assembled = message_to_chat(messages.message())
        if end == "done" and assembled is not None:
            body = messages.message()
    else:
        assembled = chunks.message() if chunks.chunks else None
        if end == "done" and assembled is not None:
            body = {"choices": [{"message": assembled, "finish_reason": chunks.finish_reason}]}
    record: dict[str, Any] = {
        "stream": f"error:{error_type}" if end == "error" else end,
        "assembled": assembled,
    }
    if after_error:
        record["after_error"] = after_error
    return _Answer(status, body, stream=record)


def _unknown(op: dict[str, Any]) -> bool:
    if op.get("implicit"):
        return False  # an id made up here: nothing was sent
    unfinished = op.get("stream") not in (None, "done", "not streamed", "no stream")
    return op["status"] is None or (op["status"] // 100 == 2 and unfinished)


def _ok(answer: _Answer) -> bool:
    return answer.status is not None and answer.status // 100 == 2


def _http_request(target: Any, path: str, headers: dict[str, str], body: Any) -> bytes:
    payload = json.dumps(body).encode()
    host = target.netloc
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}",
        "content-type: application/json",
        f"content-length: {len(payload)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
