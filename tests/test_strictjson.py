"""strictjson at its limits: what passes just inside, what is refused just outside."""

from __future__ import annotations

import json

import pytest

from wire.strictjson import MAX_DEPTH, MAX_INT_DIGITS, JsonRefused, loads


@pytest.mark.parametrize(
    "raw",
    [
        b" {} ",
        b"[-0, 0.0, 1e308, -1e308, 5e-324]",
        b"1" * MAX_INT_DIGITS,
        b"-" + b"1" * MAX_INT_DIGITS,
        b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
        '"caf\u00e9 \U0001f600"'.encode(),
        b'"\\ud83d\\ude00"',  # an escaped surrogate *pair* is one valid character
    ],
)
def test_json_within_the_limits_parses_as_python_would(raw: bytes) -> None:
    assert loads(raw) == json.loads(raw)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"NaN", "NaN is not a JSON number"),
        (b"[-Infinity]", "-Infinity is not a JSON number"),
        (b"1e309", "out of range"),
        (b"1" * (MAX_INT_DIGITS + 1), f"{MAX_INT_DIGITS + 1} digits"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH}"),
        (b"[" * 100_000 + b"]" * 100_000, f"nested deeper than {MAX_DEPTH}"),
        (b'"\\ud800"', "lone surrogate (\\ud800)"),
        (b'{"\\udc00": 1}', "lone surrogate"),
        (b'"\xff"', "not UTF-8"),
        (b"{} {}", "extra data"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_what_cannot_be_sent_on_is_refused_with_its_reason(raw: bytes, says: str) -> None:
    with pytest.raises(JsonRefused) as refused:
        loads(raw)
    assert says in str(refused.value)
