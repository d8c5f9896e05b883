"""A deterministic OpenAI-compatible LLM engine over HTTP, for the embedded default.

What it answers is ``wire.engine``'s, which the harness's chaos upstream answers
with too.
"""

from __future__ import annotations

import json

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from wire.engine import (
    STREAM_END,
    Flavor,
    completion_for,
    encode_chunk,
    encode_completion,
    stream_chunks,
)


def create_fake_upstream_app(*, delay: float = 0.0, flavor: Flavor = "openai") -> Starlette:
    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return JSONResponse(
                {"error": {"type": "invalid_request", "message": "invalid JSON"}}, 400
            )
        if not isinstance(body, dict):
            return JSONResponse(
                {"error": {"type": "invalid_request", "message": "expected an object"}}, 400
            )
        if delay:
            await trio.sleep(delay)
        completion = completion_for(body, flavor=flavor)
        if body.get("stream") is True:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            chunks = stream_chunks(completion, flavor, wants_usage=usage)
            events = [encode_chunk(c, flavor) for c in chunks] + [STREAM_END]
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return Response(encode_completion(completion, flavor), media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
        ]
    )
