"""The chaos upstream does exactly what a step's script says, and records it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from harness.errors import ScriptError
from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind, marker, parse_behaviour, tag_of

from .conftest import HANG_GUARD


@pytest.fixture
async def client(chaos: ChaosUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=str(chaos.url), timeout=HANG_GUARD) as client:
        yield client


def body(tag: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"hi {marker(tag)}"}], **extra}


def script(chaos: ChaosUpstream, tag: str, *specs: object) -> None:
    chaos.script(tag, [parse_behaviour(spec) for spec in specs])


async def test_respond_is_a_complete_openai_chat_completion(
    chaos: ChaosUpstream, client: httpx.AsyncClient
) -> None:
    response = await client.post("/chat/completions", json=body("a"))
    completion = response.json()
    assert response.status_code == 200
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert set(completion["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    again = await client.post("/chat/completions", json=body("a"))
    assert again.json()["choices"] == completion["choices"]  # deterministic
    # "answered" is recorded once the answer is written, which the client may see first.
    await chaos.wait_for("a", EventKind.ANSWERED, count=2)
    kinds = [e.kind for e in chaos.events("a")]
    assert kinds == [EventKind.RECEIVED, EventKind.ANSWERED] * 2
    assert chaos.calls("a") == 2


async def test_the_sglang_flavor_answers_as_sglang_does(nursery: trio.Nursery) -> None:
    """Field for field, SGLang's ChatCompletionResponse
    (python/sglang/srt/entrypoints/openai/protocol.py, serving_chat.py)."""
    chaos = ChaosUpstream("sglang")
    url = await nursery.start(chaos.serve)
    async with httpx.AsyncClient(base_url=url) as client:
        plain = await client.post("/chat/completions", json=body("p"))
        asked = await client.post(
            "/chat/completions",
            json=body("s", logprobs=True, return_prompt_token_ids=True, return_token_ids=True),
        )
        tools = await client.post(
            "/chat/completions",
            json=body("t", tools=[{"type": "function", "function": {"name": "f"}}]),
        )
    # Compact JSON, as orjson writes it.
    assert b": " not in plain.content
    assert b", " not in plain.content
    completion = plain.json()
    assert set(completion) == {"id", "object", "created", "model", "choices", "usage", "metadata"}
    assert set(completion["usage"]) == {
        "prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
        "reasoning_tokens",
    }  # fmt: skip
    (choice,) = completion["choices"]
    # Without the flags, none of the extras: exactly what stock SGLang sends.
    assert set(choice) == {"index", "message", "logprobs", "finish_reason", "matched_stop"}
    assert set(choice["message"]) == {"role", "content", "reasoning_content", "tool_calls"}
    assert choice["logprobs"] is None

    (choice,) = asked.json()["choices"]
    meta = choice["meta_info"]
    assert (
        meta["completion_tokens"] == len(meta["output_token_logprobs"]) == len(choice["token_ids"])
    )
    assert [entry[1] for entry in meta["output_token_logprobs"]] == choice["token_ids"]
    assert meta["prompt_tokens"] == len(choice["prompt_token_ids"]) >= 1
    assert meta["finish_reason"] == {"type": "stop", "matched": choice["matched_stop"]}
    assert len(choice["logprobs"]["content"]) == meta["completion_tokens"]

    (choice,) = tools.json()["choices"]
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls"
    assert call["index"] == 0
    assert call["type"] == "function"
    assert isinstance(call["function"]["arguments"], str)


async def test_the_openai_flavor_answers_as_openai_does(client: httpx.AsyncClient) -> None:
    completion = (await client.post("/chat/completions", json=body("o", logprobs=True))).json()
    (choice,) = completion["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert set(choice["message"]) == {"role", "content", "refusal"}
    entry = choice["logprobs"]["content"][0]
    assert set(entry) == {"token", "bytes", "logprob", "top_logprobs"}
    assert "meta_info" not in completion
    assert "meta_info" not in choice


async def test_status_garbage_and_abort(chaos: ChaosUpstream, client: httpx.AsyncClient) -> None:
    script(chaos, "st", {"status": 503})
    assert (await client.post("/chat/completions", json=body("st"))).status_code == 503
    script(chaos, "gb", "garbage")
    garbage = await client.post("/chat/completions", json=body("gb"))
    assert garbage.status_code == 200
    with pytest.raises(ValueError, match="Expecting"):
        garbage.json()
    script(chaos, "ab", "abort", "respond")
    first = (await client.post("/chat/completions", json=body("ab"))).json()
    second = (await client.post("/chat/completions", json=body("ab"))).json()
    assert first["choices"][0]["finish_reason"] == "abort"
    assert second["choices"][0]["finish_reason"] == "stop"


async def test_reset_drops_the_connection_without_an_answer(
    chaos: ChaosUpstream, client: httpx.AsyncClient
) -> None:
    script(chaos, "rs", "reset")
    with pytest.raises(httpx.TransportError):
        await client.post("/chat/completions", json=body("rs"))
    assert chaos.count("rs", EventKind.DROPPED) == 1
    assert chaos.count("rs", EventKind.ANSWERED) == 0


async def test_hold_answers_on_release(chaos: ChaosUpstream, client: httpx.AsyncClient) -> None:
    script(chaos, "h", "hold")
    answers: list[int] = []

    async def call() -> None:
        answers.append((await client.post("/chat/completions", json=body("h"))).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await chaos.wait_for("h", EventKind.RECEIVED)
        assert answers == []
        chaos.release("h")
    assert answers == [200]


@pytest.mark.parametrize("spec", ["hold", "hang", {"delay": 3600}])
async def test_a_client_that_hangs_up_is_recorded_as_cancelled(
    chaos: ChaosUpstream, client: httpx.AsyncClient, spec: object
) -> None:
    script(chaos, "c", spec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: client.post("/chat/completions", json=body("c")))
        await chaos.wait_for("c", EventKind.RECEIVED)
        nursery.cancel_scope.cancel()
    with trio.fail_after(HANG_GUARD):
        await chaos.wait_for("c", EventKind.CANCELLED)
    assert chaos.count("c", EventKind.ANSWERED) == 0


async def test_a_release_before_the_call_arrives_still_counts_and_only_for_its_tag(
    chaos: ChaosUpstream, client: httpx.AsyncClient
) -> None:
    # A run that ends releases its own tags; the upstream may be serving other runs.
    chaos.release("late")
    script(chaos, "late", "hold")
    script(chaos, "other", "hold")
    assert (await client.post("/chat/completions", json=body("late"))).status_code == 200
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: client.post("/chat/completions", json=body("other")))
        await chaos.wait_for("other", EventKind.RECEIVED)
        await trio.testing.wait_all_tasks_blocked()
        assert chaos.count("other", EventKind.ANSWERED) == 0
        nursery.cancel_scope.cancel()


async def test_untagged_requests_get_a_plain_answer(client: httpx.AsyncClient) -> None:
    plain = {"messages": [{"role": "user", "content": "no marker"}]}
    assert (await client.post("/chat/completions", json=plain)).status_code == 200
    assert (await client.post("/chat/completions", content=b"{nope")).status_code == 400


async def test_control_api_for_standalone_use(
    chaos: ChaosUpstream, client: httpx.AsyncClient
) -> None:
    root = str(chaos.url).removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root) as control:
        assert (
            await control.post("/_sessctl/steps/x", json={"script": ["hold"]})
        ).status_code == 200
        bad = await control.post("/_sessctl/steps/y", json={"script": ["explode"]})
        assert bad.status_code == 400
        assert "unknown upstream behaviour" in bad.json()["error"]["message"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: client.post("/chat/completions", json=body("x")))
            await chaos.wait_for("x", EventKind.RECEIVED)
            assert (await control.post("/_sessctl/steps/x/release")).status_code == 200
        await chaos.wait_for("x", EventKind.ANSWERED)
        events = (await control.get("/_sessctl/events")).json()["events"]
    assert [(e["tag"], e["kind"]) for e in events] == [("x", "received"), ("x", "answered")]


async def test_control_routes_for_workers_in_other_processes(
    chaos: ChaosUpstream, client: httpx.AsyncClient
) -> None:
    # What sessctl load's workers use: a step's state, a wait on its calls, the
    # events since an index (with the answers to their tags), and the clock.
    root = str(chaos.url).removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root, timeout=HANG_GUARD) as control:
        now = (await control.get("/_sessctl/clock")).json()["now"]
        assert abs(now - trio.current_time()) < 1.0
        await control.post("/_sessctl/steps/run.1", json={"script": ["hold"]})
        assert (await control.get("/_sessctl/steps/run.1")).json() == {
            "tag": "run.1", "received": 0, "ended": 0, "in_flight": False,
        }  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: client.post("/chat/completions", json=body("run.1")))
            arrived = await control.get("/_sessctl/steps/run.1/wait?until=received&count=1")
            assert arrived.json() == {
                "tag": "run.1", "received": 1, "ended": 0, "in_flight": True, "reached": True,
            }  # fmt: skip
            await control.post("/_sessctl/steps/run.1/release")
            ended = await control.get("/_sessctl/steps/run.1/wait?until=ended&count=1")
            assert ended.json()["reached"] is True
        await client.post("/chat/completions", json=body("other.1"))
        first = (await control.get("/_sessctl/events?prefix=run.")).json()
        assert [(e["tag"], e["kind"]) for e in first["events"]] == [
            ("run.1", "received"),
            ("run.1", "answered"),
        ]
        assert list(first["answers"]) == ["run.1"]
        assert first["next"] == 4  # other.1's two events count, though not shown
        later = (await control.get(f"/_sessctl/events?prefix=run.&after={first['next']}")).json()
        assert later["events"] == []
        bad = await control.get("/_sessctl/steps/run.1/wait?until=soon")
        assert bad.status_code == 400
        assert "until must be received or ended" in bad.json()["error"]["message"]


async def test_a_wait_that_is_not_reached_answers_after_its_timeout(
    chaos: ChaosUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    root = str(chaos.url).removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root, timeout=HANG_GUARD) as control:
        waited = await control.get("/_sessctl/steps/nobody/wait?until=received&timeout=2")
    assert waited.json() == {
        "tag": "nobody", "received": 0, "ended": 0, "in_flight": False, "reached": False,
    }  # fmt: skip


def test_tag_is_found_in_the_last_message_with_a_marker() -> None:
    assert tag_of({"messages": [{"role": "user", "content": f"a {marker('one')}"}]}) == "one"
    parts = [{"type": "text", "text": f"x {marker('two')}"}]
    assert tag_of({"messages": [{"role": "user", "content": parts}]}) == "two"
    assert tag_of({"messages": "nope"}) is None


def test_unknown_behaviours_are_refused() -> None:
    for spec in ["explode", {"delay": -1}, {"status": 42}, {"hold": 1, "x": 2}, 7]:
        with pytest.raises(ScriptError):
            parse_behaviour(spec)


async def test_the_sglang_flavor_echoes_the_input_ids_it_was_sent(nursery: trio.Nursery) -> None:
    """A server that tokenized the prompt itself sends ``input_ids``: SGLang answers
    with those as the prompt's token ids, not with ids of its own."""
    chaos = ChaosUpstream("sglang")
    url = await nursery.start(chaos.serve)
    async with httpx.AsyncClient(base_url=url) as client:
        sent = [101, 7, 7, 4242]
        answer = await client.post(
            "/chat/completions",
            json=body("ids", input_ids=sent, return_prompt_token_ids=True, return_meta_info=True),
        )
    choice = answer.json()["choices"][0]
    assert choice["prompt_token_ids"] == sent
    assert choice["meta_info"]["prompt_tokens"] == len(sent)
    nursery.cancel_scope.cancel()


