"""The client for the LLM engine: POST ``{base}/chat/completions`` with retries.

This is the only module that meets httpx; its exceptions become
``UpstreamError`` / ``UpstreamTimeout`` here.

Retried, with exponential backoff, a bounded number of times: connection
errors, 429, 503, and completions whose ``finish_reason`` is ``"abort"``
(SGLang aborts requests while it updates weights). Everything else that is
not a usable completion fails at once. The whole call, retries included,
runs under one deadline, and under the caller's cancel scope, so a DELETE
preempts a backoff sleep as surely as a pending request.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio

from . import strictjson
from .errors import InvalidRequest, UpstreamError, UpstreamTimeout
from .protocol import check_message

RETRYABLE_STATUS = frozenset({429, 503})


def base_url_problem(url: str, example: str = "http://127.0.0.1:30000/v1") -> str | None:
    """Why ``url`` cannot be a base URL (of an upstream, or a target), or None if it can."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        return f"{url!r} is not a URL: {error}"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return f"{url!r} is not an http(s) URL with a host, such as {example}"
    if parsed.query or parsed.fragment:
        return f"{url!r} has a query or fragment; give the base URL only"
    return None


class Upstream(Protocol):
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    """Calls in all, the first included."""
    backoff_initial: float = 0.05
    backoff_max: float = 1.0
    retry_aborts: bool = True
    """Treat ``finish_reason: "abort"`` as a failure to retry (off only in a variant)."""

    def backoff(self, failed_attempts: int) -> float:
        delay: float = self.backoff_initial * 2 ** (failed_attempts - 1)
        return min(self.backoff_max, delay)


class _Retryable(Exception):
    """An attempt failed in a way the next attempt may not."""


class HttpUpstream:
    def __init__(
        self,
        base_url: str,
        clients: Sequence[httpx.AsyncClient],
        *,
        timeout: float,
        retry: RetryPolicy,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        # Calls are spread round-robin over several clients: under trio, one
        # httpx pool serving 64 concurrent calls is itself the bottleneck
        # (benchmarks/refserver_bench.py compares 1 client with 8).
        self._clients = itertools.cycle(clients)
        self._timeout = timeout
        self._retry = retry

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        with trio.move_on_after(self._timeout):
            return await self._complete_with_retries(body)
        raise UpstreamTimeout(f"the upstream did not answer within {self._timeout:g} s")

    async def _complete_with_retries(self, body: dict[str, Any]) -> dict[str, Any]:
        last_failure = ""
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return await self._attempt(body)
            except _Retryable as failure:
                last_failure = str(failure)
            if attempt < self._retry.attempts:
                await trio.sleep(self._retry.backoff(attempt))
        raise UpstreamError(
            f"the upstream failed {self._retry.attempts} times; last: {last_failure}",
            attempts=self._retry.attempts,
        )

    async def _attempt(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await next(self._clients).post(self._url, json=body)
        except httpx.TransportError as error:
            raise _Retryable(f"{type(error).__name__}: {error or 'connection failed'}") from None
        if response.status_code in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise UpstreamError(
                f"the upstream answered HTTP {response.status_code}: {response.text[:200]}",
                upstream_status=response.status_code,
            )
        completion = _parse_completion(response.content)
        if self._retry.retry_aborts and completion["choices"][0].get("finish_reason") == "abort":
            raise _Retryable("the completion was aborted (finish_reason: abort)")
        _check_answer(completion)
        return completion


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


def assistant_message(completion: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = completion["choices"][0]["message"]
    return message
