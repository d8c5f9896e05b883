"""A server that refuses stream: true, through the CLI: not a failure, and its
mid-stream races say they were never tested.

(A server that buffers streams is ``tests/third_party_server.py``; its verdicts are
in ``test_third_party.py``.)
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import trio

from refserver.app import create_app
from refserver.server import serve_asgi
from refserver.service import SessionService
from refserver.transport.engine_http import EngineConnections
from refserver.upstream import HttpUpstream, RetryPolicy
from wire.errors import InvalidRequest
from wire.protocol import ChatRequest, parse_chat_request

from .conftest import free_port

STREAMING_SCENARIOS = sorted(
    str(path) for path in (Path(__file__).parent.parent / "scenarios").glob("2[1-7]-*.yaml")
)


def refuse_streams(raw: bytes) -> ChatRequest:
    request = parse_chat_request(raw)
    if request.stream:
        raise InvalidRequest("stream: true is not supported by this server", param="stream")
    return request


async def test_a_server_that_refuses_streams_leaves_every_streaming_race_untested(
    nursery: trio.Nursery,
) -> None:
    port = free_port()
    engine = EngineConnections(f"http://127.0.0.1:{port}/v1")
    upstream = HttpUpstream(engine, timeout=30, retry=RetryPolicy())
    app = create_app(SessionService(upstream), parse=refuse_streams)
    url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
    assert len(STREAMING_SCENARIOS) == 7
    done = await trio.run_process(
        [sys.executable, "-m", "sessctl", "run-scenarios", "--target", url,
         "--upstream-listen", f"127.0.0.1:{port}", *STREAMING_SCENARIOS],
        capture_stdout=True, capture_stderr=True, check=False,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    # Its refusal is a convention; no race on a stream could be placed on it, and
    # the report says so for each, quoting the refusal, instead of passing them.
    assert "7 scenario results: 0 passed, 0 non-strict, 7 untested, 0 failed, 0 errors" in out
    assert "stream: true is refused" in out
    assert "stream: true is not supported by this server" in out
    assert "7 not tested (the race was never placed" in out
    print(out)
    engine.close()
    nursery.cancel_scope.cancel()