async def test_the_sglang_flavor_writes_errors_compact(nursery: trio.Nursery) -> None:
    chaos = ChaosUpstream("sglang")
    url = await nursery.start(chaos.serve)
    script(chaos, "err", {"status": 503})
    async with httpx.AsyncClient(base_url=url) as client:
        refused = await client.post("/chat/completions", json=body("err"))
        malformed = await client.post("/chat/completions", content=b"{not json")
    for raw in (refused.content, malformed.content):
        assert b'":' in raw
        assert b'": ' not in raw
        assert b", " not in raw.split(b'"message":')[0]
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("content", "expected"), [(None, None), ("", "")])
async def test_a_tool_call_carries_the_content_the_server_needs(
    nursery: trio.Nursery, content: str | None, expected: str | None
) -> None:
    chaos = ChaosUpstream("sglang", tool_call_content=content)
    url = await nursery.start(chaos.serve)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    async with httpx.AsyncClient(base_url=url) as client:
        answer = await client.post("/chat/completions", json=body("tool", tools=tools))
    message = answer.json()["choices"][0]["message"]
    assert message["tool_calls"]
    assert message["content"] == expected
    nursery.cancel_scope.cancel()


async def test_a_received_call_knows_a_moment_before_it_was_sent(chaos: ChaosUpstream) -> None:
    # ``received`` is when the upstream came round to a call; ``sent_after`` is a
    # moment its connection was still empty, so certainly before the call's bytes
    # were written (on loopback they are there once the write returns). The
    # llm-leak check orders a call after a DELETE only by it.
    url = httpx.URL(str(chaos.url))
    stream = await trio.open_tcp_stream(url.host, url.port or 80)
    connection = h11.Connection(h11.CLIENT)
    written: list[float] = []
    bounds: list[float] = []
    for tag in ("first", "second", "third"):
        data = json.dumps(body(tag)).encode()
        head = h11.Request(
            method="POST",
            target="/chat/completions",
            headers=[("host", "upstream"), ("content-length", str(len(data)))],
        )
        await stream.send_all(
            b"".join(
                connection.send(e) or b"" for e in (head, h11.Data(data=data), h11.EndOfMessage())
            )
        )
        written.append(trio.current_time())
        while not isinstance(answer := connection.next_event(), h11.EndOfMessage):
            if answer is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
        connection.start_next_cycle()
        event = chaos.events(tag)[0]
        assert event.kind is EventKind.RECEIVED
        assert event.sent_after is not None
        assert event.sent_after <= written[-1]
        assert event.sent_after <= event.at
        if bounds:
            # Kept alive, the connection was seen empty again since the last call.
            assert event.sent_after > bounds[-1]
        bounds.append(event.sent_after)
    await stream.aclose()


