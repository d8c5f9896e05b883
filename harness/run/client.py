"""Talking to the server under test: every httpx error becomes an Observation here."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import httpx_sse
import trio
import trio.testing

from harness.results import Observation, SentRequest, StreamEnd, StreamRecord, error_type_of
from harness.run.transport import H11Transport, origin_of
from wire.anthropic import MessageAssembler, message_to_chat
from wire.streaming import ChunkRefused, StreamAssembler


@dataclass
class StreamProgress:
    """What the client of one streamed chat has received so far; scenarios wait on it."""

    chunks: int = 0
    finished: bool = False
    ended: bool = False
    _waiters: list[tuple[Callable[[], bool], trio.Event]] = field(default_factory=list)

    def took_chunk(self, *, finished: bool, hang_up_after: int | Literal["finish"] | None) -> bool:
        """One more chunk arrived; True if the scenario says to hang up now."""
        self.chunks += 1
        self.finished = finished
        self._changed()
        return (hang_up_after == "finish" and finished) or hang_up_after == self.chunks

    def _changed(self) -> None:
        for reached, event in self._waiters:
            if reached():
                event.set()

    async def wait_for(self, what: Literal["chunks", "finished"], count: int = 1) -> None:
        def reached() -> bool:
            # The end of the stream ends every wait: nothing more will come.
            return self.ended or (self.finished if what == "finished" else self.chunks >= count)

        if reached():
            return
        waiter = (reached, trio.Event())
        self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            self._waiters.remove(waiter)


@dataclass
class BodyGate:
    """Sends a request's body in two parts: all but its last byte, then the rest once
    ``open()`` is called. The server has the request (its headers, most of its body)
    but cannot act on it yet: a moment a turn is in the server before any engine call,
    made structural."""

    opened: trio.Event = field(default_factory=trio.Event)
    first_part_sent: trio.Event = field(default_factory=trio.Event)

    def open(self) -> None:
        self.opened.set()

    def content(self, body: bytes) -> AsyncIterator[bytes]:
        async def parts() -> AsyncIterator[bytes]:
            yield body[:-1]
            # Resumed: the transport has written the first part and asks for more.
            self.first_part_sent.set()
            await self.opened.wait()
            yield body[-1:]

        return parts()

    def request(
        self, json_body: Any, headers: dict[str, str] | None
    ) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        """The content and headers that send ``json_body`` through this gate."""
        body = json.dumps(json_body).encode()
        sized = {
            **(headers or {}),
            "content-type": "application/json",
            "content-length": str(len(body)),
        }
        return self.content(body), sized


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
        self.secrets: dict[str, str] = {}
        """A secret's value -> what reports show instead (``$AREAL_ADMIN_KEY``)."""
        # Any answer at all proves a server is up; without a health route, "/" will do.
        self.health_path = health_path or "/"
        self._timeout = request_timeout
        # A server that misbehaves may leave a pooled connection half-dead;
        # few kept-alive connections limit the blast radius. Every request
        # beyond them opens its own: one queued behind the harness's own pool
        # would look like a server that waits.
        self._transport = H11Transport(keepalive=64)
        # Streams are read through httpx (and httpx_sse); whole answers, most of
        # a run, skip its models (``send``). Both ask for the same.
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(request_timeout),
            transport=self._transport,
            headers=dict(DEFAULT_HEADERS),
        )
        url = httpx.URL(self.base_url)
        self._origin = origin_of(url)
        self._base_path = url.raw_path.rstrip(b"/")
        self._head = [(b"host", url.netloc), *DEFAULT_HEADERS]
        self._outgoing = _Outgoing()

    @property
    def timeout(self) -> float:
        """Seconds one request may take."""
        return self._timeout

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
        gate: BodyGate | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Observation:
        """One request; with ``gate``, its JSON body's last byte waits for the gate.
        ``on_sent`` is called as its first bytes go out (``Observation.sent``)."""
        request = SentRequest.of(
            method, self.base_url + path, self._redacted(json_body), raw_body, self._shown(headers)
        )
        started = trio.current_time()
        departure = _Departure(on_sent, None if gate else self._outgoing)
        retried_after: str | None = None
        target = self._target(path)
        try:
            for attempt in (1, 2):
                content, head = self._request(method, json_body, raw_body, headers, gate)
                try:
                    status, answer_headers, body = await self._transport.fetch(
                        self._origin,
                        method.encode("ascii"),
                        target,
                        head,
                        content,
                        timeout=self._timeout,
                        trace=departure.trace,
                    )
                except STALE_CONNECTION as error:
                    # The server closed a kept-alive connection (after a 500, say,
                    # without "Connection: close") and we wrote into it: nothing of
                    # an answer came back (an answer cut short is not retried: its
                    # head arrived). That connection is dropped, so the second
                    # attempt is on a fresh one; the observation records it.
                    if attempt == 1 and not departure.answered:
                        retried_after = _reason(error, self._timeout)
                        departure.again()
                        continue
                    return self._failed(step, op, request, started, error, retried_after, departure)
                except httpx.HTTPError as error:
                    return self._failed(step, op, request, started, error, retried_after, departure)
                break
        finally:
            departure.out()
        ended = trio.current_time()
        return Observation(
            step,
            op,
            request,
            status,
            started,
            ended,
            _parsed(body, answer_headers),
            retried_after=retried_after,
            sent=departure.at,
        )

    def _target(self, path: str) -> bytes:
        """The request target for ``path`` under the base URL, as httpx would send it."""
        if _PLAIN_PATH.fullmatch(path):
            return self._base_path + path.encode("ascii")
        return httpx.URL(self.base_url + path).raw_path

    def _request(
        self,
        method: str,
        json_body: Any,
        raw_body: bytes | None,
        headers: dict[str, str] | None,
        gate: BodyGate | None,
    ) -> tuple[bytes | AsyncIterator[bytes], list[tuple[bytes, bytes]]]:
        """A request's body and its head's headers, as httpx would send them."""
        content: bytes | AsyncIterator[bytes]
        extra: dict[str, str] = {}
        if gate is not None:
            content, headers = gate.request(json_body, headers)
        elif raw_body is not None:
            content = raw_body
            extra["content-length"] = str(len(raw_body))
        elif json_body is not None:
            content = _json_bytes(json_body)
            extra = {"content-length": str(len(content)), "content-type": "application/json"}
        else:
            content = b""
            if method in ("POST", "PUT", "PATCH"):
                extra["content-length"] = "0"
        given = {name.lower() for name in headers or ()}
        head = [*self._head]
        head.extend(
            (name.encode(), value.encode()) for name, value in extra.items() if name not in given
        )
        head.extend(
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in (headers or {}).items()
        )
        return content, head

    async def send_stream(
        self,
        step: str,
        path: str,
        json_body: dict[str, Any],
        progress: StreamProgress,
        *,
        hang_up_after: int | Literal["finish"] | None = None,
        headers: dict[str, str] | None = None,
        gate: BodyGate | None = None,
    ) -> Observation:
        """POST a chat with ``stream: true`` and read the events as they come.

        A non-2xx answer is an ordinary observation. A 2xx gets a ``StreamRecord``;
        its body is the assembled completion if ``[DONE]`` arrived, the error
        event's object if an error did."""
        request = SentRequest.of(
            "POST", self.base_url + path, json_body, None, self._shown(headers)
        )
        started = trio.current_time()
        departure = _Departure(None, None if gate else self._outgoing)
        try:
            sent: dict[str, Any] = {"json": json_body, "headers": dict(headers or {})}
            if gate is not None:
                content, sized = gate.request(json_body, headers)
                sent = {"content": content, "headers": sized}
            sent["extensions"] = departure.extensions
            async with httpx_sse.aconnect_sse(self._client, "POST", path, **sent) as source:
                response = source.response
                is_stream = response.headers.get("content-type", "").startswith("text/event-stream")
                if response.status_code // 100 != 2 or not is_stream:
                    await response.aread()
                    body = _parsed(response.content, response.headers.raw)
                    stream = None
                    if response.status_code // 100 == 2:
                        stream = StreamRecord(StreamEnd.NOT_STREAMED, 0, False, None)
                else:
                    body, stream = await _read_stream(source, progress, hang_up_after)
        except httpx.HTTPError as error:
            return self._failed(step, "chat", request, started, error, None, departure)
        finally:
            departure.out()
            progress.ended = True
            progress._changed()
        return Observation(
            step,
            "chat",
            request,
            response.status_code,
            started,
            trio.current_time(),
            body,
            stream=stream,
            sent=departure.at,
        )

    def _redacted(self, value: Any) -> Any:
        """A JSON body as a report may show it: each secret as its variable's name."""
        if not self.secrets:
            return value
        if isinstance(value, str):
            for secret, placeholder in self.secrets.items():
                value = value.replace(secret, placeholder)
            return value
        if isinstance(value, dict):
            return {key: self._redacted(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._redacted(item) for item in value]
        return value

    def _shown(self, headers: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        """Headers as a report may show them: each secret as its variable's name."""
        return tuple((name, self._redacted(value)) for name, value in (headers or {}).items())

    def _failed(
        self,
        step: str,
        op: str,
        request: SentRequest,
        started: float,
        error: httpx.HTTPError,
        retried_after: str | None,
        departure: _Departure,
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
            # Refused or unroutable: the target is down, which is not a fault
            # sessctl can judge; anything else happened on a server that was up.
            unreachable=isinstance(error, httpx.ConnectError),
            sent=departure.at,
        )

    async def settle(self) -> None:
        """Give the target the chance to take in every request already sent."""
        if self.in_process:
            # The server shares our trio loop: once every task is blocked, every
            # request sent so far has been read and is waiting on whatever it waits on.
            await trio.testing.wait_all_tasks_blocked()
            return
        # First every request already started goes out of the harness: one whose
        # task has not run yet, or whose connection is still opening, is not one
        # the server could have taken in (seen: the race of concurrent-writers
        # not set up on a split-lock server about one run in seven).
        with trio.move_on_after(self._timeout):
            await trio.testing.wait_all_tasks_blocked()
            await self._outgoing.all_out()
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


class _Outgoing:
    """The requests whose bytes have not all gone out to the server yet (their head
    and whole body written), for ``settle``. A gated request is not counted: its
    last byte waits on purpose."""

    def __init__(self) -> None:
        self._count = 0
        self._none = trio.Event()
        self._none.set()

    def add(self) -> None:
        self._count += 1
        if self._count == 1:
            self._none = trio.Event()

    def remove(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._none.set()

    async def all_out(self) -> None:
        await self._none.wait()


class _Departure:
    """When a request's first bytes went out, from the transport's trace (httpx's
    ``trace`` extension): once it has a connection. The first attempt counts (a
    retried one may have reached the server too). Until its body is written whole,
    or it ended, the request is also counted in ``outgoing`` (``settle`` waits on it)."""

    def __init__(self, on_sent: Callable[[], None] | None, outgoing: _Outgoing | None) -> None:
        self.at: float | None = None
        self.answered = False
        """Whether an answer's head arrived."""
        self._on_sent = on_sent
        self._counted_in = outgoing
        self._outgoing = outgoing
        if outgoing is not None:
            outgoing.add()
        self.extensions = {"trace": self.trace}

    def out(self) -> None:
        """Its bytes have all gone out, or never will (the attempt ended)."""
        if self._outgoing is not None:
            self._outgoing.remove()
            self._outgoing = None

    def again(self) -> None:
        """A second attempt (on a fresh connection): its bytes are outgoing again."""
        if self._outgoing is None and self._counted_in is not None:
            self._outgoing = self._counted_in
            self._outgoing.add()

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith("receive_response_headers.complete"):
            self.answered = True
        if self.at is None and event.endswith("send_request_headers.started"):
            self.at = trio.current_time()
            if self._on_sent is not None:
                self._on_sent()
        if event.endswith("send_request_body.complete"):
            self.out()


async def _read_stream(
    source: httpx_sse.EventSource,
    progress: StreamProgress,
    hang_up_after: int | Literal["finish"] | None,
) -> tuple[Any, StreamRecord]:
    """Read events until ``[DONE]``, an error event, the end, or the hang-up the
    scenario asked for; the body (the assembled completion, or the error event's
    object) and how the stream ended."""
    assembler = StreamAssembler()
    messages = MessageAssembler()  # for Anthropic's events, which have names
    end = StreamEnd.CUT  # unless something better is seen: what arrived is what counts
    body: Any = None
    error_type: str | None = None
    first_chunk_at: float | None = None
    after_error: list[str] = []

    def errored(kind: str, data: Any = None) -> None:
        nonlocal end, error_type, body
        end, error_type, body = StreamEnd.ERROR, kind, data

    try:
        async for sse in source.aiter_sse():
            if end is StreamEnd.ERROR:
                # An error event ends a stream: it is read on to its end all the
                # same, and whatever follows it (a chunk, [DONE]) is the server's
                # fault, which the record keeps.
                if len(after_error) < AFTER_ERROR_KEPT:
                    after_error.append(_event_name(sse))
                continue
            if sse.event not in ("", "message", None):
                if sse.event == "ping":
                    continue
                data = json.loads(sse.data) if sse.data.strip() else {}
                if sse.event == "error":
                    errored(error_type_of(data) or "error", data)
                    continue
                if sse.event == "message_stop":
                    end = StreamEnd.DONE
                    break
                if not messages.add(sse.event, data):
                    continue
                first_chunk_at = first_chunk_at or trio.current_time()
                if progress.took_chunk(finished=messages.finished, hang_up_after=hang_up_after):
                    end = StreamEnd.HUNG_UP
                    break
                continue
            if sse.data.strip() == "[DONE]":
                end = StreamEnd.DONE
                break
            try:
                data = json.loads(sse.data)
                if isinstance(data, dict) and "error" in data:
                    errored(error_type_of(data) or "error", data)
                    continue
                assembler.add(data)
            except json.JSONDecodeError:
                errored("(an event that is not JSON)")
                break
            except ChunkRefused as refused:
                errored(f"(malformed chunk: {refused})")
                break
            first_chunk_at = first_chunk_at or trio.current_time()
            if progress.took_chunk(finished=assembler.finished, hang_up_after=hang_up_after):
                end = StreamEnd.HUNG_UP
                break
    except (httpx.TransportError, httpx_sse.SSEError):
        pass  # the stream was cut: the record says so
    except json.JSONDecodeError:
        if end is StreamEnd.ERROR:
            after_error.append("an event that is not JSON")
        else:
            errored("(an event that is not JSON)")
    if messages.chunks:
        assembled = message_to_chat(messages.message())
        if end is StreamEnd.DONE and assembled is not None:
            body = messages.message()
        record = StreamRecord(
            end,
            progress.chunks,
            messages.finished,
            assembled,
            error_type,
            first_chunk_at,
            messages.stop_reason if isinstance(messages.stop_reason, str) else None,
            tuple(after_error),
        )
        return body, record
    assembled = assembler.message() if assembler.chunks else None
    if end is StreamEnd.DONE and assembled is not None:
        body = {"choices": [{"message": assembled, "finish_reason": assembler.finish_reason}]}
    reason = assembler.finish_reason
    record = StreamRecord(
        end,
        progress.chunks,
        assembler.finished,
        assembled,
        error_type,
        first_chunk_at,
        reason if isinstance(reason, str) else None,
        tuple(after_error),
    )
    return body, record


AFTER_ERROR_KEPT = 5
"""Events after an error event that a stream's record names (it reads them all)."""


def _event_name(sse: httpx_sse.ServerSentEvent) -> str:
    """An event that followed an error event, as a finding names it."""
    if sse.data.strip() == "[DONE]":
        return "[DONE]"
    if sse.event not in ("", "message", None):
        return f"a {sse.event} event"
    return "a data event"


STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
"""Errors of a connection that may have died before any byte of an answer arrived
(a kept-alive connection the server had closed); a timeout is not one of them."""

DEFAULT_HEADERS = (
    (b"accept", b"*/*"),
    (b"accept-encoding", b"identity"),
    (b"user-agent", b"sessctl"),
)
"""What every request says besides its own headers. ``identity``: the harness
judges bodies as the server sent them, and no body comes compressed."""

_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_\-/]*(\?[A-Za-z0-9_\-=&]*)?")
"""A path httpx would send unchanged (no dot segments to remove, nothing to quote)."""


def _json_bytes(value: Any) -> bytes:
    """A JSON body as httpx encodes one."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _reason(error: httpx.HTTPError, timeout: float) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    return f"{type(error).__name__}: {error or 'connection failed'}"


def _parsed(body: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
    """A whole answer's body as an observation keeps it: JSON, or its start as text
    (``headers`` as sent, for the charset)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"_raw": _text(body, headers)[:500]}


def _text(body: bytes, headers: list[tuple[bytes, bytes]]) -> str:
    charset = "utf-8"
    for name, value in headers:
        if name.lower() == b"content-type" and b"charset=" in value:
            charset = value.split(b"charset=", 1)[1].split(b";")[0].strip(b'" ').decode("latin-1")
    try:
        return body.decode(charset, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")
