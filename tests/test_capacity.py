"""Admission: past --max-turns-in-flight a chat is refused at once, and no admitted turn is lost.

Turns are held at the chaos upstream (events, not sleeps), so "the server is
full" is a state the test builds, not a race it hopes for.
"""

from __future__ import annotations

import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind
from refserver import server
from refserver.app import HttpLimits

from .conftest import HANG_GUARD, Api, ServerStarter, start_sessctl_serve, user


async def test_past_the_limit_a_chat_is_503_server_busy_and_admitted_turns_complete(
    nursery: trio.Nursery, start_server: ServerStarter, chaos: ChaosUpstream
) -> None:
    running = await start_server(limits=HttpLimits(max_turns_in_flight=2))
    async with httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD) as client:
        api = Api(client, chaos)
        sessions = [await api.create() for _ in range(3)]
        answers: dict[str, httpx.Response] = {}
        both_answered = trio.Event()

        async def chat(name: str, session_id: str) -> None:
            answers[name] = await api.chat(session_id, [user(name)])
            if len(answers) == 2:
                both_answered.set()

        for name, session_id in zip(("a", "b"), sessions, strict=False):
            api.script(name, "hold")
            nursery.start_soon(chat, name, session_id)
        for name in ("a", "b"):
            await chaos.wait_for(name, EventKind.RECEIVED)

        busy = await api.chat(sessions[2], [user("c")])
        assert busy.status_code == 503
        assert busy.json()["error"]["type"] == "server_busy"
        assert chaos.calls("c") == 0  # refused before anything was done
        assert (await api.get(sessions[2])).json()["messages"] == []

        for name in ("a", "b"):
            chaos.release(name)
        await both_answered.wait()
        assert {r.status_code for r in answers.values()} == {200}
        # Capacity is back: the refused agent's retry goes through.
        assert (await api.chat(sessions[2], [user("c")])).status_code == 200
    nursery.cancel_scope.cancel()


def _limit(monkeypatch: pytest.MonkeyPatch, soft: int) -> None:
    def getrlimit(which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return soft, soft

    monkeypatch.setattr(resource, "getrlimit", getrlimit)


def test_the_default_follows_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(monkeypatch, 1024)
    assert server.default_max_turns_in_flight() == (1024 - server.RESERVED_DESCRIPTORS) // 2
    hints = server.capacity_hints(server.default_max_turns_in_flight())
    assert any("raise it to 21024 to admit 10000" in hint for hint in hints)
    _limit(monkeypatch, 1_000_000)
    assert server.default_max_turns_in_flight() == 10_000


def test_asking_for_more_than_the_limit_allows_is_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(monkeypatch, 1024)
    (hint, *_) = server.capacity_hints(10_000)
    assert "the open-file limit (ulimit -n) is 1024, below the 20000 descriptors" in hint
    assert "ulimit -n 21024" in hint


@pytest.mark.parametrize(("somaxconn", "warned"), [(4096, True), (16384, False)])
def test_a_listen_backlog_below_the_turns_admitted_is_warned(
    monkeypatch: pytest.MonkeyPatch, somaxconn: int, warned: bool
) -> None:
    _limit(monkeypatch, 1_000_000)
    monkeypatch.setattr(
        server, "_read_int", lambda path: somaxconn if path == server.SOMAXCONN else None
    )
    hints = server.capacity_hints(10_000)
    assert any("sysctl -w net.core.somaxconn=10000" in hint for hint in hints) is warned


def test_serve_says_so_at_start_up() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    too_many = str(soft)  # two descriptors a turn: always more than the limit allows
    process, _url = start_sessctl_serve("--max-turns-in-flight", too_many, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        lines: list[Any] = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("warning:"):
                break
        assert f"the open-file limit (ulimit -n) is {soft}" in lines[-1]
    finally:
        process.kill()
        process.wait(timeout=HANG_GUARD)


def test_serve_warns_of_a_listen_backlog_below_the_turns_admitted() -> None:
    somaxconn = int(Path(server.SOMAXCONN).read_text())
    turns = str(somaxconn + 1)
    # Warnings go to stderr, read whole after the exit: its order against stdout's
    # URL line is not fixed.
    process, _url = start_sessctl_serve("--max-turns-in-flight", turns, stderr=subprocess.PIPE)
    try:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=HANG_GUARD)
    finally:
        process.kill()
    assert f"(net.core.somaxconn), below the {turns} turns admitted" in errors
    assert f"sysctl -w net.core.somaxconn={turns}" in errors
    assert "Traceback" not in errors


def test_serve_at_its_default_scale_warns_of_nothing() -> None:
    # The default is sized to the open-file limit: nothing to warn of unless the
    # user asks for a scale (the two tests above).
    process, _url = start_sessctl_serve(stderr=subprocess.PIPE)
    try:
        process.send_signal(signal.SIGINT)
        # read(), not communicate(): the lines after the URL may already sit in
        # the file object's buffer, which communicate() would not see.
        assert process.stdout is not None
        assert process.stderr is not None
        out, errors = process.stdout.read(), process.stderr.read()
        process.wait(timeout=HANG_GUARD)
    finally:
        process.kill()
    assert "warning:" not in errors
    assert "Traceback" not in errors
    assert "turns in flight (503 server_busy past that)" in out
