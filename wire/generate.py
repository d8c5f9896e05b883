"""SGLang's native ``POST /generate``: the request a session server sends, and
the answer and stream SGLang gives it. No I/O.

Read from SGLang's ``managers/io_struct.py`` (``GenerateReqInput``) and its HTTP
server, and from the clients that call it (AReaL's ``sglang_remote.py``, slime,
miles). A request carries the prompt as ``text`` or ``input_ids`` (what a server
that applies its own chat template sends), ``sampling_params``, and
``return_logprob`` / ``stream``. The answer::

    {"text": "...", "output_ids": [...],
     "meta_info": {"id": ..., "finish_reason": {"type": "stop", "matched": 2},
                   "prompt_tokens": N, "completion_tokens": M, "cached_tokens": 0,
                   "output_token_logprobs": [[logprob, token_id, null], ...]}}

``finish_reason.type`` is ``stop``, ``length`` or ``abort`` (``{"type": "abort",
"message": "Abort before prefill"}`` while weights are updated: no tokens; the
server re-sends). A stream is Server-Sent Events of that object, its ``text``,
``output_ids`` and logprobs so far (cumulative), ``finish_reason`` null until
the last, then ``data: [DONE]``. Errors are ``{"error": {"message": ...}}``.

The chaos upstream reads a prompt given as ids with the shipped tokenizer
(``wire.tokens``), and answers a turn that offered tools with a ``<tool_call>``
in the text, as a model does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .engine import json_object
from .tokens import END_OF_TURN, tokenizer, tool_call_text, tools_in_prompt


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    """The prompt as text (decoded, where it came as ids)."""
    prompt_tokens: int
    stream: bool
    return_logprob: bool

    def as_chat(self) -> dict[str, Any]:
        """The request as a chat body, for what is shared with chat engines: the
        marker (the last one in the prompt names the step), the offered tools,
        and an answer derived from the whole prompt."""
        tools = [
            {"type": "function", "function": {"name": n}} for n in tools_in_prompt(self.prompt)
        ]
        body: dict[str, Any] = {"messages": [{"role": "user", "content": self.prompt}]}
        if tools:
            body["tools"] = tools
        if self.stream:
            body["stream"] = True
        return body


def parse_generate_request(raw: bytes) -> GenerateRequest:
    """A ``/generate`` body; ``ValueError`` with SGLang's reason if it is not one."""
    body = json_object(raw)
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise ValueError("Either text or input_ids should be provided.")
    if ids is not None:
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise ValueError("input_ids must be a list of token ids (a batch is not supported)")
        prompt, count = tokenizer().decode(ids), len(ids)
    elif isinstance(text, str):
        prompt, count = text, len(tokenizer().encode(text))
    else:
        raise ValueError("text must be a string (a batch is not supported)")
    params = body.get("sampling_params")
    if params is not None and not isinstance(params, dict):
        raise ValueError("sampling_params must be an object")
    return GenerateRequest(
        prompt, count, body.get("stream") is True, body.get("return_logprob") is True
    )


def answer_text(completion: dict[str, Any]) -> str:
    """What a model generates for this chat completion's answer: its text, or its
    tool call as the chat template writes one."""
    message = completion["choices"][0]["message"]
    calls = message.get("tool_calls") or []
    if calls:
        function = calls[0]["function"]
        return (message.get("content") or "") + tool_call_text(
            function["name"], function["arguments"]
        )
    return str(message.get("content") or "")


@dataclass
class Generation:
    """One ``/generate`` answer, whole or as a stream of cumulative chunks."""

    request: GenerateRequest
    text: str
    finish: str
    """``stop``, or ``abort`` (nothing generated)."""

    def __post_init__(self) -> None:
        self._digest = hashlib.sha256(self.request.prompt.encode()).hexdigest()[:32]
        self._ids = [] if self.finish == "abort" else tokenizer().encode(self.text)

    @property
    def output_ids(self) -> list[int]:
        """The tokens, ending with the end of the turn (as ``skip_special_tokens``
        leaves it out of ``text``)."""
        if self.finish == "abort":
            return []
        return [*self._ids, tokenizer().token_id(END_OF_TURN)]

    def answer(self) -> dict[str, Any]:
        return self._state(len(self.output_ids), finished=True)

    def chunks(self, parts: int) -> list[dict[str, Any]]:
        """The stream's objects: ``parts`` growing prefixes of the answer, then
        the one with ``finish_reason`` (one object, if aborted)."""
        total = len(self.output_ids)
        if self.finish == "abort" or total == 0:
            return [self._state(total, finished=True)]
        cuts = sorted({max(1, total * i // max(1, parts)) for i in range(1, parts + 1)})
        states = [self._state(min(cut, total - 1), finished=False) for cut in cuts if cut < total]
        return [*states, self._state(total, finished=True)]

    def _state(self, count: int, *, finished: bool) -> dict[str, Any]:
        ids = self.output_ids[:count]
        text = tokenizer().decode(ids, skip_special=True)
        finish_reason: dict[str, Any] | None = None
        if finished:
            finish_reason = (
                {"type": "abort", "message": "Abort before prefill"}
                if self.finish == "abort"
                else {"type": "stop", "matched": tokenizer().token_id(END_OF_TURN)}
            )
        meta: dict[str, Any] = {
            "id": self._digest,
            "finish_reason": finish_reason,
            "prompt_tokens": self.request.prompt_tokens,
            "completion_tokens": len(ids),
            "cached_tokens": 0,
        }
        if self.request.return_logprob:
            meta["output_token_logprobs"] = [
                [-0.01 * (i % 7 + 1), token, None] for i, token in enumerate(ids)
            ]
        return {"text": text, "output_ids": ids, "meta_info": meta}


def encode_generate(payload: dict[str, Any]) -> bytes:
    """SGLang writes its answers with orjson: compact."""
    return json.dumps(payload, separators=(",", ":")).encode()


def generate_error(message: str) -> bytes:
    return encode_generate({"error": {"message": message}})
