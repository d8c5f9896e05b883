"""The client for the LLM engine: POST ``{base}/chat/completions`` with retries.

The bytes travel over ``engine_http.EngineConnections``; its
``EngineTransportError`` becomes a retry, and then ``UpstreamError`` /
``UpstreamTimeout``, here. An answer is bounded (``MAX_ANSWER_BYTES``).

Retried, with exponential backoff, a bounded number of times: connection
errors, 429, 503, and completions whose ``finish_reason`` is ``"abort"``
(SGLang aborts requests while it updates weights). Everything else that is
not a usable completion fails at once. The whole call, retries included,
runs under one deadline, and under the caller's cancel scope, so a DELETE
preempts a backoff sleep as surely as a pending request.

A streamed call (``stream``) is retried the same way only until its first
chunk has been relayed to the client: after that the client has seen
tokens, so a failure ends the turn (``StreamCut``) instead. The chunk that
carries ``finish_reason``, and any after it, are not relayed but returned,
to be sent once the turn is committed (``streaming.py``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from wire import strictjson
from wire.errors import InvalidRequest, StreamCut, UpstreamError, UpstreamTimeout
from wire.protocol import check_message
from wire.streaming import ChunkRefused, EventReader, StreamAssembler, event, replay_chunks

from .transport.engine_http import EngineConnections, EngineResponse, EngineTransportError

Answer = TypeVar("Answer")

Relay = Callable[[bytes], Awaitable[None]]
"""Sends one Server-Sent Event (already framed) to the client."""


@dataclass(frozen=True)
class StreamedAnswer:
    completion: dict[str, Any]
    """The assembled answer, as a ``chat.completion``: what is committed."""
    tail: list[bytes]
    """The events held back until the commit: the finishing chunk, and any after it."""


RETRYABLE_STATUS = frozenset({429, 503})

MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""The most an engine's answer (a completion, or a whole stream) may take: it is
held in memory and committed, and no real answer comes near it."""


class Upstream(Protocol):
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def stream(self, body: dict[str, Any], relay: Relay) -> StreamedAnswer: ...


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    """Calls in all, the first included."""
    backoff_initial: float = 0.05
    backoff_max: float = 1.0
    retry_aborts: bool = True
    """Treat ``finish_reason: "abort"`` as a failure to retry (off only in a variant)."""
    retry_after_relay: bool = False
    """Retry a stream that broke after chunks were relayed (on only in a variant)."""
    shield_retries: bool = False
    """Once an attempt failed, back off and retry whatever cancels the turn, a DELETE
    included (on only in a variant)."""

    def backoff(self, failed_attempts: int) -> float:
        delay: float = self.backoff_initial * 2 ** (failed_attempts - 1)
        return min(self.backoff_max, delay)


class _Retryable(Exception):
    """An attempt failed in a way the next attempt may not."""


