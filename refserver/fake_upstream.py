"""A deterministic OpenAI-compatible LLM engine, for the embedded default.

``completion_for`` is shared with the harness's chaos upstream, so both speak
the same dialect. Equal conversations get equal answers: the text is derived
from a hash of the messages, which keeps replays and retries comparable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Flavor = Literal["openai", "sglang"]
FLAVORS: tuple[Flavor, ...] = ("openai", "sglang")


def completion_for(
    body: dict[str, Any], *, flavor: Flavor = "openai", finish_reason: str = "stop"
) -> dict[str, Any]:
    messages = body.get("messages") or []
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    text = f"answer {digest[:12]} to turn {sum(1 for m in messages if _role(m) == 'user')}"
    prompt_tokens = sum(len(str(_content(m)).split()) for m in messages)
    completion_tokens = len(text.split())
    message: dict[str, Any] = {"role": "assistant", "content": text}
    tool = _first_tool_name(body)
    if tool is not None:
        # An agent that offered tools gets a tool call, so its next turn can be
        # the tool's result (some servers only accept tool messages after a turn).
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{digest[:16]}",
                    "type": "function",
                    "function": {"name": tool, "arguments": json.dumps({"turn": digest[:8]})},
                }
            ],
        }
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    completion: dict[str, Any] = {
        "id": f"chatcmpl-{digest[:24]}",
        "object": "chat.completion",
        "created": 0,
        "model": str(body.get("model") or "sessctl-fake"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if flavor == "sglang":
        # SGLang's native extras; servers built for SGLang read these for RL.
        completion["meta_info"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "output_token_logprobs": [
                [-0.1 * (i + 1), 1000 + i, None] for i in range(completion_tokens)
            ],
            "finish_reason": {"type": finish_reason},
        }
        input_ids = body.get("input_ids")
        if isinstance(input_ids, list):
            completion["prompt_token_ids"] = input_ids
    return completion


def _first_tool_name(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    function = tools[0].get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _content(message: Any) -> Any:
    return message.get("content") if isinstance(message, dict) else None


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
        return JSONResponse(completion_for(body, flavor=flavor))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
        ]
    )
