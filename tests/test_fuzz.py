"""The promise "no input ever yields a 500", tested with generated input (hypothesis).

The server is ``sessctl serve`` in a child process, as a user runs it, with
its embedded upstream; every example goes over real HTTP. For each one:

* no 5xx other than 502 and 504 (the upstream's failures, passed on);
* every 4xx has the OpenAI error shape;
* a refused chat leaves the session's trajectory exactly as it was;
* ``/healthz`` still answers.

And at the end, the server's log has no traceback and no line from the last
resort. Examples: ``FUZZ_PROFILE=ci`` (the default, fixed seed, a few hundred
per test) or ``FUZZ_PROFILE=local`` (20,000 per test, random seed)::

    FUZZ_PROFILE=local .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wire.rules import ROLES

from .conftest import HANG_GUARD, start_sessctl_serve

settings.register_profile(
    "ci",
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
settings.register_profile(
    "local",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile(os.environ.get("FUZZ_PROFILE", "ci"))


@dataclass
class Server:
    url: str
    client: httpx.Client
    log: Path


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with log.open("w") as log_file:
            process, url = start_sessctl_serve(stderr=log_file)
            try:
                with httpx.Client(base_url=url, timeout=HANG_GUARD) as client:
                    yield Server(url, client, log)
            finally:
                process.terminate()
                process.wait(timeout=HANG_GUARD)
        text = log.read_text()
        assert "Traceback" not in text
        assert ": unexpected " not in text  # the last resort's line


# -- generators ----------------------------------------------------------------------

# Any JSON value, including what Python's json writes but RFC 8259 refuses:
# NaN and infinities (allow_nan), lone surrogates (ensure_ascii escapes them),
# integers past 64 digits.
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=20)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**80), max_value=10**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
any_json = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)

roles = st.sampled_from(sorted(ROLES)) | any_json
text_part = st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=10) | any_json}
)
part = text_part | st.fixed_dictionaries({"type": any_json}, optional={"text": any_json})
content = st.text(max_size=20) | st.none() | st.lists(part, max_size=3) | any_json
tool_call = st.fixed_dictionaries(
    {
        "id": st.text(max_size=5) | any_json,
        "type": st.just("function") | any_json,
        "function": st.fixed_dictionaries(
            {"name": st.text(max_size=5) | any_json, "arguments": st.text(max_size=10) | any_json}
        )
        | any_json,
    }
)
message = st.fixed_dictionaries(
    {"role": roles},
    optional={
        "content": content,
        "name": st.text(max_size=5) | any_json,
        "tool_call_id": st.text(max_size=5) | any_json,
        "tool_calls": st.lists(tool_call, max_size=2) | any_json,
        "reasoning_content": any_json,
    },
)
chat_body = (
    st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=4) | any_json},
        optional={
            "model": st.text(max_size=8) | any_json,
            "stream": st.booleans() | any_json,
            "n": st.just(1) | any_json,
            "temperature": any_json,
            "tools": any_json,
            "logprobs": any_json,
        },
    )
    | any_json
)


def encode(value: Any) -> bytes:
    # Python's own encoder, on purpose: it writes NaN, Infinity and \udXXX.
    return json.dumps(value, allow_nan=True).encode()


# -- the invariants ----------------------------------------------------------------


def check_answer(response: httpx.Response) -> None:
    status = response.status_code
    assert status < 500 or status in (502, 504), (status, response.text[:500])
    if 400 <= status < 500 and response.request.method != "HEAD":
        error = response.json()["error"]
        assert isinstance(error["type"], str)
        assert isinstance(error["message"], str)


def chat_and_check(server: Server, raw: bytes, headers: dict[str, str] | None = None) -> None:
    client = server.client
    session_id = client.post("/sessions").json()["session_id"]
    seed = client.post(
        f"/sessions/{session_id}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "seed"}]},
    )
    assert seed.status_code == 200
    before = client.get(f"/sessions/{session_id}").json()
    response = client.post(
        f"/sessions/{session_id}/v1/chat/completions",
        content=raw,
        headers=headers or {"content-type": "application/json"},
    )
    check_answer(response)
    if response.status_code != 200:
        assert client.get(f"/sessions/{session_id}").json() == before
    assert client.get("/healthz").status_code == 200


# -- the suites ----------------------------------------------------------------------


@FUZZ
@given(body=chat_body)
def test_generated_chat_bodies(server: Server, body: Any) -> None:
    chat_and_check(server, encode(body))


def _mutations(body: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(
        [body[: len(body) // 2], body + b"}", body.replace(b'"', b"'"), b"\xff" + body]
    )


raw_bodies = st.binary(max_size=200) | chat_body.map(encode).flatmap(_mutations)


@FUZZ
@given(raw=raw_bodies)
# The five classes that once answered 500, as explicit regressions.
@example(raw=b'{"messages": [{"role": ["user"], "content": "hi"}]}')
@example(raw=b'{"messages": [{"role": {}, "content": "hi"}]}')
@example(raw=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
@example(raw=b'{"messages": [{"role": "user", "content": "hi"}], "x": 1e999}')
@example(raw=b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
@example(raw=b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}")
@example(
    raw=b'{"messages": [{"role": "user", "content": "hi"}], "x": '
    + b"[" * 5000
    + b"]" * 5000
    + b"}"
)
def test_raw_bodies(server: Server, raw: bytes) -> None:
    chat_and_check(server, raw)


header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z")
header_values = st.from_regex(r"\A[ -~]{0,30}\Z").map(str.strip)
content_types = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        "multipart/form-data; boundary=x",
    ]
)


@FUZZ
@given(
    body=chat_body.map(encode),
    content_type=content_types,
    extra=st.dictionaries(header_names, header_values, max_size=3),
)
def test_generated_headers(
    server: Server, body: bytes, content_type: str, extra: dict[str, str]
) -> None:
    headers = {k: v for k, v in extra.items() if k.lower() not in _FRAMING}
    headers["content-type"] = content_type
    chat_and_check(server, body, headers)


_FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}

segments = st.text(alphabet=st.characters(codec="utf-8"), max_size=12).map(
    lambda s: urllib.parse.quote(s, safe="")
) | st.sampled_from(
    ["sessions", "v1", "chat", "completions", "..", ".", "", "healthz", "%00", "%2F"]
)
methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])


@FUZZ
@given(
    method=methods, parts=st.lists(segments, min_size=1, max_size=6), body=st.binary(max_size=50)
)
def test_generated_paths_and_methods(
    server: Server, method: str, parts: list[str], body: bytes
) -> None:
    path = "/" + "/".join(parts)
    response = server.client.request(method, server.url + path, content=body or None)
    check_answer(response)
    assert "location" not in response.headers
    assert server.client.get("/healthz").status_code == 200
