"""A session server shaped like AReaL's OpenAI proxy, for tests.

Written apart from the reference, after ``areal/experimental/openai/proxy/
proxy_rollout_server.py`` as read (``inclusionAI/AReaL``):

* an admin key guards ``POST /grant_capacity``, which must come before each
  ``POST /rl/start_session`` (body ``{"task_id"}``), which answers
  ``{"session_id": "<task>-<n>", "api_key"}``;
* the agent's base URL is the root: ``POST /chat/completions`` with
  ``Authorization: Bearer <api_key>`` (or ``x-api-key``);
* ``POST /rl/end_session`` with the session's key finishes the session;
  ``POST /export_trajectories`` with the admin key and ``{"session_id"}`` waits
  for the finish, answers every recorded call as ``{"interactions": {id:
  {"messages", "output_message_list", ...}}}``, and removes the session;
* every call is a record: nothing checks that a turn extends the trajectory,
  concurrent calls all run, an exact retry is a second record;
* the prompt is rendered with the tokenizer's chat template and tokenized; the
  engine is SGLang's native ``POST /generate`` (``input_ids``, or ``text``),
  non-streaming; ``finish_reason.type == "abort"`` is re-sent with the tokens
  generated so far; a ``stream: true`` chat gets the whole answer as chunks.

Its tokenizer is the one sessctl ships (``wire/tokenizer``), loaded with
Hugging Face's ``tokenizers`` and its chat template rendered with Jinja, as a
server loads its ``hf_checkpoint``.

Planted defects (each off when ``fixed`` holds it):

* ``end_does_not_stop``: the end does not stop a turn in flight; it answers 200
  later, and is missing from the export that already happened;
* ``retry_after_end``: an engine call that failed is retried after the
  session's end;
* ``chat_after_end``: a chat between the end and the export is accepted (and
  recorded): AReaL's own behaviour, as read.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx
import jinja2
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer

from wire.tokens import TOKENIZER_DIR

from .field_kit import parse_json, unless_hung_up, well_formed

DEFECTS = frozenset({"end_does_not_stop", "retry_after_end", "chat_after_end"})
ATTEMPTS = 3
MAX_BODY = 8 * 1024 * 1024


def _detail(status: int, detail: str) -> JSONResponse:
    """FastAPI's HTTPException, as AReaL raises it."""
    return JSONResponse({"detail": detail}, status_code=status)


@dataclass
class _Session:
    session_id: str
    completions: dict[str, dict[str, Any]] = field(default_factory=dict)
    completed: trio.Event = field(default_factory=trio.Event)
    in_flight: set[trio.CancelScope] = field(default_factory=set)


class _Model:
    """The tokenizer and chat template a server loads from its checkpoint."""

    def __init__(self) -> None:
        self.tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
        config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
        environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        self.template = environment.from_string(config["chat_template"])
        self.eos = config["eos_token"]

    def prompt(self, messages: list[dict[str, Any]], tools: Any) -> str:
        return self.template.render(messages=messages, tools=tools, add_generation_prompt=True)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _message_of(text: str) -> dict[str, Any]:
    """A completion's text as an assistant message: Hermes-style ``<tool_call>``
    JSON becomes tool calls (as Qwen's parser reads them)."""
    head, _, rest = text.partition("<tool_call>")
    if not rest:
        return {"role": "assistant", "content": text}
    calls = []
    for part in ("<tool_call>" + rest).split("<tool_call>")[1:]:
        try:
            call = json.loads(part.split("</tool_call>", 1)[0])
        except json.JSONDecodeError:
            return {"role": "assistant", "content": text}
        calls.append(
            {
                "id": f"call_{secrets.token_hex(6)}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
            }
        )
    return {"role": "assistant", "content": head or None, "tool_calls": calls}


