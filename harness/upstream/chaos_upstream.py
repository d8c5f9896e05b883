"""The chaos upstream: an OpenAI-compatible LLM engine that the harness scripts.

How a race becomes deterministic
--------------------------------
The harness puts a marker ``[[sessctl:TAG]]`` in the last message of each chat
it sends. Any session server forwards messages, so when the call reaches this
upstream we know which scenario step it belongs to, and we play that step's
script: respond, delay, hold until released, answer a status, abort, reset the
connection, hang, or answer garbage. Scripts are lists, one behaviour per
call, the last repeating, so ``[abort, respond]`` means "abort once, then answer".

What happened is recorded per tag as events (``received``, ``sent`` for each
chunk of a streamed answer, ``answered``, ``cancelled`` when the server under
test hung up before the answer, ``dropped`` after a reset) that scenarios wait
on and assert.

A call with ``stream: true`` is answered as Server-Sent Events in the
flavour's shape; its script may act after chunk k instead of before the
first (``{chunks: 4, hold_after: 2}``, ``reset_after``, ``garbage_after``,
``hang_after``). On a call that does not stream, those act where the whole
answer would be sent.

Standalone (``sessctl upstream``), the same is reachable over HTTP::

    POST /_sessctl/steps/{tag}          {"script": ["hold"]}     set a script
    POST /_sessctl/steps/{tag}/release                           release holds
    GET  /_sessctl/steps/{tag}                                   its calls: received,
                                                                 ended, in flight
    GET  /_sessctl/steps/{tag}/wait?until=received&count=1&timeout=2
                                        the same, once ``count`` calls were received
                                        (or ended: ``until=ended``), or the timeout
    GET  /_sessctl/events[?prefix=P&after=N]                     every event so far (of
                                                                 tags starting with P,
                                                                 from the N-th on), the
                                                                 answers to those tags,
                                                                 and the next N
    GET  /_sessctl/clock                                         this upstream's clock

The last four let load generators in other processes (``sessctl load``'s
workers) place the same races as chaos mode in-process: they time their
operations on this upstream's clock, so its events and their operations
compare in one history.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import trio

from harness.errors import ListenFailed, ScriptError
from wire import anthropic
from wire.engine import (
    STREAM_END,
    Flavor,
    completion_for,
    encode_chunk,
    encode_completion,
    json_object,
    stream_chunks,
)
from wire.errors import InvalidRequest
from wire.generate import (
    GenerateRequest,
    Generation,
    answer_text,
    encode_generate,
    generate_error,
    parse_generate_request,
)

from .http11 import Exchange, serve_http11
from .script import Action, Behaviour, EventKind, StepEvent, parse_behaviour, tag_of


@dataclass
class _Waiter:
    predicate: Callable[[], bool]
    event: trio.Event


class ChaosUpstream:
    def __init__(self, flavor: Flavor = "openai", *, tool_call_content: str | None = None) -> None:
        self.flavor = flavor
        self.tool_call_content = tool_call_content
        """A tool call's ``content``: null (OpenAI, current SGLang) or "" (patched
        SGLang builds); ``profile check`` may switch it while serving."""
        self._scripts: dict[str, tuple[Behaviour, ...]] = {}
        self._releases: dict[str, trio.Event] = {}
        self._events: list[StepEvent] = []
        # Indexed by tag too: chaos runs record hundreds of thousands of events.
        self._events_by_tag: dict[str, list[StepEvent]] = {}
        self._calls: dict[str, int] = {}
        self._answers: dict[str, list[dict[str, Any]]] = {}
        self.streamed_calls: dict[str, int] = {}
        """Calls per tag that asked for a stream (a buffering server asks for none)."""
        self._waiters: list[_Waiter] = []
        self.url: str | None = None
        """The OpenAI base URL, once serving."""

    # -- scripting --------------------------------------------------------------

    def script(self, tag: str, behaviours: Sequence[Behaviour]) -> None:
        self._scripts[tag] = tuple(behaviours) or (Behaviour(),)

    def release(self, tag: str) -> None:
        self._release_event(tag).set()

    def forget(self, tags: Sequence[str]) -> None:
        """Drop a finished scenario's state, so long runs stay small."""
        dropped = set(tags)
        for tag in dropped:
            self._scripts.pop(tag, None)
            self._releases.pop(tag, None)
            self._calls.pop(tag, None)
            self.streamed_calls.pop(tag, None)
            self._answers.pop(tag, None)
            self._events_by_tag.pop(tag, None)
        self._events = [e for e in self._events if e.tag not in dropped]

    # -- observing --------------------------------------------------------------

    def events(self, tag: str | None = None) -> list[StepEvent]:
        if tag is None:
            return list(self._events)
        return list(self._events_by_tag.get(tag, ()))

    def count(self, tag: str, kind: EventKind) -> int:
        return sum(1 for e in self._events_by_tag.get(tag, ()) if e.kind is kind)

    def answers(self, tag: str) -> list[dict[str, Any]]:
        """The assistant messages this upstream answered for ``tag``, in order: what a
        server that committed one of them has committed, in whatever form it sent."""
        return list(self._answers.get(tag, ()))

    def calls(self, tag: str) -> int:
        return self._calls.get(tag, 0)

    def ended_calls(self, tag: str) -> int:
        """Calls for ``tag`` that ended: answered, cancelled (hung up on) or dropped."""
        ends = (EventKind.ANSWERED, EventKind.CANCELLED, EventKind.DROPPED)
        return sum(self.count(tag, kind) for kind in ends)

    def call_in_flight(self, tag: str) -> bool:
        """A call for ``tag`` was received and has not ended yet."""
        return self.count(tag, EventKind.RECEIVED) > self.ended_calls(tag)

    async def wait_for(self, tag: str, kind: EventKind, count: int = 1) -> None:
        await self.wait_until(lambda: self.count(tag, kind) >= count)

    async def wait_until(self, reached: Callable[[], bool]) -> None:
        """Return once ``reached()`` holds; it is asked again after every event."""
        if reached():
            return
        waiter = _Waiter(reached, trio.Event())
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        finally:
            self._waiters.remove(waiter)

    def _record(
        self,
        tag: str,
        kind: EventKind,
        call: int,
        behaviour: Behaviour,
        sent_after: float | None = None,
        at: float | None = None,
    ) -> None:
        when = trio.current_time() if at is None else at
        event = StepEvent(tag, kind, call, when, behaviour.describe(), sent_after)
        self._events.append(event)
        self._events_by_tag.setdefault(tag, []).append(event)
        for waiter in self._waiters:
            if waiter.predicate():
                waiter.event.set()

    def _release_event(self, tag: str) -> trio.Event:
        event = self._releases.get(tag)
        if event is None:
            event = self._releases[tag] = trio.Event()
        return event

    # -- serving ----------------------------------------------------------------

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; started() gives the OpenAI base URL (``.../v1``)."""
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(serve_http11, self.handle, host, port)
            except OSError as error:
                # Two CI jobs on one host both want the default port, say.
                raise ListenFailed(
                    f"the chaos upstream cannot listen on {host}:{port}: "
                    f"{error.strerror or error}; pick another address with "
                    f"--upstream-listen HOST:PORT (and start the server under test with "
                    f"http://HOST:PORT/v1 as its LLM upstream), or port 0 for any free one "
                    f"when the target is in-process"
                ) from None
            self.url = bound + "/v1"
            task_status.started(self.url)

    async def handle(self, exchange: Exchange) -> None:
        request = exchange.request
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            await self._chat(exchange)
        elif request.method == "POST" and request.path.endswith("/messages"):
            await self._chat(exchange, messages_api=True)
        elif (
            request.method == "POST"
            and request.path.rstrip("/") == "/generate"
            and self.flavor == "sglang-generate"
        ):
            await self._chat(exchange, generate=True)
        elif request.path.startswith("/_sessctl/"):
            await self._control(exchange)
        else:
            await _respond_json(exchange, 404, _error("not_found", f"no route {request.path}"))

    async def _chat(
        self, exchange: Exchange, *, messages_api: bool = False, generate: bool = False
    ) -> None:
        dialect: _Dialect
        if generate:
            dialect = _GenerateDialect()
        elif messages_api:
            dialect = _MessagesDialect()
        else:
            dialect = _ChatDialect(self.flavor)
        try:
            body = dialect.parse(exchange.request.body)
        except ValueError as refused:
            await exchange.respond(400, dialect.error("invalid_request", str(refused)))
            return
        tag = tag_of(body)
        if tag is None:
            completion = completion_for(
                body, flavor=self.flavor, tool_call_content=self.tool_call_content
            )
            await exchange.respond(200, dialect.answer(completion))
            return
        call = self._calls[tag] = self._calls.get(tag, 0) + 1
        script = self._scripts.get(tag, (Behaviour(),))
        behaviour = script[min(call, len(script)) - 1]
        self._record(tag, EventKind.RECEIVED, call, behaviour, exchange.request.sent_after)
        if body.get("stream") is True:
            self.streamed_calls[tag] = self.streamed_calls.get(tag, 0) + 1
        before = behaviour.after is None or body.get("stream") is not True
        if before and not await self._wait_unless_hung_up(exchange, self._wait_of(behaviour, tag)):
            self._record(tag, EventKind.CANCELLED, call, behaviour)
            return
        if before and behaviour.action is Action.RESET:
            self._record(tag, EventKind.DROPPED, call, behaviour)
            await exchange.reset()
            return
        try:
            if body.get("stream") is True and behaviour.action not in (
                Action.STATUS,
                Action.GARBAGE if before else Action.RESPOND,
            ):
                answered_at = await self._stream(exchange, body, tag, call, behaviour, dialect)
                if answered_at is None:
                    return
            else:
                status, payload = self._answer(body, behaviour, dialect)
                # When the answer was handed to the socket, not when this task came
                # round again after the write: under load that can be seconds later,
                # after a DELETE the server had already let win (a false llm-leak).
                answered_at = trio.current_time()
                await exchange.respond(status, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The server hung up while the answer was being written: it stopped
            # the call, which is what "cancelled" means.
            self._record(tag, EventKind.CANCELLED, call, behaviour)
            raise
        if behaviour.action not in (Action.STATUS, Action.GARBAGE, Action.ABORT):
            answer = self._completion(body, behaviour)["choices"][0]["message"]
            self._answers.setdefault(tag, []).append(answer)
        self._record(tag, EventKind.ANSWERED, call, behaviour, at=answered_at)

    async def _stream(
        self,
        exchange: Exchange,
        body: dict[str, Any],
        tag: str,
        call: int,
        behaviour: Behaviour,
        dialect: _Dialect,
    ) -> float | None:
        """Stream the answer, acting after chunk ``behaviour.after``: when its end was
        handed to the socket, or None if the stream was stopped (held and hung up on,
        reset, spoiled) before its end. Each chunk is recorded as sent when it is
        handed to the socket, as the answer is (see ``_chat``)."""
        encoded = dialect.stream(self._completion(body, behaviour), behaviour, _wants_usage(body))
        await exchange.start_stream()
        for number, part in enumerate(encoded, 1):
            if number == (behaviour.after or 0) + 1 and not await self._act_mid_stream(
                exchange, tag, call, behaviour
            ):
                return None
            if number > 1 and behaviour.chunk_delay:

                async def pause() -> None:
                    await trio.sleep(behaviour.chunk_delay)

                if not await self._wait_unless_hung_up(exchange, pause):
                    self._record(tag, EventKind.CANCELLED, call, behaviour)
                    return None
            elif exchange.hung_up_already():
                # Each write yields, and under load this task may come round long
                # after the server hung up: a chunk written then goes nowhere, and
                # recorded as sent it read as work done for a deleted session.
                self._record(tag, EventKind.CANCELLED, call, behaviour)
                return None
            sent_at = trio.current_time()
            await exchange.send_part(part)
            self._record(tag, EventKind.SENT, call, behaviour, at=sent_at)
        # ``after`` past every part: act after the finish, before the stream's end.
        if (behaviour.after or 0) >= len(encoded) and not await self._act_mid_stream(
            exchange, tag, call, behaviour
        ):
            return None
        answered_at = trio.current_time()
        await exchange.send_part(dialect.end())
        await exchange.end()
        return answered_at

    async def _act_mid_stream(
        self, exchange: Exchange, tag: str, call: int, behaviour: Behaviour
    ) -> bool:
        if behaviour.after is None or behaviour.action is Action.RESPOND:
            return True
        if behaviour.action in (Action.HOLD, Action.HANG):
            if await self._wait_unless_hung_up(exchange, self._wait_of(behaviour, tag)):
                return True
            self._record(tag, EventKind.CANCELLED, call, behaviour)
        elif behaviour.action is Action.RESET:
            self._record(tag, EventKind.DROPPED, call, behaviour)
            await exchange.reset()
        else:  # garbage: an event no client can parse, then the end of the stream
            await exchange.send_part(b"data: {<<not json>>\n\n")
            await exchange.end()
            self._record(tag, EventKind.DROPPED, call, behaviour)
        return False

    def _wait_of(self, behaviour: Behaviour, tag: str) -> Callable[[], Awaitable[None]] | None:
        if behaviour.action is Action.HOLD:
            return self._release_event(tag).wait
        if behaviour.action is Action.HANG:
            return trio.sleep_forever
        if behaviour.action is Action.DELAY:

            async def wait() -> None:
                await trio.sleep(behaviour.delay)

            return wait
        return None

    async def _wait_unless_hung_up(
        self, exchange: Exchange, wait: Callable[[], Awaitable[None]] | None
    ) -> bool:
        """Whether the call may be answered now: ``wait`` ended, and the server has not
        hung up. With no wait, the last one was the read of the call, which under load
        can also be seconds before this task comes round to answer it."""
        if wait is None:
            return not exchange.hung_up_already()
        finished = False
        async with trio.open_nursery() as nursery:

            async def watch_hangup() -> None:
                await exchange.wait_for_hangup()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_hangup)
            await wait()
            finished = True
            nursery.cancel_scope.cancel()
        # Decided after the last wait, the watcher's unwinding (a scheduler round:
        # under load, seconds). A hang-up in the socket by now, whether a busy loop
        # had brought it to the watcher or not, came before the answer this call
        # would write next: the server stopped the call. (Peeked before the
        # unwinding, a close that came during it was missed, and the answer then
        # written into the closed connection read as engine work for a deleted
        # session: a false llm-leak at 2,000 clients.)
        return finished and not exchange.hung_up_already()

    def _completion(self, body: dict[str, Any], behaviour: Behaviour) -> dict[str, Any]:
        finish_reason = "abort" if behaviour.action is Action.ABORT else "stop"
        if behaviour.tool_call and not body.get("tools"):
            body = {**body, "tools": _STEP_TOOL}
        return completion_for(
            body,
            flavor=self.flavor,
            finish_reason=finish_reason,
            tool_call_content=self.tool_call_content,
        )

    def _answer(
        self, body: dict[str, Any], behaviour: Behaviour, dialect: _Dialect
    ) -> tuple[int, bytes]:
        if behaviour.action is Action.STATUS:
            message = f"chaos upstream scripted status {behaviour.status}"
            return behaviour.status, dialect.error("upstream_chaos", message)
        if behaviour.action is Action.GARBAGE:
            return 200, b'{"choices": [{"message": <<not json>>'
        return 200, dialect.answer(self._completion(body, behaviour))

    async def _control(self, exchange: Exchange) -> None:
        request = exchange.request
        parts = request.path.strip("/").split("/")
        try:
            if request.method == "GET" and parts == ["_sessctl", "events"]:
                query = _query(request.query)
                prefix, after = query.get("prefix", ""), int(query.get("after", "0"))
                chosen = [e for e in self._events[after:] if e.tag.startswith(prefix)]
                events = [asdict(e) | {"kind": e.kind.value} for e in chosen]
                answered = {e.tag for e in chosen}
                answers = {t: a for t, a in self._answers.items() if t in answered}
                await _respond_json(
                    exchange,
                    200,
                    {"events": events, "answers": answers, "next": len(self._events)},
                )
            elif request.method == "GET" and parts == ["_sessctl", "clock"]:
                await _respond_json(exchange, 200, {"now": trio.current_time()})
            elif request.method == "GET" and len(parts) == 3 and parts[1] == "steps":
                await _respond_json(exchange, 200, self._step_state(parts[2]))
            elif request.method == "GET" and len(parts) == 4 and parts[3] == "wait":
                await self._wait_control(exchange, parts[2])
            elif request.method == "POST" and len(parts) == 3 and parts[1] == "steps":
                spec = json.loads(request.body or b"{}").get("script", ["respond"])
                if not isinstance(spec, list):
                    raise ScriptError("'script' must be a list of behaviours")
                self.script(parts[2], [parse_behaviour(item) for item in spec])
                await _respond_json(exchange, 200, {"tag": parts[2], "script": spec})
            elif request.method == "POST" and len(parts) == 4 and parts[3] == "release":
                self.release(parts[2])
                await _respond_json(exchange, 200, {"released": parts[2]})
            else:
                await _respond_json(exchange, 404, _error("not_found", f"no route {request.path}"))
        except (ScriptError, ValueError, AttributeError) as error:
            await _respond_json(exchange, 400, _error("invalid_request", str(error)))

    def _step_state(self, tag: str) -> dict[str, Any]:
        return {
            "tag": tag,
            "received": self.count(tag, EventKind.RECEIVED),
            "ended": self.ended_calls(tag),
            "in_flight": self.call_in_flight(tag),
        }

    async def _wait_control(self, exchange: Exchange, tag: str) -> None:
        query = _query(exchange.request.query)
        until = query.get("until", "received")
        if until not in ("received", "ended"):
            raise ValueError(f"until must be received or ended, not {until!r}")
        count = int(query.get("count", "1"))
        timeout = min(float(query.get("timeout", "2")), MAX_CONTROL_WAIT)
        if not timeout >= 0:
            raise ValueError("timeout must be a number of seconds")

        def reached() -> bool:
            if until == "received":
                return self.count(tag, EventKind.RECEIVED) >= count
            return self.ended_calls(tag) >= count

        async with trio.open_nursery() as nursery:

            async def give_up() -> None:
                await _responsive_sleep(timeout)
                nursery.cancel_scope.cancel()

            nursery.start_soon(give_up)
            await self.wait_until(reached)
            nursery.cancel_scope.cancel()
        await _respond_json(exchange, 200, self._step_state(tag) | {"reached": reached()})


async def _responsive_sleep(seconds: float) -> None:
    """Sleep ``seconds`` of time this process could look: a tick of 50 ms counts at
    most 0.1 s. A patience counted here does not run out while this process was
    too busy to see the event it waits for (as ``harness.run.patience`` does)."""
    counted, last = 0.0, trio.current_time()
    while counted < seconds:
        await trio.sleep(min(0.05, seconds - counted))
        now = trio.current_time()
        counted += min(now - last, 0.1)
        last = now


MAX_CONTROL_WAIT = 30.0
"""The longest a control request waits for an event (longer asks wait this long)."""


def _query(raw: str) -> dict[str, str]:
    return {name: values[-1] for name, values in urllib.parse.parse_qs(raw).items()}


class _Dialect(Protocol):
    """How one call is read and answered: OpenAI's chat completions (in the
    flavour's shape) or Anthropic's Messages. Scripts act the same on both."""

    def parse(self, raw: bytes) -> dict[str, Any]:
        """The request as a chat body; ``ValueError`` if it cannot be read."""
        ...

    def answer(self, completion: dict[str, Any]) -> bytes: ...

    def stream(
        self, completion: dict[str, Any], behaviour: Behaviour, wants_usage: bool
    ) -> list[bytes]:
        """The stream's events, each as sent (before the end)."""
        ...

    def end(self) -> bytes: ...

    def error(self, kind: str, message: str) -> bytes: ...


