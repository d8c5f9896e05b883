"""SGLang's native ``/generate`` (``--flavor sglang-generate``) and the tokenizer sessctl ships.

The tokenizer must be a real Hugging Face one (a server loads it with
``tokenizers`` and renders its chat template with Jinja, as transformers does),
and ``wire.tokens`` must read it the same way with no dependency: the chaos
upstream finds a step's marker in a prompt that arrives as token ids.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jinja2
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HuggingFaceTokenizer

from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind, marker, parse_behaviour
from wire.tokens import TOKENIZER_DIR, parse_tool_calls, render_chat, tokenizer

from .conftest import HANG_GUARD

HF = HuggingFaceTokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
CONFIG = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
# transformers renders chat templates with these options; the shipped template
# is written so that they (and Jinja's defaults) give the same text.
TEMPLATE = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
    CONFIG["chat_template"]
)

TEXT = st.text(
    alphabet=st.sampled_from(list("abc xyz019_-.:[]{}\"'\n\té日<|>/")), max_size=80
) | st.sampled_from(["<|im_start|>user\nhi<|im_end|>\n", marker("run.0.ab12.c1"), ""])


@given(TEXT)
@settings(max_examples=200, deadline=None)
def test_encoding_matches_the_tokenizers_library_and_decodes_back(text: str) -> None:
    ours = tokenizer().encode(text)
    assert ours == HF.encode(text).ids
    assert tokenizer().decode(ours) == text


@given(st.lists(st.integers(min_value=0, max_value=len(tokenizer().ids) - 1), max_size=60))
@settings(max_examples=200, deadline=None)
def test_any_ids_decode_as_the_tokenizers_library_decodes_them(ids: list[int]) -> None:
    assert tokenizer().decode(ids) == HF.decode(ids, skip_special_tokens=False)
    assert tokenizer().decode(ids, skip_special=True) == HF.decode(ids, skip_special_tokens=True)


MESSAGE = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["system", "user"]), TEXT),
    st.builds(lambda c: {"role": "tool", "tool_call_id": "t", "content": c}, TEXT),
    st.builds(
        lambda name: {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "x", "type": "function", "function": {"name": name, "arguments": "{}"}}
            ],
        },
        st.sampled_from(["sessctl_step", "f"]),
    ),
    st.builds(
        lambda text: {"role": "user", "content": [{"type": "text", "text": text}]},
        TEXT,
    ),
)


@given(st.lists(MESSAGE, min_size=1, max_size=5), st.booleans())
@settings(max_examples=100, deadline=None)
def test_the_chat_template_renders_as_transformers_renders_it(
    messages: list[dict[str, Any]], with_tools: bool
) -> None:
    tools = [{"type": "function", "function": {"name": "sessctl_step"}}] if with_tools else None
    expected = TEMPLATE.render(messages=messages, tools=tools, add_generation_prompt=True)
    assert render_chat(messages, tools) == expected


def test_the_shipped_directory_is_a_tokenizer_a_server_can_load() -> None:
    assert CONFIG["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert CONFIG["eos_token"] == "<|im_end|>"
    special = json.loads((TOKENIZER_DIR / "special_tokens_map.json").read_text())
    assert special["eos_token"] == CONFIG["eos_token"]
    assert HF.token_to_id("<|im_end|>") == tokenizer().token_id("<|im_end|>")


def test_a_tool_call_in_generated_text_is_read_back() -> None:
    text, calls = parse_tool_calls(
        'thinking <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    )
    assert text == "thinking "
    assert calls == [{"name": "f", "arguments": '{"a": 1}'}]
    assert parse_tool_calls("<tool_call>{not json</tool_call>")[1] == []


# -- the chaos upstream's /generate ----------------------------------------------------


@pytest.fixture
async def generate(nursery: trio.Nursery) -> AsyncIterator[tuple[ChaosUpstream, httpx.AsyncClient]]:
    chaos = ChaosUpstream("sglang-generate")
    url = await nursery.start(chaos.serve)
    root = url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root, timeout=HANG_GUARD) as client:
        yield chaos, client


def prompt(tag: str, *, tools: bool = False) -> str:
    offered = [{"type": "function", "function": {"name": "sessctl_step"}}] if tools else None
    return render_chat([{"role": "user", "content": f"turn {marker(tag)}"}], offered)


def request(tag: str, given: str = "ids", **extra: Any) -> dict[str, Any]:
    text = prompt(tag, tools=extra.pop("tools", False))
    source: dict[str, Any] = (
        {"input_ids": HF.encode(text).ids} if given == "ids" else {"text": text}
    )
    return {**source, "sampling_params": {"max_new_tokens": 64}, **extra}


@pytest.mark.parametrize("given_as", ["ids", "text"])
async def test_generate_answers_in_sglangs_native_shape(
    generate: tuple[ChaosUpstream, httpx.AsyncClient], given_as: str
) -> None:
    chaos, client = generate
    answer = await client.post("/generate", json=request("g", given_as, return_logprob=True))
    assert answer.status_code == 200
    body = answer.json()
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": HF.token_to_id("<|im_end|>")}
    assert meta["prompt_tokens"] == len(HF.encode(prompt("g")).ids)
    tokens = [entry[1] for entry in meta["output_token_logprobs"]]
    assert tokens == body["output_ids"]
    assert meta["completion_tokens"] == len(tokens)
    # What a server reads: the tokens, detokenized without the end of the turn.
    assert HF.decode(tokens, skip_special_tokens=True) == body["text"]
    assert body["text"].startswith("answer ")
    await chaos.wait_for("g", EventKind.ANSWERED)
    again = await client.post("/generate", json=request("g", given_as, return_logprob=True))
    assert again.json()["text"] == body["text"]  # equal prompts, equal answers
    plain = await client.post("/generate", json=request("g", given_as))
    assert "output_token_logprobs" not in plain.json()["meta_info"]


async def test_a_prompt_that_offers_tools_gets_a_tool_call_in_the_text(
    generate: tuple[ChaosUpstream, httpx.AsyncClient],
) -> None:
    _, client = generate
    answer = (await client.post("/generate", json=request("t", tools=True))).json()
    text, calls = parse_tool_calls(answer["text"])
    assert text == ""
    assert calls[0]["name"] == "sessctl_step"


async def test_an_abort_is_sglangs_abort_before_prefill_with_no_tokens(
    generate: tuple[ChaosUpstream, httpx.AsyncClient],
) -> None:
    chaos, client = generate
    chaos.script("a", [parse_behaviour("abort"), parse_behaviour("respond")])
    first = (await client.post("/generate", json=request("a", return_logprob=True))).json()
    assert first["meta_info"]["finish_reason"]["type"] == "abort"
    assert first["meta_info"]["finish_reason"]["message"].startswith("Abort before prefill")
    assert first["output_ids"] == []
    assert first["meta_info"]["output_token_logprobs"] == []
    second = (await client.post("/generate", json=request("a"))).json()
    assert second["meta_info"]["finish_reason"]["type"] == "stop"


async def test_a_stream_is_cumulative_and_ends_with_done(
    generate: tuple[ChaosUpstream, httpx.AsyncClient],
) -> None:
    chaos, client = generate
    chaos.script("s", [parse_behaviour({"chunks": 4})])
    answer = await client.post("/generate", json=request("s", stream=True, return_logprob=True))
    events = [line[6:] for line in answer.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    texts = [c["text"] for c in chunks]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"
    assert chaos.count("s", EventKind.SENT) == len(chunks)


async def test_holds_and_statuses_act_on_generate_as_on_chats(
    generate: tuple[ChaosUpstream, httpx.AsyncClient], nursery: trio.Nursery
) -> None:
    chaos, client = generate
    chaos.script("h", [parse_behaviour({"status": 503}), parse_behaviour("hold")])
    failed = await client.post("/generate", json=request("h"))
    assert failed.status_code == 503
    assert "message" in failed.json()["error"]
    answers: list[httpx.Response] = []

    async def held() -> None:
        answers.append(await client.post("/generate", json=request("h")))

    nursery.start_soon(held)
    await chaos.wait_for("h", EventKind.RECEIVED, count=2)
    await trio.testing.wait_all_tasks_blocked()
    assert answers == []
    chaos.release("h")
    await chaos.wait_for("h", EventKind.ANSWERED, count=2)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"text": "a", "input_ids": [1]}, "Either text or input_ids"),
        ({}, "Either text or input_ids"),
        ({"input_ids": ["x"]}, "input_ids must be a list of token ids"),
        ({"text": ["a", "b"]}, "text must be a string"),
    ],
)
async def test_a_request_sglang_would_refuse_is_refused_with_its_reason(
    generate: tuple[ChaosUpstream, httpx.AsyncClient], payload: dict[str, Any], reason: str
) -> None:
    _, client = generate
    answer = await client.post("/generate", json=payload)
    assert answer.status_code == 400
    assert reason in answer.json()["error"]["message"]


async def test_generate_is_only_served_in_its_flavor(chaos: ChaosUpstream) -> None:
    root = str(chaos.url).removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root) as client:
        assert (await client.post("/generate", json=request("x"))).status_code == 404
