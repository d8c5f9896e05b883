"""The reference server in a child process: the chaos workload's second core."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import partial

import httpx
import pytest
import trio

from refserver.child import (
    config_from_json,
    config_to_json,
    serve_in_child,
)
from refserver.errors import ChildServerFailed
from refserver.server import ServerConfig
from refserver.upstream import RetryPolicy

from .conftest import HANG_GUARD


def test_a_config_survives_the_trip_to_the_child() -> None:
    config = ServerConfig(
        port=0, upstream_url="http://127.0.0.1:1/v1", emulate="split-lock", retry=RetryPolicy(2)
    )
    assert config_from_json(config_to_json(config)) == config


async def test_the_child_serves_the_contract_until_cancelled() -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve_in_child, ServerConfig(port=0))
            async with httpx.AsyncClient(base_url=running.url) as client:
                created = await client.post("/sessions")
                assert created.status_code == 201
                session = created.json()["session_id"]
                chat = await client.post(
                    f"/sessions/{session}/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                )
                assert chat.status_code == 200
            nursery.cancel_scope.cancel()
        with pytest.raises(httpx.ConnectError):  # the child is gone with the scope
            async with httpx.AsyncClient() as client:
                await client.get(running.url + "/healthz")


async def test_a_child_that_cannot_listen_is_reported_not_awaited_forever() -> None:
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(serve_in_child, ServerConfig(port=0))
            port = int(first.url.rsplit(":", 1)[1])
            with pytest.raises(ChildServerFailed, match=re.escape("exited (3) before it listened")):
                await serve_in_child(ServerConfig(port=port))
            nursery.cancel_scope.cancel()


async def test_a_child_whose_parent_is_gone_shuts_down() -> None:
    # A parent killed with SIGKILL cannot send SIGTERM; its end of the child's
    # stdin closing is what the child notices. Closing it here does the same.
    command = [sys.executable, "-m", "refserver.child", config_to_json(ServerConfig(port=0))]
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    check=False,
                )
            )
            assert process.stdin is not None
            assert process.stdout is not None
            announced = await process.stdout.receive_some()
            url = json.loads(announced.split(b"\n", 1)[0])["url"]
            await process.stdin.aclose()
            assert await process.wait() == 0  # a graceful shutdown, not a kill
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(url + "/healthz")
