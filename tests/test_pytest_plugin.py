"""The pytest plugin, from the outside: pytest run in a subprocess on a sample
project, as a team runs it in its own CI (the plugin comes with the install,
through the ``pytest11`` entry point)."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from refserver.server import ServerConfig, serve

from .conftest import free_port

PLAIN_ENV = {"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COLUMNS": "120"}


async def pytest_in(folder: Path, *args: str) -> tuple[int, str]:
    done = await trio.run_process(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=folder,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=PLAIN_ENV,
    )
    return done.returncode, done.stdout.decode() + done.stderr.decode()


async def test_the_library_runs_as_items_and_a_broken_server_fails_with_its_matrix(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = free_port()
    upstream = f"http://127.0.0.1:{port}/v1"
    clean = await nursery.start(serve, ServerConfig(port=0, upstream_url=upstream))
    broken = await nursery.start(
        serve, ServerConfig(port=0, upstream_url=upstream, emulate="delete-waits")
    )
    library = [
        "--sessctl-upstream-listen", f"127.0.0.1:{port}",
        "--sessctl-filter", "delete-mid-proxy,double-delete-*,chat-never-existed",
    ]  # fmt: skip
    code, out = await pytest_in(tmp_path, "--sessctl-target", clean.url, *library)
    assert code == 0, out
    assert "4 passed" in out

    code, out = await pytest_in(
        tmp_path, "--sessctl-target", f"broken={broken.url}", *library, "-k", "delete-mid-proxy"
    )
    assert code == 1, out
    assert "FAIL  delete-mid-proxy  on broken" in out  # the matrix, as the CLI renders it
    assert "reproduce: sessctl run-scenarios" in out
    assert "1 failed" in out
    assert "3 deselected" in out  # -k selects among the library's items


SAMPLE = '''
import asyncio
import threading

import httpx
import pytest
import trio

DELETE_RACE = """
name: my-delete-race
description: DELETE while the engine holds the turn.
steps:
  - create: s1
  - chat: c1
    upstream: hold
    background: true
    expect: {status: 410}
  - wait: c1.received
  - delete: d1
    expect: {status: 204}
  - await: [c1]
"""


def test_a_scenario_as_yaml_text(sessctl_reference, sessctl_run):
    result = sessctl_run(sessctl_reference, DELETE_RACE)
    assert result.verdict.value == "pass", result


def test_holds_from_python(sessctl_reference, sessctl_upstream):
    with httpx.Client(base_url=sessctl_reference) as client:
        session = client.post("/sessions").json()["session_id"]
        sessctl_upstream.script("mine.c1", "hold")
        answers = []
        body = {"messages": [{"role": "user", "content": sessctl_upstream.marker("mine.c1")}]}
        chat = threading.Thread(
            target=lambda: answers.append(
                client.post(f"/sessions/{session}/v1/chat/completions", json=body)
            )
        )
        chat.start()
        sessctl_upstream.wait_for("mine.c1", "received")
        assert client.delete(f"/sessions/{session}").status_code == 204
        chat.join()
    assert answers[0].status_code == 410
    sessctl_upstream.wait_for("mine.c1", "cancelled")


@pytest.mark.trio
async def test_from_a_trio_test(sessctl_reference, sessctl_run):
    result = await trio.to_thread.run_sync(sessctl_run, sessctl_reference, DELETE_RACE)
    assert result.verdict.value == "pass"


def test_from_an_asyncio_app(sessctl_reference, sessctl_run):
    async def main():
        return await asyncio.to_thread(sessctl_run, sessctl_reference, DELETE_RACE)

    assert asyncio.run(main()).verdict.value == "pass"
'''


async def test_a_teams_own_tests_use_the_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_my_server.py").write_text(SAMPLE)
    code, out = await pytest_in(tmp_path)
    assert code == 0, out
    assert "4 passed" in out


async def test_a_bad_option_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    code, out = await pytest_in(tmp_path, "--sessctl-target", "not a url")
    assert code == 4, out  # pytest's usage error
    assert "sessctl: --target 'not a url'" in out
    assert "Traceback" not in out


async def test_without_a_target_the_plugin_adds_nothing(tmp_path: Path) -> None:
    (tmp_path / "test_nothing.py").write_text("def test_one():\n    pass\n")
    code, out = await pytest_in(tmp_path)
    assert code == 0, out
    assert "1 passed" in out
