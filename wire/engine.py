"""What an engine answers: a deterministic OpenAI-compatible completion, in the
dialect of each engine (``Flavor``), whole or as stream chunks. No I/O.

The reference server's fake engine (``refserver.fake_upstream``) and the
harness's chaos upstream both answer through it, so both speak the same
dialect. Equal conversations get equal answers: the text is derived from a hash
of the messages, which keeps replays and retries comparable.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any, Literal

Flavor = Literal["openai", "sglang", "sglang-generate"]
"""``openai``: OpenAI's chat completions. ``sglang``: SGLang's OpenAI-compatible
routes, with SGLang's extra fields. ``sglang-generate``: SGLang's native
``/generate`` too (``wire.generate``), its chat routes answering as ``sglang``."""
FLAVORS: tuple[Flavor, ...] = ("openai", "sglang", "sglang-generate")


# A made-up vocabulary: token ids derived from each word, so answers, prompt ids
# and logprobs stay deterministic (equal requests, equal answers).
_EOS_TOKEN_ID = 2


def completion_for(
    body: dict[str, Any],
    *,
    flavor: Flavor = "openai",
    finish_reason: str = "stop",
    tool_call_content: str | None = None,
) -> dict[str, Any]:
    """The engine's answer to ``body``, in the dialect of ``flavor``.

    ``openai``: OpenAI's chat.completion object, field for field (a choice
    carries ``logprobs``, null unless asked for; the message ``refusal``).
    ``sglang``: SGLang's ``ChatCompletionResponse``
    (``python/sglang/srt/entrypoints/openai/protocol.py``): the message has
    ``reasoning_content``, tool calls an ``index``, the choice
    ``matched_stop``; ``prompt_token_ids`` with ``return_prompt_token_ids``,
    ``token_ids`` with ``return_token_ids``, and ``meta_info`` (with
    ``output_token_logprobs`` when ``logprobs`` is asked for) with
    ``return_meta_info`` or ``logprobs``, as RL session servers built on
    SGLang read them. The usage has SGLang's extra fields. A request that carries
    ``input_ids`` (a server that tokenized the prompt itself) gets those back as
    ``prompt_token_ids``, and its prompt counted in them.

    ``tool_call_content``: the message's ``content`` beside tool calls: null, as
    OpenAI and current SGLang send it, or "" as SGLang builds patched for servers
    that refuse null send it.
    """
    messages = body.get("messages") or []
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    text = f"answer {digest[:12]} to turn {sum(1 for m in messages if _role(m) == 'user')}"
    # Counted on every call; token ids are made only when an SGLang client asks
    # for them (hashing every prompt word cost 1.8 ms for a 60-message turn).
    prompt_words = [word for m in messages for word in str(_content(m)).split()]
    output_words = text.split()
    sglang = flavor != "openai"
    aborted = finish_reason == "abort"
    if aborted:
        # Aborted before its first token (a weight update, say): SGLang answers
        # with what it had generated, which is nothing.
        text, output_words = "", []
    message: dict[str, Any] = {"role": "assistant", "content": text}
    tool = None if aborted else _first_tool_name(body)
    if tool is not None:
        # An agent that offered tools gets a tool call, so its next turn can be
        # the tool's result (some servers only accept tool messages after a turn).
        call: dict[str, Any] = {
            "id": f"call_{digest[:16]}",
            **({"index": 0} if sglang else {}),  # SGLang's ToolCall carries its index
            "type": "function",
            "function": {"name": tool, "arguments": json.dumps({"turn": digest[:8]})},
        }
        message = {"role": "assistant", "content": tool_call_content, "tool_calls": [call]}
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    if sglang:
        message = {
            "role": "assistant",
            "content": message["content"],
            "reasoning_content": None,
            "tool_calls": message.get("tool_calls"),
        }
    else:
        message["refusal"] = None
    wants_logprobs = body.get("logprobs") is True
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "logprobs": _logprobs(output_words) if wants_logprobs else None,
        "finish_reason": finish_reason,
    }
    if sglang:
        choice["matched_stop"] = _EOS_TOKEN_ID if finish_reason == "stop" else None
        if body.get("return_prompt_token_ids") is True:
            choice["prompt_token_ids"] = _prompt_ids(body, prompt_words)
        if body.get("return_token_ids") is True:
            choice["token_ids"] = _token_ids(output_words)
        if body.get("return_meta_info") is True or wants_logprobs:
            meta: dict[str, Any] = {
                "id": digest[:32],
                "finish_reason": {"type": finish_reason, "matched": choice["matched_stop"]},
                "prompt_tokens": _prompt_length(body, prompt_words),
                "completion_tokens": len(output_words),
                "cached_tokens": 0,
            }
            if wants_logprobs:
                # (logprob, token id, token text): text only with return_text_in_logprobs.
                meta["output_token_logprobs"] = [
                    [_logprob(i), token, None] for i, token in enumerate(_token_ids(output_words))
                ]
            choice["meta_info"] = meta
    usage: dict[str, Any] = {
        "prompt_tokens": len(prompt_words),
        "completion_tokens": len(output_words),
        "total_tokens": len(prompt_words) + len(output_words),
    }
    if sglang:
        usage = {
            "prompt_tokens": usage["prompt_tokens"],
            "total_tokens": usage["total_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "prompt_tokens_details": None,
            "reasoning_tokens": 0,
        }
    completion: dict[str, Any] = {
        "id": f"chatcmpl-{digest[:24]}",
        "object": "chat.completion",
        "created": 0,
        "model": str(body.get("model") or "sessctl-fake"),
        "choices": [choice],
        "usage": usage,
    }
    if sglang:
        completion["metadata"] = None
    else:
        completion["system_fingerprint"] = None
    return completion


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as an engine reads it: a JSON object, or ``ValueError`` saying
    what it is instead."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("invalid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("expected an object")
    return body


def encode_completion(completion: dict[str, Any], flavor: Flavor) -> bytes:
    """The body as each engine writes it: SGLang answers with compact JSON (orjson)."""
    if flavor != "openai":
        return json.dumps(completion, separators=(",", ":")).encode()
    return json.dumps(completion).encode()


def stream_chunks(
    completion: dict[str, Any], flavor: Flavor, *, parts: int = 3, wants_usage: bool = False
) -> list[dict[str, Any]]:
    """``completion`` as the engine streams it: ``parts`` chunks of the answer (the
    first also carries the role), then the chunk with ``finish_reason``, then a
    usage chunk if the request asked for one (``stream_options.include_usage``).

    Text is cut into ``parts`` pieces; a tool call's arguments are, after a first
    chunk with its id and name, the way engines stream them.
    """
    sglang = flavor != "openai"
    choice = completion["choices"][0]
    message = choice["message"]
    base = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        streamed: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if sglang:
            streamed["matched_stop"] = choice.get("matched_stop") if finish_reason else None
        return {**base, "choices": [streamed]}

    deltas: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    if calls:
        call = calls[0]
        arguments = call["function"]["arguments"]
        head = {"index": 0, "id": call["id"], "type": "function"}
        pieces = _split(arguments, max(1, parts - 1))
        deltas.append(
            {
                "tool_calls": [
                    {**head, "function": {"name": call["function"]["name"], "arguments": ""}}
                ]
            }
        )
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces]
    else:
        deltas = [{"content": piece} for piece in _split(message.get("content") or "", parts)]
    deltas[0] = {"role": "assistant", **({"content": None} if calls else {}), **deltas[0]}
    chunks = [chunk(delta) for delta in deltas]
    chunks.append(chunk({}, choice["finish_reason"]))
    if wants_usage:
        chunks.append({**base, "choices": [], "usage": completion["usage"]})
    return chunks


def _split(text: str, parts: int) -> list[str]:
    """``text`` in ``parts`` pieces that join back to it (some may be empty)."""
    size = -(-len(text) // parts) if text else 0
    return [text[i * size : (i + 1) * size] for i in range(parts)] if size else [""] * parts


def encode_chunk(chunk: dict[str, Any], flavor: Flavor) -> bytes:
    """One Server-Sent Event, framed as each engine writes it."""
    return b"data: " + encode_completion(chunk, flavor) + b"\n\n"


STREAM_END = b"data: [DONE]\n\n"


def _given_ids(body: dict[str, Any]) -> list[int] | None:
    ids = body.get("input_ids")
    if isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return ids
    return None


def _prompt_ids(body: dict[str, Any], words: list[str]) -> list[int]:
    """The prompt's token ids: the ones the server sent, else made from its words."""
    given = _given_ids(body)
    return list(given) if given is not None else _token_ids(words)


def _prompt_length(body: dict[str, Any], words: list[str]) -> int:
    given = _given_ids(body)
    return len(given) if given is not None else len(words)


def _token_ids(words: list[str]) -> list[int]:
    # A made-up vocabulary: each word's id derived from the word (crc32 is
    # deterministic across processes, unlike hash()).
    return [1000 + zlib.crc32(word.encode()) % 150_000 for word in words]


def _logprob(index: int) -> float:
    return round(-0.1 * (index + 1), 6)


def _logprobs(words: list[str]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": word,
                "bytes": list(word.encode()),
                "logprob": _logprob(i),
                "top_logprobs": [],
            }
            for i, word in enumerate(words)
        ]
    }


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