def create_areal_app(
    engine_url: str,
    *,
    admin_key: str,
    engine_input: str = "ids",
    defects: frozenset[str] = DEFECTS,
) -> Starlette:
    """``engine_url``: the root of an SGLang server (``/generate`` under it).
    ``engine_input``: ``ids`` (the prompt tokenized here) or ``text``."""
    unknown = defects - DEFECTS
    assert not unknown, unknown
    model = _Model()
    sessions: dict[str, _Session] = {}
    keys: dict[str, str] = {}  # api_key -> session id
    capacity = 0
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    def bearer(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.headers.get("x-api-key") or None

    def is_admin(request: Request) -> bool:
        return hmac.compare_digest(bearer(request) or "", admin_key)

    async def grant_capacity(request: Request) -> Response:
        nonlocal capacity
        if not is_admin(request):
            return _detail(403, "Invalid admin API key.")
        capacity += 1
        return JSONResponse({"capacity": capacity})

    async def start_session(request: Request) -> Response:
        nonlocal capacity
        if not is_admin(request):
            return _detail(403, "Invalid admin API key.")
        try:
            body = parse_json(await request.body())
            task_id = body["task_id"]
        except (ValueError, KeyError, TypeError):
            return _detail(422, "task_id is required")
        if capacity <= 0:
            return _detail(429, "No available capacity to start a new session")
        index = 0
        while f"{task_id}-{index}" in sessions:
            index += 1
        session_id = f"{task_id}-{index}"
        api_key = secrets.token_urlsafe(24)
        capacity -= 1
        sessions[session_id] = _Session(session_id)
        keys[api_key] = session_id
        return JSONResponse({"session_id": session_id, "api_key": api_key})

    async def end_session(request: Request) -> Response:
        session = sessions.get(keys.get(bearer(request) or "", ""))
        if session is None:
            return _detail(401, "Invalid or expired session API key.")
        if session.completed.is_set():
            return _detail(410, "Session already ended or expired")
        count = len(session.completions)
        session.completed.set()
        if "end_does_not_stop" not in defects:
            for scope in session.in_flight:
                scope.cancel()
        return JSONResponse({"message": "success", "interaction_count": count})

    async def export_trajectories(request: Request) -> Response:
        if not is_admin(request):
            return _detail(403, "Invalid admin API key.")
        try:
            session_id = parse_json(await request.body())["session_id"]
        except (ValueError, KeyError, TypeError):
            return _detail(422, "session_id is required")
        session = sessions.get(session_id)
        if session is None:
            return _detail(404, f"Session {session_id} not found")
        await session.completed.wait()
        sessions.pop(session_id, None)
        for key in [k for k, s in keys.items() if s == session_id]:
            del keys[key]
        return JSONResponse({"interactions": dict(session.completions)})

    async def generate(session: _Session, prompt: str) -> list[int] | Response:
        """The completion's token ids; an abort re-sent with what it had made."""
        input_ids = model.ids(prompt)
        output: list[int] = []
        failure = "no attempt"
        attempts = 0
        while attempts < ATTEMPTS:
            if attempts:
                await trio.sleep(0.05 * attempts)  # back off before a retry
                if session.completed.is_set() and "retry_after_end" not in defects:
                    return _detail(410, f"Session {session.session_id} ended during the turn")
            attempts += 1
            payload: dict[str, Any] = {
                "sampling_params": {"max_new_tokens": 256, "temperature": 1.0},
                "return_logprob": True,
                "stream": False,
            }
            if engine_input == "ids":
                payload["input_ids"] = input_ids + output
            else:
                payload["text"] = prompt + model.text(output)
            # Checked again here, with no wait before the call is registered: a
            # chat that passed the first check may have waited (its body, say)
            # while the end came and went.
            if session.completed.is_set() and attempts == 1 and "chat_after_end" not in defects:
                return _detail(410, f"Session {session.session_id} already ended or expired")
            # The end stops the engine call in flight (unless end_does_not_stop).
            scope = trio.CancelScope()
            session.in_flight.add(scope)
            try:
                with scope:
                    answer = await client.post(f"{engine_url}/generate", json=payload)
            except httpx.TransportError as failed:
                failure = type(failed).__name__
                continue
            finally:
                session.in_flight.discard(scope)
            if scope.cancelled_caught:
                return _detail(410, f"Session {session.session_id} ended during the turn")
            if answer.status_code in (429, 503):
                failure = f"engine {answer.status_code}"
                continue
            if answer.status_code != 200:
                return _detail(500, f"engine answered {answer.status_code}")
            try:
                meta = answer.json()["meta_info"]
                reason = meta["finish_reason"]["type"]
                tokens = [entry[1] for entry in meta.get("output_token_logprobs") or []]
            except (ValueError, KeyError, TypeError, IndexError):
                return _detail(500, "ValueError: the engine's answer is not SGLang's")
            output += tokens
            if reason == "abort":
                failure = "aborted"
                attempts -= 1 if tokens else 0  # progress made: not a failed attempt
                continue
            return output
        return _detail(500, f"the engine failed: {failure}")

    async def chat(request: Request) -> Response:
        session_id = keys.get(bearer(request) or "")
        session = sessions.get(session_id or "")
        if session is None:
            return _detail(401, "Invalid or expired session API key.")
        if session.completed.is_set() and "chat_after_end" not in defects:
            return _detail(410, f"Session {session.session_id} already ended or expired")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _detail(413, "the body is over 8 MiB")
        try:
            body = parse_json(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _detail(400, "the body is not JSON")
        if not isinstance(body, dict) or not well_formed(body.get("messages")):
            return _detail(422, "messages must be a list of messages")
        messages: list[dict[str, Any]] = body["messages"]
        prompt = model.prompt(messages, body.get("tools"))
        outcome = await unless_hung_up(request, lambda: generate(session, prompt))
        if outcome is None:
            return Response(status_code=499)  # the client hung up: nothing recorded
        if isinstance(outcome, Response):
            return outcome
        text = model.text(outcome)
        message = _message_of(text)
        completion_id = f"chatcmpl-{secrets.token_hex(8)}"
        completion = {
            "id": completion_id,
            "object": "chat.completion",
            "created": 0,
            "model": str(body.get("model") or "areal"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": len(outcome), "total_tokens": 0},
        }
        # Recorded into the session object it started on: after an export has
        # removed it, that record is lost (the planted end_does_not_stop shows it).
        session.completions[completion_id] = {
            "messages": messages,
            "output_message_list": [message],
            "reward": None,
            "interaction_id": completion_id,
        }
        if body.get("stream") is True:
            return StreamingResponse(_chunks(completion), media_type="text/event-stream")
        return JSONResponse(completion)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "initialized": True})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/grant_capacity", grant_capacity, methods=["POST"]),
            Route("/rl/start_session", start_session, methods=["POST"]),
            Route("/rl/end_session", end_session, methods=["POST"]),
            Route("/export_trajectories", export_trajectories, methods=["POST"]),
            Route("/chat/completions", chat, methods=["POST"]),
        ]
    )


async def _chunks(completion: dict[str, Any]) -> Any:
    """The whole answer as OpenAI chunks (AReaL streams what it has generated)."""
    message = completion["choices"][0]["message"]
    base = {k: completion[k] for k in ("id", "created", "model")} | {
        "object": "chat.completion.chunk"
    }
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    for choice in (
        {"index": 0, "delta": delta, "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": "stop"},
    ):
        yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"
