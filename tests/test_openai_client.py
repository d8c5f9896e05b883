"""A real OpenAI client talks to a session as its base URL, the way agents do."""

from __future__ import annotations

import openai
import pytest

from refserver.server import RunningServer

from .conftest import Api, user


async def test_async_openai_completes_two_turns_then_sees_not_found(
    api: Api, server: RunningServer
) -> None:
    session_id = await api.create()
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/sessions/{session_id}/v1", api_key="unused", max_retries=0
    )
    messages: list[dict[str, str]] = [user("sdk1")]
    first = await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert first.choices[0].message.role == "assistant"
    messages = [
        *messages,
        first.choices[0].message.model_dump(exclude_none=True),
        user("sdk2", "and again"),
    ]
    second = await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert second.choices[0].message.content
    assert (await api.get(session_id)).json()["num_assistant"] == 2

    assert (await api.delete(session_id)).status_code == 204
    with pytest.raises(openai.NotFoundError) as raised:
        await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert raised.value.status_code == 404
    await client.close()


async def test_async_openai_raises_conflict_on_a_stale_trajectory(
    api: Api, server: RunningServer
) -> None:
    session_id = await api.create()
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/sessions/{session_id}/v1", api_key="unused", max_retries=0
    )
    await client.chat.completions.create(model="m", messages=[user("a")])  # type: ignore[list-item]
    with pytest.raises(openai.ConflictError):
        await client.chat.completions.create(model="m", messages=[user("b")])  # type: ignore[list-item]
    await client.close()
