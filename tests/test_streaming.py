"""Streamed turns (stream: true) on the reference server, with real clients.

The races (DELETE mid-stream, hang-ups, cut streams, concurrent writers,
retries of lost streams) are scenarios 21-27, run through the CLI by README's
command and by the self-test. Here: what real SDKs (openai, litellm) see, the
server's retry rule around the first relayed chunk, and the parts with no I/O.
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

import httpx
import openai
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk

from harness.errors import ScriptError
from harness.upstream.script import EventKind, parse_behaviour
from refserver.server import RunningServer
from wire.engine import FLAVORS, Flavor, completion_for, stream_chunks
from wire.rules import comparable
from wire.streaming import ChunkRefused, StreamAssembler, replay_chunks

from .conftest import Api, user

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]


async def open_stream(
    client: openai.AsyncOpenAI, **request: Any
) -> openai.AsyncStream[ChatCompletionChunk]:
    """``create(stream=True)``; the SDK's overloads cannot see ``stream`` in ``**request``."""
    return cast(
        openai.AsyncStream[ChatCompletionChunk],
        await client.chat.completions.create(model="m", stream=True, **request),
    )


def sdk_client(server: RunningServer, session_id: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/sessions/{session_id}/v1", api_key="unused", max_retries=0
    )


async def committed_answer(api: Api, session_id: str) -> dict[str, Any]:
    state = (await api.get(session_id)).json()
    answer: dict[str, Any] = state["messages"][-1]
    assert state["num_assistant"] == 1
    return answer


