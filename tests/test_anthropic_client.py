"""The official Anthropic SDK talks to a session: the Messages API on the same core.

The session keeps one trajectory whichever API writes it, so the rules are the
same (exact retries replay, conflicts are refused, DELETE preempts a turn and
its stream); only the spelling differs (``wire/anthropic.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import anthropic
import pytest

from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind, parse_behaviour
from refserver.server import RunningServer
from wire.anthropic import chat_to_messages, parse_messages_request
from wire.errors import InvalidRequest
from wire.rules import comparable

from .conftest import Api, user

TOOLS: list[Any] = [{"name": "lookup", "description": "look", "input_schema": {"type": "object"}}]


def client_for(server: RunningServer, session_id: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=f"{server.url}/sessions/{session_id}", api_key="unused", max_retries=0
    )


async def test_two_turns_a_replayed_retry_and_a_conflict(api: Api, server: RunningServer) -> None:
    session_id = await api.create()
    client = client_for(server, session_id)
    first: Any = [{"role": "user", "content": user("a1")["content"]}]
    reply = await client.messages.create(model="m", max_tokens=64, messages=first)
    assert reply.stop_reason == "end_turn"
    text = reply.content[0].text  # type: ignore[union-attr]
    again = await client.messages.create(model="m", max_tokens=64, messages=first)
    assert again.content[0].text == text  # type: ignore[union-attr]
    assert api.chaos.calls("a1") == 1  # replayed from the record
    second: Any = [*first, {"role": "assistant", "content": text}, {"role": "user", "content": "b"}]
    await client.messages.create(model="m", max_tokens=64, messages=second)
    state = (await api.get(session_id)).json()
    assert state["num_assistant"] == 2
    assert state["messages"][1] == {"role": "assistant", "content": text}
    stranger: Any = [{"role": "user", "content": "another first turn"}]
    with pytest.raises(anthropic.ConflictError) as raised:
        await client.messages.create(model="m", max_tokens=64, messages=stranger)
    assert raised.value.body["error"]["sessctl_type"] == "trajectory_conflict"  # type: ignore[index]
    await client.close()


async def test_a_streamed_tool_use_is_committed_as_a_tool_call(
    api: Api, server: RunningServer
) -> None:
    session_id = await api.create()
    api.script("t1", {"chunks": 3})
    client = client_for(server, session_id)
    async with client.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": user("t1")["content"]}],
        tools=TOOLS,
    ) as stream:  # fmt: skip
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use"
    (committed,) = (await api.get(session_id)).json()["messages"][1]["tool_calls"]
    assert committed["id"] == block.id
    assert committed["function"]["name"] == "lookup"
    # The agent answers with the tool's result, as Anthropic spells it: a new turn.
    result: Any = [
        {"role": "user", "content": user("t1")["content"]},
        {"role": "assistant", "content": [block.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "42"}],
        },
    ]
    await client.messages.create(model="m", max_tokens=64, messages=result, tools=TOOLS)
    assert (await api.get(session_id)).json()["num_assistant"] == 2
    await client.close()


async def test_delete_mid_stream_is_an_error_event_and_nothing_is_committed(
    api: Api, server: RunningServer
) -> None:
    session_id = await api.create()
    api.script("d1", {"chunks": 4, "hold_after": 2})
    client = client_for(server, session_id)
    texts: list[str] = []

    async def read_and_delete() -> None:
        async with client.messages.stream(
            model="m", max_tokens=64, messages=[{"role": "user", "content": user("d1")["content"]}]
        ) as stream:
            async for text in stream.text_stream:
                texts.append(text)
                if len(texts) == 2:  # the engine now holds the rest
                    assert (await api.delete(session_id)).status_code == 204

    with pytest.raises(anthropic.APIStatusError) as raised:
        await read_and_delete()
    assert raised.value.body["error"]["sessctl_type"] == "session_deleted"  # type: ignore[index]
    await api.chaos.wait_for("d1", EventKind.CANCELLED)
    assert (await api.get(session_id)).status_code == 404
    await client.close()


async def test_errors_before_the_turn_are_in_anthropic_shape(
    api: Api, server: RunningServer
) -> None:
    client = client_for(server, "no-such-session")
    with pytest.raises(anthropic.NotFoundError) as raised:
        await client.messages.create(
            model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "no session no-such-session",
            "sessctl_type": "session_not_found",
        },
    }
    await client.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "max_tokens"),
        (b'{"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}', "messages[0]"),
        (
            b'{"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "x"}]}]}',
            "messages[0].content[0]",
        ),
        (
            b'{"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "thinking": {}}',
            "thinking",
        ),
    ],
)
def test_a_request_that_is_not_a_messages_turn_names_its_field(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_messages_request(body)
    assert raised.value.details["param"] == param


def test_a_chat_turn_survives_the_round_trip_through_the_messages_api() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    turn: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "user", "content": "and then?"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    sent = chat_to_messages({"model": "m", "messages": turn, "tools": tools, "stream": True})
    assert sent["system"] == "be brief"
    assert sent["messages"][2]["content"][0]["type"] == "tool_result"
    back = parse_messages_request(json.dumps(sent).encode())
    assert [comparable(m) for m in back.messages] == [comparable(m) for m in turn]
    assert back.stream
    assert back.body["tools"][0]["function"]["name"] == "f"


def test_the_whole_library_passes_over_the_messages_api_through_the_cli() -> None:
    def sessctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sessctl", *args], capture_output=True, text=True, timeout=300
        )

    clean = sessctl("run-scenarios", "--profile", "anthropic-messages")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "32 scenario results: 32 passed" in clean.stdout
    broken = sessctl(
        "run-scenarios", "--profile", "anthropic-messages", "--emulate", "delete-waits-for-stream",
        "--filter", "delete-mid-stream",
    )  # fmt: skip
    assert broken.returncode == 1, broken.stdout
    assert "200 ✓[DONE]" in broken.stdout  # the stream ran on, as Anthropic events


async def test_the_chaos_upstream_answers_and_streams_the_messages_api(
    chaos: ChaosUpstream,
) -> None:
    """So a server that calls an Anthropic-style engine can be raced with the same
    scripts: holds after chunk k, statuses, and the events recorded per chunk."""
    assert chaos.url is not None
    engine = anthropic.AsyncAnthropic(
        base_url=chaos.url.removesuffix("/v1"), api_key="unused", max_retries=0
    )
    ask: Any = [{"role": "user", "content": user("e1")["content"]}]
    reply = await engine.messages.create(model="m", max_tokens=64, messages=ask)
    assert reply.content[0].text.startswith("answer")  # type: ignore[union-attr]
    chaos.script("e2", [parse_behaviour({"chunks": 4, "hold_after": 2})])
    held: Any = [{"role": "user", "content": user("e2")["content"]}]
    texts: list[str] = []
    async with engine.messages.stream(model="m", max_tokens=64, messages=held) as stream:
        async for text in stream.text_stream:
            texts.append(text)
            if len(texts) == 2:
                # The upstream records a chunk once it is written: wait for it, then
                # see that the hold keeps the third back.
                await chaos.wait_for("e2", EventKind.SENT, 2)
                assert chaos.count("e2", EventKind.SENT) == 2
                chaos.release("e2")
        final = await stream.get_final_message()
    assert len(texts) == 4
    assert final.stop_reason == "end_turn"
    await chaos.wait_for("e2", EventKind.ANSWERED)
    chaos.script("e3", [parse_behaviour({"status": 503})])
    failing: Any = [{"role": "user", "content": user("e3")["content"]}]
    with pytest.raises(anthropic.APIStatusError) as raised:
        await engine.messages.create(model="m", max_tokens=64, messages=failing)
    assert raised.value.status_code == 503
    await engine.close()