class HttpUpstream:
    def __init__(self, engine: EngineConnections, *, timeout: float, retry: RetryPolicy) -> None:
        self._engine = engine
        self._timeout = timeout
        self._retry = retry

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        with trio.move_on_after(self._timeout):
            return await self._with_retries(lambda: self._attempt(body))
        raise UpstreamTimeout(f"the upstream did not answer within {self._timeout:g} s")

    async def _with_retries(
        self,
        attempt: Callable[[], Awaitable[Answer]],
        unless: Callable[[Exception], None] = lambda failure: None,
    ) -> Answer:
        """``attempt`` until it succeeds, with backoff; ``unless`` may raise instead
        of letting a failure be retried. A broken connection is retried too."""
        last_failure = ""
        for number in range(1, self._retry.attempts + 1):
            shielded = number > 1 and self._retry.shield_retries
            try:
                # No scope unless shielded: one per engine call costs for nothing.
                with trio.CancelScope(shield=True) if shielded else nullcontext():
                    return await attempt()
            except (_Retryable, EngineTransportError) as failure:
                unless(failure)
                last_failure = str(failure)
            if number < self._retry.attempts:
                with trio.CancelScope(shield=self._retry.shield_retries):
                    await trio.sleep(self._retry.backoff(number))
        raise UpstreamError(
            f"the upstream failed {self._retry.attempts} times; last: {last_failure}",
            attempts=self._retry.attempts,
        )

    async def _attempt(self, body: dict[str, Any]) -> dict[str, Any]:
        async with self._engine.post("/chat/completions", _encode(body)) as response:
            _check_status(response)
            content = await _read(response)
            if response.status != 200:
                raise _refused(response.status, content)
        completion = _parse_completion(content)
        if self._retry.retry_aborts and completion["choices"][0].get("finish_reason") == "abort":
            raise _Retryable("the completion was aborted (finish_reason: abort)")
        _check_answer(completion)
        return completion

    async def stream(self, body: dict[str, Any], relay: Relay) -> StreamedAnswer:
        relayed = 0

        async def counted(data: bytes) -> None:
            nonlocal relayed
            relayed += 1
            await relay(data)

        assembler = StreamAssembler()

        async def attempt() -> StreamedAnswer:
            nonlocal assembler
            assembler = StreamAssembler()
            return await self._stream_attempt(body, counted, assembler)

        def unless_relayed(failure: Exception) -> None:
            if relayed and not self._retry.retry_after_relay:
                # The client has seen tokens: another attempt would send it a
                # second, different beginning. The turn ends here.
                raise StreamCut(
                    f"the upstream stream broke after {relayed} relayed chunk(s): {failure}",
                    assembler.completion(),
                ) from None

        with trio.move_on_after(self._timeout):
            return await self._with_retries(attempt, unless_relayed)
        if relayed:
            raise StreamCut(
                f"the upstream stream did not finish within {self._timeout:g} s",
                assembler.completion(),
            )
        raise UpstreamTimeout(f"the upstream did not answer within {self._timeout:g} s")

    async def _stream_attempt(
        self, body: dict[str, Any], relay: Relay, assembler: StreamAssembler
    ) -> StreamedAnswer:
        tail: list[bytes] = []
        async with self._engine.post(
            "/chat/completions", _encode(body), accept="text/event-stream"
        ) as response:
            _check_status(response)
            if response.status != 200:
                raise _refused(response.status, await _read(response))
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                # An engine that ignores stream: true answers one JSON completion;
                # it is relayed as the chunks it would have been.
                return self._whole_answer_as_stream(await _read(response))
            events = EventReader()
            received = 0
            while (part := await response.next_part()) is not None:
                received += len(part)
                if received > MAX_ANSWER_BYTES:
                    raise UpstreamError(f"the upstream's stream exceeds {MAX_ANSWER_BYTES} bytes")
                for data in events.feed(part):
                    if data.strip() == b"[DONE]":
                        if not assembler.finished:
                            raise _Retryable("the stream ended ([DONE]) without a finish_reason")
                        return self._finished(assembler, tail)
                    try:
                        assembler.add(strictjson.loads(data))
                    except (strictjson.JsonRefused, ChunkRefused) as refused:
                        raise _Retryable(f"the upstream sent a refused chunk: {refused}") from None
                    if assembler.finished:
                        tail.append(b"data: " + data + b"\n\n")
                    else:
                        await relay(b"data: " + data + b"\n\n")
        raise _Retryable(f"the stream ended after {assembler.chunks} chunk(s) without [DONE]")

    def _finished(self, assembler: StreamAssembler, tail: list[bytes]) -> StreamedAnswer:
        if self._retry.retry_aborts and assembler.finish_reason == "abort":
            raise _Retryable("the stream was aborted (finish_reason: abort)")
        completion = assembler.completion()
        _check_answer(completion)
        return StreamedAnswer(completion, tail)

    def _whole_answer_as_stream(self, content: bytes) -> StreamedAnswer:
        completion = _parse_completion(content)
        if self._retry.retry_aborts and completion["choices"][0].get("finish_reason") == "abort":
            raise _Retryable("the completion was aborted (finish_reason: abort)")
        _check_answer(completion)
        return StreamedAnswer(completion, [event(c) for c in replay_chunks(completion)])


def _encode(body: dict[str, Any]) -> bytes:
    # Compact, and UTF-8 as it came: the body was parsed strictly, so it has no NaN.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _check_status(response: EngineResponse) -> None:
    if response.status in RETRYABLE_STATUS:
        raise _Retryable(f"HTTP {response.status}")


async def _read(response: EngineResponse) -> bytes:
    content = await response.read(MAX_ANSWER_BYTES)
    if content is None:
        raise UpstreamError(f"the upstream's answer exceeds {MAX_ANSWER_BYTES} bytes")
    return content


def _refused(status: int, content: bytes) -> UpstreamError:
    text = content[:200].decode(errors="replace")
    return UpstreamError(f"the upstream answered HTTP {status}: {text}", upstream_status=status)


def _parse_completion(content: bytes) -> dict[str, Any]:
    # The answer is committed and later sent back by clients, so it must be
    # JSON we can re-encode and a message the contract would accept.
    try:
        completion = strictjson.loads(content)
    except strictjson.JsonRefused as refused:
        raise UpstreamError(f"the upstream answered 200 with a refused body: {refused}") from None
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamError("the upstream's completion has no choices")
    assert isinstance(completion, dict)
    return completion


def _check_answer(completion: dict[str, Any]) -> None:
    message = completion["choices"][0].get("message")
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise UpstreamError("the upstream's first choice has no assistant message")
    try:
        check_message(message, "choices[0].message")
    except InvalidRequest as invalid:
        raise UpstreamError(f"the upstream's answer is not a valid message: {invalid}") from None


ENGINE_ONLY_EMPTY = ("refusal", "reasoning_content", "audio", "function_call", "annotations")
"""Fields an engine puts on every assistant message, empty (null, or ``[]``), that
no agent sends back: committed, they would make a turn read back differently
once the agent's echo of it replaced it. Empty, they are dropped; with a value
(a refusal's text, SGLang's reasoning) they are kept."""


def assistant_message(completion: dict[str, Any]) -> dict[str, Any]:
    """The answer as it is committed: the engine's message, without its empty
    engine-only fields (``ENGINE_ONLY_EMPTY``)."""
    message: dict[str, Any] = completion["choices"][0]["message"]
    return {
        key: value
        for key, value in message.items()
        if not (key in ENGINE_ONLY_EMPTY and value in (None, []))
    }