async def test_a_hang_up_before_the_release_is_a_cancel_whoever_runs_first(
    chaos: ChaosUpstream,
) -> None:
    # The server hangs up on a held call and the hold is released in the same
    # moment: the watcher of the hang-up and the release wake in one batch, in an
    # order trio does not promise (under load a loop comes round late to both).
    # The close is in the socket before the release, so the call was cancelled.
    url = httpx.URL(str(chaos.url))
    for attempt in range(20):
        tag = f"raced-{attempt}"
        script(chaos, tag, "hold")
        stream = await trio.open_tcp_stream(url.host, url.port or 80)
        data = json.dumps(body(tag)).encode()
        head = (
            b"POST /chat/completions HTTP/1.1\r\nhost: upstream\r\n"
            b"content-length: %d\r\n\r\n" % len(data)
        )
        await stream.send_all(head + data)
        with trio.fail_after(HANG_GUARD):
            await chaos.wait_for(tag, EventKind.RECEIVED)
        stream.socket.close()  # no checkpoint between the close and the release
        chaos.release(tag)
        with trio.fail_after(HANG_GUARD):
            while chaos.ended_calls(tag) == 0:
                await trio.lowlevel.checkpoint()
        kinds = [e.kind for e in chaos.events(tag)]
        assert kinds == [EventKind.RECEIVED, EventKind.CANCELLED], (attempt, kinds)