class _ChatDialect:
    def __init__(self, flavor: Flavor) -> None:
        self.flavor = flavor

    def parse(self, raw: bytes) -> dict[str, Any]:
        return json_object(raw)

    def answer(self, completion: dict[str, Any]) -> bytes:
        return encode_completion(completion, self.flavor)

    def stream(
        self, completion: dict[str, Any], behaviour: Behaviour, wants_usage: bool
    ) -> list[bytes]:
        chunks = _chunks(completion, self.flavor, behaviour, wants_usage)
        return [encode_chunk(chunk, self.flavor) for chunk in chunks]

    def end(self) -> bytes:
        return STREAM_END

    def error(self, kind: str, message: str) -> bytes:
        # SGLang answers with compact JSON (orjson), errors too.
        compact = (",", ":") if self.flavor != "openai" else None
        return json.dumps(_error(kind, message), separators=compact).encode()


class _MessagesDialect:
    """Anthropic's Messages API, translated by the reference's own module: the
    request into a chat body, answers and chunks into a message and its events."""

    def __init__(self) -> None:
        self._writer = anthropic.EventWriter()
        self._finish: str | None = None

    def parse(self, raw: bytes) -> dict[str, Any]:
        try:
            return anthropic.parse_messages_request(raw).body
        except InvalidRequest as refused:
            raise ValueError(refused.message) from None

    def answer(self, completion: dict[str, Any]) -> bytes:
        return json.dumps(anthropic.to_message(completion)).encode()

    def stream(
        self, completion: dict[str, Any], behaviour: Behaviour, wants_usage: bool
    ) -> list[bytes]:
        chunks = _chunks(completion, "openai", behaviour, wants_usage)
        self._finish = next(
            (c["choices"][0]["finish_reason"] for c in reversed(chunks) if c["choices"]), None
        )
        return [b"".join(self._writer.chunk(chunk)) for chunk in chunks]

    def end(self) -> bytes:
        return b"".join(self._writer.finish(self._finish))

    def error(self, kind: str, message: str) -> bytes:
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


