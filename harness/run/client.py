"""Talking to the server under test: every httpx error becomes an Observation here."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
import trio.testing

from harness.results import Observation, SentRequest


class TargetClient:
    def __init__(
        self,
        base_url: str,
        *,
        request_timeout: float,
        in_process: bool = False,
        health_path: str | None = "/healthz",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.in_process = in_process
        # Any answer at all proves a server is up; without a health route, "/" will do.
        self.health_path = health_path or "/"
        self._timeout = request_timeout
        # A server that misbehaves may leave a pooled connection half-dead;
        # a small pool with short keep-alive limits the blast radius.
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(request_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(
        self,
        step: str,
        op: str,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        raw_body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Observation:
        request = SentRequest.of(method, self.base_url + path, json_body, raw_body)
        started = trio.current_time()
        retried_after: str | None = None
        for attempt in (1, 2):
            headers_arrived = False
            try:
                async with self._client.stream(
                    method,
                    path,
                    content=raw_body,
                    json=json_body if raw_body is None else None,
                    headers=headers,
                ) as response:
                    headers_arrived = True
                    await response.aread()
            except STALE_CONNECTION as error:
                # The server closed a kept-alive connection (after a 500, say,
                # without "Connection: close") and we wrote into it: nothing of
                # an answer came back. httpx has dropped that connection, so the
                # second attempt is on a fresh one; the observation records it.
                if attempt == 1 and not headers_arrived:
                    retried_after = _reason(error, self._timeout)
                    continue
                return self._failed(step, op, request, started, error, retried_after)
            except httpx.HTTPError as error:
                return self._failed(step, op, request, started, error, retried_after)
            break
        ended = trio.current_time()
        return Observation(
            step,
            op,
            request,
            response.status_code,
            started,
            ended,
            _body(response),
            retried_after=retried_after,
        )

    def _failed(
        self,
        step: str,
        op: str,
        request: SentRequest,
        started: float,
        error: httpx.HTTPError,
        retried_after: str | None,
    ) -> Observation:
        return Observation(
            step,
            op,
            request,
            None,
            started,
            trio.current_time(),
            transport_error=_reason(error, self._timeout),
            retried_after=retried_after,
        )

    async def settle(self) -> None:
        """Give the target the chance to take in every request already sent."""
        if self.in_process:
            # The server shares our trio loop: once every task is blocked, every
            # request sent so far has been read and is waiting on whatever it waits on.
            await trio.testing.wait_all_tasks_blocked()
            return
        # An external server is a black box; each round trip forces its event
        # loop around at least once more, behind the requests that came first.
        for _ in range(3):
            await self.send("settle", "get", "GET", self.health_path)

    async def probe(self) -> str | None:
        """None if the target answers HTTP at all (any status), else why not."""
        try:
            await self._client.get(self.health_path, timeout=min(self._timeout, 3.0))
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error or 'no answer'}"
        return None


STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
"""Errors of a connection that died before any byte of an answer arrived (a
kept-alive connection the server had closed); a timeout is not one of them."""


def _reason(error: httpx.HTTPError, timeout: float) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    return f"{type(error).__name__}: {error or 'connection failed'}"


def _body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"_raw": response.text[:500]}
