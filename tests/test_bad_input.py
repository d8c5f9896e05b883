"""Bad input never yields a 500: the classes that once did, field by field, over real HTTP.

Each refused body leaves the session as it was, and none of them reaches the
last-resort handler (its "unexpected" log line never appears). The generated version
of these checks is ``test_fuzz.py``.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from refserver.app import HttpLimits, create_app
from refserver.server import RunningServer, serve_asgi
from refserver.service import SessionService
from refserver.transport.engine_http import EngineConnections
from refserver.upstream import HttpUpstream

from .conftest import FAST_RETRY, HANG_GUARD, Api, ServerStarter, user

HI = {"role": "user", "content": "hi"}


def _body(**extra: Any) -> bytes:
    return json.dumps({"messages": [HI], **extra}).encode()


# (name, raw body, the param the 400 must name, or None for a body-level refusal)
REFUSED: list[tuple[str, bytes, str | None]] = [
    # The five classes that answered 500 with two tracebacks.
    ("role-array", b'{"messages": [{"role": ["user"], "content": "hi"}]}', "messages[0].role"),
    ("role-object", b'{"messages": [{"role": {}, "content": "hi"}]}', "messages[0].role"),
    ("nan", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ("infinity", b'{"messages": [{"role": "user", "content": "hi"}], "x": [Infinity]}', None),
    ("minus-infinity", b'{"messages": [{"role": "user", "content": "hi"}], "x": -Infinity}', None),
    ("overflow", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', None),
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("surrogate-key", b'{"messages": [{"role": "user", "content": "hi", "\\udfff": 1}]}', None),
    ("5000-digits", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", None),  # noqa: E501
    ("deep-nesting", b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),  # noqa: E501
    ("nesting-65", b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 65 + b"]" * 65 + b"}", None),  # noqa: E501
    # Fields that were accepted, forwarded and committed.
    ("content-number", b'{"messages": [{"role": "user", "content": 123}]}', "messages[0].content"),
    ("content-object", b'{"messages": [{"role": "user", "content": {"a": 1}}]}', "messages[0].content"),  # noqa: E501
    ("no-content", b'{"messages": [{"role": "user"}]}', "messages[0].content"),
    ("tool-calls-string", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": "x"}, {"role": "user", "content": "go"}]}', "messages[1].tool_calls"),  # noqa: E501
    ("name-number", b'{"messages": [{"role": "user", "content": "hi", "name": 5}]}', "messages[0].name"),  # noqa: E501
    ("tool-call-id-number", b'{"messages": [{"role": "tool", "content": "hi", "tool_call_id": 5}]}', "messages[0].tool_call_id"),  # noqa: E501
    ("stream-string", _body(stream="false"), "stream"),
    ("n-two", _body(n=2), "n"),
    ("part-without-text", b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "messages[0].content[0].text"),  # noqa: E501
    ("arguments-object", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "content": "r", "tool_call_id": "c"}]}', "messages[1].tool_calls[0].function.arguments"),  # noqa: E501
    ("tool-calls-on-user", b'{"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}', "messages[0].tool_calls"),  # noqa: E501
    ("not-utf8", b'{"messages": [{"role": "user", "content": "\xff"}]}', None),
    ("trailing-garbage", _body() + b" x", None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "param"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_each_refused_body_is_a_400_naming_its_field_and_changes_nothing(
    api: Api, name: str, raw: bytes, param: str | None
) -> None:
    session_id = await api.create()
    first = await api.chat(session_id, [user("base")])
    assert first.status_code == 200
    before = (await api.get(session_id)).json()
    response = await api.client.post(
        f"/sessions/{session_id}/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["message"]
    if param is not None:
        assert error["param"] == param
        assert param in error["message"]
    assert (await api.get(session_id)).json() == before
    assert api.chaos.calls("base") == 1  # nothing refused reached the upstream


async def test_what_is_passed_through_reaches_the_upstream_untouched(
    nursery: trio.Nursery, start_server: ServerStarter
) -> None:
    received: list[Any] = []

    async def completions(request: Request) -> Response:
        received.append(json.loads(await request.body()))
        answer = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
        return Response(json.dumps(answer), media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    upstream_url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
    running = await start_server(upstream_url=upstream_url + "/v1")
    extras = {
        "model": "m",
        "temperature": 0.5,
        "logprobs": True,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "vendor_extra": {"anything": [1, "two", None, 1.5e300]},
        "stream": False,
        "n": 1,
    }
    message = {"role": "user", "content": "hi", "reasoning_content": "kept", "name": "alice"}
    parts = {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "video_url", "video_url": {"url": "v"}}]}  # fmt: skip  # noqa: E501
    body = {"messages": [parts, message], **extras}
    async with httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD) as client:
        session_id = (await client.post("/sessions")).json()["session_id"]
        response = await client.post(f"/sessions/{session_id}/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
    assert received == [body]
    nursery.cancel_scope.cancel()


async def test_a_trailing_slash_is_a_404_never_a_redirect(api: Api) -> None:
    session_id = await api.create()
    for path in (f"/sessions/{session_id}/", "/sessions/", "/healthz/"):
        response = await api.client.get(
            path, headers={"host": "evil.example"}, follow_redirects=False
        )
        assert response.status_code == 404, path
        assert "location" not in response.headers
        assert response.json()["error"]["type"] == "not_found"


# -- hypercorn's own answers ------------------------------------------------------


def _raw_exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HANG_GUARD) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),  # noqa: E501
            0,
        )  # fmt: skip
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head + b"\r\n\r\n" + rest


@pytest.mark.parametrize(
    ("request_bytes", "status", "error_type"),
    [
        (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "request_header_fields_too_large"),  # noqa: E501
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n", 400, "invalid_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 400, "invalid_request"),  # noqa: E501
    ],
    ids=["bad-request-line", "headers-too-large", "bad-header-line", "websocket-handshake"],
)  # fmt: skip
async def test_requests_hypercorn_refuses_get_the_openai_error_shape(
    server: RunningServer, request_bytes: bytes, status: int, error_type: str
) -> None:
    answer = await trio.to_thread.run_sync(_raw_exchange, server.url, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode())
    assert json.loads(body)["error"]["type"] == error_type


async def test_expect_continue_over_the_limit_is_refused_before_the_100(
    start_server: ServerStarter,
) -> None:
    running = await start_server(limits=HttpLimits(max_body_bytes=1000))
    request = (
        b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    answer = await trio.to_thread.run_sync(_raw_exchange, running.url, request)
    assert answer.startswith(b"HTTP/1.1 413")  # no "100 Continue" first
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "request_too_large"
    # Under the limit, the client is still invited to send its body.
    small = (
        b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await trio.to_thread.run_sync(_raw_exchange, running.url, small)
    assert answer.startswith(b"HTTP/1.1 100")


# -- what the upstream answers is checked as strictly -------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b'{"choices": [{"message": {"role": "assistant", "content": NaN}}]}', "NaN"),
        (b'{"choices": [{"message": {"role": "assistant", "content": "\\ud800"}}]}', "surrogate"),
        (b'{"choices": [{"message": {"role": "assistant", "content": 5}}]}', "content"),
        (b'{"choices": [{"message": {"role": "assistant", "content": "x", "tool_calls": [1]}}]}', "tool_calls[0]"),  # noqa: E501
    ],
    ids=["nan", "surrogate", "content-number", "bad-tool-call"],
)  # fmt: skip
async def test_an_upstream_answer_the_contract_would_refuse_is_a_502_not_a_commit(
    nursery: trio.Nursery, start_server: ServerStarter, answer: bytes, expected: str
) -> None:
    async def completions(request: Request) -> Response:
        return Response(answer, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    upstream_url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
    running = await start_server(upstream_url=upstream_url + "/v1")
    async with httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD) as client:
        session_id = (await client.post("/sessions")).json()["session_id"]
        response = await client.post(
            f"/sessions/{session_id}/v1/chat/completions", json={"messages": [HI]}
        )
        assert response.status_code == 502
        assert expected in response.json()["error"]["message"]
        assert (await client.get(f"/sessions/{session_id}")).json()["messages"] == []


# -- the last resort --------------------------------------------------------------


async def test_an_unexpected_error_is_one_500_and_one_log_line_with_a_request_id(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    engine = EngineConnections("http://127.0.0.1:9/v1")
    service = SessionService(HttpUpstream(engine, timeout=5.0, retry=FAST_RETRY))

    def broken_get(session_id: str) -> dict[str, Any]:
        raise RuntimeError("a bug of ours")

    service.get = broken_get  # type: ignore[method-assign]
    app = create_app(service)
    url = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0, limits=HttpLimits()))
    with caplog.at_level(logging.INFO, logger="refserver"):
        async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD) as client:
            response = await client.get("/sessions/abc")
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["type"] == "server_error"
            assert error["request_id"] == response.headers["x-request-id"]
            assert (await client.get("/healthz")).status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    line = errors[0].getMessage()
    assert error["request_id"] in line
    assert "RuntimeError" in line
    assert "test_bad_input.py" in line  # where it was raised
    assert "\n" not in line
    assert app.unexpected == 1
    nursery.cancel_scope.cancel()


async def test_refused_input_never_reaches_the_last_resort(
    nursery: trio.Nursery, start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server()
    async with httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD) as client:
        session_id = (await client.post("/sessions")).json()["session_id"]
        with caplog.at_level(logging.DEBUG, logger="refserver"):
            for _, raw, _ in REFUSED:
                response = await client.post(
                    f"/sessions/{session_id}/v1/chat/completions", content=raw
                )
                assert response.status_code == 400
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


async def test_the_access_log_has_one_line_per_request(
    start_server: ServerStarter, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(log_requests=True)
    with caplog.at_level(logging.INFO, logger="refserver.access"):
        for _ in range(3):
            # A fresh connection closed right after the answer: the case that
            # hypercorn's own access log wrote twice.
            async with httpx.AsyncClient(base_url=running.url, timeout=HANG_GUARD) as client:
                await client.post("/sessions", headers={"connection": "close"})
        # The line is written after the answer is sent; let the server finish.
        await trio.testing.wait_all_tasks_blocked()
    lines = [r.getMessage() for r in caplog.records if r.name == "refserver.access"]
    assert len(lines) == 3
    assert all('"POST /sessions 1.1" 201 ' in line for line in lines)


# -- start-up options ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--upstream", "notaurl"], "--upstream"),
        (["--upstream", "http://[::1"], "--upstream"),
        (["--max-body-bytes", "-1"], "--max-body-bytes"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--port", "-1"], "--port"),
        (["--port", "99999"], "--port"),
        (["--upstream-timeout", "-5"], "--upstream-timeout"),
        (["--upstream-delay", "-1"], "--upstream-delay"),
        (["--grace-period", "-1"], "--grace-period"),
        (["--grace-period", "inf"], "--grace-period"),
        (["--upstream-delay", "nan"], "--upstream-delay"),
    ],
)
def test_serve_refuses_bad_options_at_start_up(args: list[str], option: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessctl", "serve", *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert f"Invalid value for '{option}'" in done.stderr
    assert "Traceback" not in done.stderr


async def test_an_answer_before_the_body_arrived_says_the_connection_closes(
    server: RunningServer,
) -> None:
    # The body is announced but not yet sent when the 404 is written: the server
    # will not read it as a request, so the answer must say the connection ends,
    # or a client reusing it loses its next request (found by the fuzz profile).
    url = httpx.URL(server.url)
    assert url.port is not None
    stream = await trio.open_tcp_stream(url.host, url.port)
    await stream.send_all(b"PUT /no/such/route HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\n")
    received = b""
    with trio.fail_after(HANG_GUARD):
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some()
            assert data, "closed without an answer"
            received += data
    head = received.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 404")
    assert b"\r\nconnection: close" in head
    await stream.aclose()