class _GenerateDialect:
    """SGLang's native ``/generate`` (``--flavor sglang-generate``): a prompt as
    text or token ids, an answer as generated text and ids, streamed cumulatively."""

    def __init__(self) -> None:
        self._request: GenerateRequest | None = None

    def parse(self, raw: bytes) -> dict[str, Any]:
        self._request = parse_generate_request(raw)
        return self._request.as_chat()

    def _generation(self, completion: dict[str, Any]) -> Generation:
        assert self._request is not None
        aborted = completion["choices"][0]["finish_reason"] == "abort"
        return Generation(self._request, answer_text(completion), "abort" if aborted else "stop")

    def answer(self, completion: dict[str, Any]) -> bytes:
        return encode_generate(self._generation(completion).answer())

    def stream(
        self, completion: dict[str, Any], behaviour: Behaviour, wants_usage: bool
    ) -> list[bytes]:
        chunks = self._generation(completion).chunks(behaviour.chunks)
        return [b"data: " + encode_generate(chunk) + b"\n\n" for chunk in chunks]

    def end(self) -> bytes:
        return STREAM_END

    def error(self, kind: str, message: str) -> bytes:
        return generate_error(message)


def _chunks(
    completion: dict[str, Any], flavor: Flavor, behaviour: Behaviour, wants_usage: bool
) -> list[dict[str, Any]]:
    """The chat completion as stream chunks; an abort as SGLang streams one."""
    chunks = stream_chunks(completion, flavor, parts=behaviour.chunks, wants_usage=wants_usage)
    if behaviour.action is Action.ABORT:
        # Aborted before any token, as SGLang does while it updates weights:
        # one chunk, the finish, so a server may still retry.
        finish = chunks[-2] if not chunks[-1]["choices"] else chunks[-1]
        chunks = [{**finish, "choices": [{**finish["choices"][0], "delta": {"role": "assistant"}}]}]
    return chunks


_STEP_TOOL = [{"type": "function", "function": {"name": "sessctl_step", "parameters": {}}}]


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


async def _respond_json(exchange: Exchange, status: int, payload: Any) -> None:
    await exchange.respond(status, json.dumps(payload).encode())
