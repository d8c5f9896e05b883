"""A plain session server: Starlette on uvicorn, httpx to the engine. The benchmarks' peer.

    python benchmarks/peer_server.py serve --port 0 --upstream URL [--host 127.0.0.1]

What a team would write with the usual stack, kept small and fair: the same
routes and answers as the reference server for what the benchmarks do (create,
read, delete, a non-streamed chat), a lock per session, the turn in flight
cancelled by its session's DELETE (410 to the chat), and an httpx client tuned
to reach the engine with every turn (no cap on connections, so no turn queues
for one). Not a contract implementation: no streaming, no tool calls, no
Messages API, a prefix check instead of the contract's rules. It prints
``peer session server on URL`` once it listens (what ``common.sessctl_process``
waits for). Needs ``pip install 'sessctl[bench]'`` (uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ANNOUNCED = "peer session server on"


@dataclass
class Session:
    messages: list[dict[str, Any]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    turn: asyncio.Task[dict[str, Any]] | None = None


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "code": kind, "message": message}}, status)


def create_app(upstream: str) -> Starlette:
    sessions: dict[str, Session] = {}
    engine = httpx.AsyncClient(
        base_url=upstream.rstrip("/"),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        # As patient as the reference server's engine client: with 10 s to
        # connect, a burst of 9,757 connects lost thousands of turns to 502s.
        timeout=httpx.Timeout(600.0, connect=300.0),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.aclose()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def create(request: Request) -> Response:
        session_id = secrets.token_hex(16)
        sessions[session_id] = Session()
        return JSONResponse({"session_id": session_id}, 201)

    async def session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        found = sessions.get(session_id)
        if found is None:
            return error(404, "session_not_found", f"no session {session_id}")
        if request.method == "DELETE":
            del sessions[session_id]
            if found.turn is not None:
                found.turn.cancel()
            return Response(status_code=204)
        return JSONResponse(
            {
                "session_id": session_id,
                "messages": found.messages,
                "num_assistant": sum(1 for m in found.messages if m["role"] == "assistant"),
                "in_flight": found.turn is not None,
            }
        )

    async def chat(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        found = sessions.get(session_id)
        if found is None:
            return error(404, "session_not_found", f"no session {session_id}")
        body = await request.json()
        messages = body.get("messages")
        if not isinstance(messages, list) or messages[: len(found.messages)] != found.messages:
            return error(409, "trajectory_conflict", "messages do not extend the trajectory")
        async with found.lock:
            if sessions.get(session_id) is not found:
                return error(410, "session_deleted", f"session {session_id} was deleted")

            async def call() -> dict[str, Any]:
                answer = await engine.post("/chat/completions", json=body)
                answer.raise_for_status()
                completion: dict[str, Any] = answer.json()
                return completion

            found.turn = asyncio.ensure_future(call())
            try:
                completion = await found.turn
            except asyncio.CancelledError:
                if sessions.get(session_id) is not found:
                    return error(410, "session_deleted", f"session {session_id} was deleted")
                raise
            except httpx.HTTPError as failure:
                return error(502, "upstream_error", str(failure))
            finally:
                found.turn = None
            found.messages = [*messages, completion["choices"][0]["message"]]
            return JSONResponse(completion)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/sessions", create, methods=["POST"]),
            Route("/sessions/{session_id}", session, methods=["GET", "DELETE"]),
            Route("/sessions/{session_id}/v1/chat/completions", chat, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--upstream", required=True)
    args, _ = parser.parse_known_args()
    # Bound here, so port 0 can be announced before uvicorn starts serving on it.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by accepted connections. uvicorn serving a socket it did not bind
    # answered each kept-alive request 43 ms late (Nagle's algorithm meeting
    # delayed ACKs); bound by uvicorn itself it did not.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setblocking(False)
    listener.bind((args.host, args.port))
    listener.listen(4096)
    host, port = listener.getsockname()[:2]
    app = create_app(args.upstream)
    print(f"{ANNOUNCED} http://{host}:{port}", flush=True)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=75,
    )
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    sys.exit(main())
