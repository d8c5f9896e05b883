"""Targets that cannot be raced, through the CLI: exit 3, and what they answered.

Each command shares one pre-flight (``harness/run/preflight.py``): a server
that is not a session server, one not wired to the chaos upstream, and one
whose every chat fails are refused before any race, by ``run-scenarios``,
``chaos`` and ``profile check`` alike, never reported as VALID or as a wall
of safety failures.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from harness.upstream.http11 import Exchange, serve_http11
from refserver.server import ServerConfig, serve, serve_asgi

from .conftest import free_port, sessctl_cli


async def _html(exchange: Exchange) -> None:
    await exchange.respond(200, b"<html>I am a [web] page</html>", "text/html")


def _failing_server(upstream: str) -> Starlette:
    """Creates sessions and calls its upstream, but answers every chat 502: it
    cannot parse what the engine says (a dialect it does not expect)."""

    async def create(request: Request) -> Response:
        return JSONResponse({"session_id": "s1"}, status_code=201)

    async def chat(request: Request) -> Response:
        import httpx

        async with httpx.AsyncClient() as client:
            await client.post(f"{upstream}/chat/completions", content=await request.body())
        return JSONResponse({"error": "cannot parse the engine's answer"}, status_code=502)

    async def delete(request: Request) -> Response:
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{sid}", delete, methods=["DELETE", "GET"]),
            Route("/sessions/{sid}/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


Starter = Callable[[trio.Nursery, int], Awaitable[str]]


async def start_html(nursery: trio.Nursery, port: int) -> str:
    url: str = await nursery.start(partial(serve_http11, _html, "127.0.0.1", 0))
    return url


async def start_unwired(nursery: trio.Nursery, port: int) -> str:
    # The reference server with its own embedded upstream: a session server,
    # but its answers do not come from the chaos upstream.
    running = await nursery.start(serve, ServerConfig(port=0))
    return str(running.url)


async def start_failing(nursery: trio.Nursery, port: int) -> str:
    app = _failing_server(f"http://127.0.0.1:{port}/v1")
    url: str = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
    return url


CASES: list[tuple[str, Starter, str]] = [
    ("html", start_html, "not a session server: POST /sessions answered 200 an HTML page: I am a [web] page"),  # noqa: E501
    ("unwired", start_unwired, "it answered a chat without calling the chaos upstream"),
    ("failing", start_failing, 'the pre-flight chat (one user turn on a fresh session) answered 502 {"error": "cannot parse'),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(("name", "start", "says"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["run-scenarios", "chaos"])
async def test_a_target_that_cannot_be_raced_is_exit_3_with_what_it_answered(
    nursery: trio.Nursery, command: str, name: str, start: Starter, says: str, tmp_path: Path
) -> None:
    port = free_port()
    url = await start(nursery, port)
    extra = ["--json", str(tmp_path / "r.json")] if command == "run-scenarios" else []
    code, out = await sessctl_cli(
        command, "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--target-wait", "0", *extra,
    )  # fmt: skip
    assert code == 3, out
    assert says in out
    assert "Traceback" not in out
    assert "VALID" not in out
    if command == "run-scenarios":
        summary = json.loads((tmp_path / "r.json").read_text())["summary"]
        assert summary["safety_failures"] == []  # nothing was raced, so nothing is blamed
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("name", "start", "says"), CASES[:2], ids=[c[0] for c in CASES[:2]])
async def test_profile_check_refuses_them_the_same_way(
    nursery: trio.Nursery, name: str, start: Starter, says: str
) -> None:
    port = free_port()
    url = await start(nursery, port)
    code, out = await sessctl_cli(
        "profile", "check", "--target", url, "--upstream-listen", f"127.0.0.1:{port}"
    )
    assert code == 3, out
    assert "Traceback" not in out
    assert ("not a session server" if name == "html" else "without calling the chaos") in out
    nursery.cancel_scope.cancel()


async def _error_page(exchange: Exchange) -> None:
    page = (
        b"<!DOCTYPE HTML>\n<html lang='en'><head><title>Error response</title></head>"
        b"<body><h1>Error response</h1><p>Error code: 501</p>"
        b"<p>Message: Unsupported method (&#x27;POST&#x27;).</p></body></html>"
    )
    await exchange.respond(501, page, "text/html")


async def test_profile_check_quotes_a_web_servers_error_page_once_as_text(
    nursery: trio.Nursery,
) -> None:
    # A static web server (python -m http.server) answers every POST with the
    # same HTML page: it is quoted once, as its text, with the ways that got it.
    url = await nursery.start(partial(serve_http11, _error_page, "127.0.0.1", 0))
    code, out = await sessctl_cli(
        "profile", "check", "--target", url, "--upstream-listen", "127.0.0.1:0"
    )
    assert code == 3, out
    assert out.count("Error code: 501") == 1, out
    assert "an HTML page: Error response" in out
    assert "Unsupported method ('POST')" in out
    assert "<" not in out.split("error:", 1)[1]
    nursery.cancel_scope.cancel()


async def test_check_refuses_an_empty_history(tmp_path: Path) -> None:
    empty = tmp_path / "history.jsonl"
    empty.write_text("")
    code, out = await sessctl_cli("check", str(empty))
    assert code == 2
    assert "the history has no operations to check" in out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run-scenarios", "--target", "http://[::1"], "--target 'http://[::1'"),
        (["run-scenarios", "--request-timeout", "-1"], "Invalid value for '--request-timeout'"),
        (["run-scenarios", "--target-wait", "-1"], "Invalid value for '--target-wait'"),
        (["run-scenarios", "--concurrency", "0"], "Invalid value for '--concurrency'"),
        (["chaos", "--request-timeout", "0"], "Invalid value for '--request-timeout'"),
        (["chaos", "--profile", "no-such-profile"], "no-such-profile"),
        (["profile", "check", "--target", "notaurl"], "--target 'notaurl'"),
    ],
)
async def test_bad_option_values_are_usage_errors_naming_the_option(
    args: list[str], says: str
) -> None:
    code, out = await sessctl_cli(*args)
    assert code == 2, out
    assert says in out
    assert "Traceback" not in out


async def test_a_busy_chaos_upstream_port_says_which_and_how_to_pick_another() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command in ("run-scenarios", "chaos"):
            code, out = await sessctl_cli(
                command, "--target", "http://127.0.0.1:9", "--upstream-listen", f"127.0.0.1:{port}"
            )
            assert code == 2, out
            assert f"the chaos upstream cannot listen on 127.0.0.1:{port}" in out
            assert "--upstream-listen HOST:PORT" in out
            assert "Traceback" not in out