class _LateExchange:
    """An exchange whose server hangs up while the upstream's task waits to write
    the stream's head: the moment a loaded upstream comes round to it late."""

    def __init__(self) -> None:
        self.gone = False
        self.parts: list[bytes] = []

    async def start_stream(self) -> None:
        self.gone = True

    def hung_up_already(self) -> bool:
        return self.gone

    async def send_part(self, part: bytes) -> None:
        self.parts.append(part)  # a write after a FIN succeeds once: nobody reads it


async def test_a_chunk_is_not_written_once_the_server_has_hung_up() -> None:
    # Recorded as sent, such a chunk read as engine work for a deleted session (a
    # false llm-leak at 2,000 clients, the harness lagging 10 s): the server had
    # closed the connection when the upstream's task came round to write it.
    from harness.upstream.chaos_upstream import _ChatDialect

    chaos = ChaosUpstream()
    exchange = _LateExchange()
    behaviour = parse_behaviour({"chunks": 3})
    finished = await chaos._stream(
        exchange,  # type: ignore[arg-type]
        body("t", stream=True),
        "t",
        1,
        behaviour,
        _ChatDialect("openai"),
    )
    assert not finished
    assert exchange.parts == []
    assert [e.kind for e in chaos.events("t")] == [EventKind.CANCELLED]


