"""`sessctl serve` as a user runs it: a real process, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind
from refserver.server import RunningServer, ServerConfig, serve_until_signalled

from .conftest import FAST_RETRY, HANG_GUARD, Api, start_sessctl_serve, user


async def test_sigterm_answers_the_turn_in_flight_503_and_stops(chaos: ChaosUpstream) -> None:
    started: list[RunningServer] = []
    config = ServerConfig(port=0, upstream_url=chaos.url, retry=FAST_RETRY)
    async with trio.open_nursery() as nursery:
        ready = trio.Event()

        def on_started(running: RunningServer) -> None:
            started.append(running)
            ready.set()

        nursery.start_soon(serve_until_signalled, config, on_started)
        await ready.wait()
        async with httpx.AsyncClient(base_url=started[0].url, timeout=HANG_GUARD) as client:
            api = Api(client, chaos)
            session_id = await api.create()
            api.script("term", "hold")
            result: list[httpx.Response] = []

            async def chat() -> None:
                result.append(await api.chat(session_id, [user("term")]))

            async with trio.open_nursery() as requests:
                requests.start_soon(chat)
                await chaos.wait_for("term", EventKind.RECEIVED)
                os.kill(os.getpid(), signal.SIGTERM)
        assert result[0].status_code == 503
        # serve_until_signalled returns by itself; the nursery would hang otherwise.
    assert chaos.count("term", EventKind.ANSWERED) == 0


@pytest.mark.parametrize("access_log", [True, False])
def test_serve_prints_its_url_logs_requests_and_exits_on_sigint(access_log: bool) -> None:
    option = "--access-log" if access_log else "--no-access-log"
    process, url = start_sessctl_serve(option, stderr=subprocess.STDOUT)
    try:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url) as client:
            session_id = client.post("/sessions").json()["session_id"]
            reply = client.post(
                f"/sessions/{session_id}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert reply.status_code == 200
            assert reply.json()["object"] == "chat.completion"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=HANG_GUARD)
    finally:
        process.kill()
    assert process.returncode == 0
    logged = f'"POST /sessions/{session_id}/v1/chat/completions 1.1" 200' in output
    assert logged is access_log
    assert "Traceback" not in output


def test_the_retired_upstream_clients_option_still_starts_and_says_it_does_nothing() -> None:
    # Scripts written for the 8 httpx clients of earlier releases keep working.
    # Warnings go to stderr, read whole after the exit: its order against stdout's
    # URL line is not fixed.
    process, url = start_sessctl_serve("--upstream-clients", "8", stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=url) as client:
            assert client.post("/sessions").status_code == 201
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=HANG_GUARD)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "--upstream-clients has no effect any more" in errors
    assert "Traceback" not in errors


def test_serve_on_a_busy_port_says_so_without_a_traceback() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sessctl", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
        )
    assert done.returncode == 3
    assert "cannot listen" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_the_banner_gives_both_base_urls() -> None:
    process, url = start_sessctl_serve()
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
    finally:
        process.terminate()
        process.wait(timeout=HANG_GUARD)
    banner = "".join(lines)
    assert f"{url}/sessions/{{id}}/v1 as their OpenAI base URL" in banner
    assert f"or {url}/sessions/{{id}} as their Anthropic base URL" in banner