async def test_openai_sdk_streams_a_turn_and_an_exact_retry_replays_it_as_a_stream(
    api: Api, server: RunningServer
) -> None:
    session_id = await api.create()
    api.script("s1", {"chunks": 5})
    client = sdk_client(server, session_id)
    messages = [user("s1")]
    texts: list[str] = []
    async for chunk in await open_stream(
        client, messages=messages, stream_options={"include_usage": True}
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
    assert len(texts) == 5
    assert (await committed_answer(api, session_id))["content"] == "".join(texts)

    replayed: list[str] = []
    async for chunk in await open_stream(client, messages=messages):
        if chunk.choices and chunk.choices[0].delta.content:
            replayed.append(chunk.choices[0].delta.content)
    assert "".join(replayed) == "".join(texts)
    assert api.chaos.calls("s1") == 1  # replayed from the record, not generated again
    await client.close()


async def test_openai_sdk_streams_tool_call_deltas_and_the_committed_call_is_whole(
    api: Api, server: RunningServer
) -> None:
    session_id = await api.create()
    api.script("t1", {"chunks": 4})
    client = sdk_client(server, session_id)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in await open_stream(client, messages=[user("t1")], tools=TOOLS):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert api.chaos.count("t1", EventKind.SENT) == 5  # 4 deltas of arguments + the finish
    (committed,) = (await committed_answer(api, session_id))["tool_calls"]
    assert committed["id"] == calls[0]["id"]
    assert committed["function"] == {"name": "lookup", "arguments": calls[0]["arguments"]}
    assert json.loads(calls[0]["arguments"])  # the pieces join back into the JSON
    await client.close()


async def test_openai_sdk_raises_the_session_deleted_event_when_deleted_mid_stream(
    api: Api, server: RunningServer
) -> None:
    session_id = await api.create()
    api.script("d1", {"chunks": 4, "hold_after": 2})
    client = sdk_client(server, session_id)
    stream = await open_stream(client, messages=[user("d1")])
    received = 0

    async def read_and_delete_after_two() -> None:
        nonlocal received
        async for _ in stream:
            received += 1
            if received == 2:  # the upstream now holds the rest
                assert (await api.delete(session_id)).status_code == 204

    with pytest.raises(openai.APIError) as raised:
        await read_and_delete_after_two()
    assert received == 2
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["type"] == "session_deleted"
    await api.chaos.wait_for("d1", EventKind.CANCELLED)
    assert api.chaos.count("d1", EventKind.ANSWERED) == 0
    assert (await api.get(session_id)).status_code == 404
    await client.close()


async def read_events(response: httpx.Response) -> list[str]:
    body = (await response.aread()).decode()
    return [block.removeprefix("data: ") for block in body.split("\n\n") if block]


async def test_a_stream_cut_after_relayed_chunks_ends_with_upstream_error_and_no_retry(
    api: Api,
) -> None:
    session_id = await api.create()
    api.script("c1", {"chunks": 4, "reset_after": 2}, "respond")
    async with api.client.stream(
        "POST",
        f"/sessions/{session_id}/v1/chat/completions",
        json={"messages": [user("c1")], "stream": True},
    ) as response:
        assert response.status_code == 200
        events = await read_events(response)
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["type"] == "upstream_error"
    assert len(events) == 3  # two relayed chunks, then the error
    assert api.chaos.calls("c1") == 1  # the next call would have answered: not made
    assert (await api.get(session_id)).json()["num_assistant"] == 0


async def test_a_stream_that_fails_before_its_first_chunk_is_retried(api: Api) -> None:
    session_id = await api.create()
    api.script("r1", "reset", {"chunks": 2, "garbage_after": 0}, {"chunks": 2})
    async with api.client.stream(
        "POST",
        f"/sessions/{session_id}/v1/chat/completions",
        json={"messages": [user("r1")], "stream": True},
    ) as response:
        events = await read_events(response)
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    assert api.chaos.calls("r1") == 3
    assert (await api.get(session_id)).json()["num_assistant"] == 1


async def test_a_client_that_hangs_up_mid_stream_commits_nothing_and_stops_the_engine(
    api: Api,
) -> None:
    session_id = await api.create()
    api.script("h1", {"chunks": 4, "hold_after": 1})
    async with api.client.stream(
        "POST",
        f"/sessions/{session_id}/v1/chat/completions",
        json={"messages": [user("h1")], "stream": True},
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    await api.chaos.wait_for("h1", EventKind.CANCELLED)
    state = (await api.get(session_id)).json()
    assert (state["num_assistant"], state["in_flight"]) == (0, False)


def litellm_stream(base_url: str, messages: list[dict[str, Any]]) -> tuple[str, str | None]:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch from the internet
    import litellm

    text = ""
    finish = None
    for chunk in litellm.completion(
        model="openai/m", api_base=base_url, api_key="unused", messages=messages, stream=True
    ):
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
    return text, finish


async def test_litellm_streams_a_turn(api: Api, server: RunningServer) -> None:
    session_id = await api.create()
    api.script("l1", {"chunks": 3})
    base_url = f"{server.url}/sessions/{session_id}/v1"
    text, finish = await trio.to_thread.run_sync(litellm_stream, base_url, [user("l1")])
    assert finish == "stop"
    assert (await committed_answer(api, session_id))["content"] == text


# -- no I/O: assembling, replaying, the script language -------------------------------


@given(
    text=st.text(max_size=60),
    parts=st.integers(1, 12),
    tool=st.booleans(),
    flavor=st.sampled_from(FLAVORS),
)
def test_the_chunks_of_an_answer_assemble_back_into_it(
    text: str, parts: int, tool: bool, flavor: Flavor
) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    if tool:
        body["tools"] = TOOLS
    completion = completion_for(body, flavor=flavor)
    assembler = StreamAssembler()
    for chunk in stream_chunks(completion, flavor, parts=parts, wants_usage=True):
        assembler.add(chunk)
    assert assembler.finished
    assert comparable(assembler.message()) == comparable(completion["choices"][0]["message"])
    # And a stored answer replayed as a stream assembles back into the same message.
    replayed = StreamAssembler()
    for chunk in replay_chunks(assembler.completion()):
        replayed.add(chunk)
    assert comparable(replayed.message()) == comparable(assembler.message())


@pytest.mark.parametrize(
    ("chunks", "problem"),
    [
        (["not a chunk"], "not a JSON object"),
        ([{"choices": [{"delta": {"content": 7}}]}], "delta.content is not a string"),
        ([{"choices": [{"delta": {"role": "user"}}]}], "not 'assistant'"),
        ([{"choices": [{"index": 1, "delta": {}}]}], "a turn has one"),
        ([{"choices": [{"delta": {"tool_calls": [{"id": "x"}]}}]}], "no integer index"),
        (
            [
                {"choices": [{"delta": {}, "finish_reason": "stop"}]},
                {"choices": [{"delta": {"content": "late"}}]},
            ],
            "after finish_reason",
        ),
    ],
)
def test_chunks_no_client_could_assemble_are_refused(chunks: list[Any], problem: str) -> None:
    assembler = StreamAssembler()
    for chunk in chunks[:-1]:
        assembler.add(chunk)
    with pytest.raises(ChunkRefused, match=problem):
        assembler.add(chunks[-1])


def test_stream_scripts_parse_and_say_what_is_wrong() -> None:
    held = parse_behaviour({"chunks": 4, "hold_after": 2})
    assert (held.chunks, held.after, held.describe()) == (4, 2, "hold after chunk 2, 4 chunks")
    assert parse_behaviour({"tool_call": True, "chunk_delay": 0.01}).tool_call
    for spec, problem in [
        ({"chunks": 2, "reset_after": 4}, "past the stream's 2 chunks and its finishing chunk"),
        ({"chunks": 0}, "chunks must be an integer"),
        ({"hold_after": 1, "reset_after": 1}, "at most one of"),
        ({"chunk_delay": -1}, "chunk_delay must be"),
        ({"chunks": 2, "stall": 1}, "unknown upstream behaviour"),
    ]:
        with pytest.raises(ScriptError, match=problem):
            parse_behaviour(spec)