class _SlowWrite:
    """An exchange whose answer's write takes 5 s to return (a loop that lags)."""

    def __init__(self, request: Any) -> None:
        self.request = request

    def hung_up_already(self) -> bool:
        return False

    async def respond(self, status: int, payload: bytes) -> None:
        await trio.sleep(5)


async def test_an_answer_is_recorded_when_it_was_handed_to_the_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Recorded when the task came round after the write, an answer given before a
    # DELETE reached the server read as given after it: a false llm-leak.
    from harness.upstream.http11 import HttpRequest

    chaos = ChaosUpstream()
    request = HttpRequest("POST", "/v1/chat/completions", {}, json.dumps(body("t")).encode())
    started = trio.current_time()
    await chaos.handle(_SlowWrite(request))  # type: ignore[arg-type]
    answered = [e for e in chaos.events("t") if e.kind is EventKind.ANSWERED]
    assert [e.at for e in answered] == [started]
    assert trio.current_time() == started + 5


class _HangsUpWhileTheWatcherUnwinds:
    """An exchange whose server hangs up in the scheduler round the upstream takes to
    put away its hang-up watcher once a hold has ended: under load, seconds."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.gone = False
        self.answered = False

    async def wait_for_hangup(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.gone = True  # cancelled: the server's FIN arrives while this unwinds

    def hung_up_already(self) -> bool:
        return self.gone

    async def respond(self, status: int, payload: bytes) -> None:
        self.answered = True  # a write after a FIN succeeds once: nobody reads it


@pytest.mark.parametrize("spec", ["hold", {"delay": 0}, "respond"])
async def test_a_hang_up_in_the_last_wait_before_the_answer_is_a_cancel(spec: object) -> None:
    # Seen at 2,000 clients with the harness lagging seconds: the hold ended (released
    # before the call arrived), the upstream peeked (no FIN yet), then waited a round
    # for its watcher to unwind, and the server's close after a DELETE came in that
    # round. The answer written then was recorded as engine work for a deleted
    # session: a false llm-leak. The peek that decides is the one after the last wait.
    from harness.upstream.http11 import HttpRequest

    # "respond": no hold, so the last wait was the read of the call, and the server
    # hung up while this task waited to come round to it.
    chaos = ChaosUpstream()
    script(chaos, "t", spec)
    chaos.release("t")
    request = HttpRequest("POST", "/v1/chat/completions", {}, json.dumps(body("t")).encode())
    exchange = _HangsUpWhileTheWatcherUnwinds(request)
    exchange.gone = spec == "respond"
    await chaos.handle(exchange)  # type: ignore[arg-type]
    assert not exchange.answered
    assert [e.kind for e in chaos.events("t")] == [EventKind.RECEIVED, EventKind.CANCELLED]
