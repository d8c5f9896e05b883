"""JSON as RFC 8259 means it, with limits; no I/O.

Python's ``json`` accepts more than JSON and fails late on what it accepted:
``NaN`` and ``Infinity`` parse but cannot be sent on (``allow_nan=False``);
``1e999`` parses to infinity; a lone surrogate (``"\\ud800"``) parses but
cannot be encoded as UTF-8; an integer of 5,000 digits raises a bare
``ValueError``; deep nesting raises ``RecursionError``, here or in any later
recursive walk. Every one of those surfaced as a 500 somewhere downstream.

``loads`` refuses all of them up front, with one exception type saying what
and where, so the caller can answer 400 (a client's body) or 502 (an
upstream's answer) before anything else runs.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64
"""Arrays and objects nested deeper than this are refused (chat bodies use < 10)."""

MAX_INT_DIGITS = 64
"""Integers with more digits are refused (any 64-bit seed or token id has at most 20)."""


class JsonRefused(ValueError):
    """The text is not JSON we accept; the message says what and where."""


def _refuse_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number; non-finite numbers are refused")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused(f"the number {text[:40]} is out of range (not finite as a double)")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise JsonRefused(f"an integer has {digits} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


_DECODER = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int
)


def loads(raw: bytes) -> Any:
    """Parse UTF-8 JSON text, refusing what cannot be sent on; raises ``JsonRefused``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonRefused(f"not UTF-8 (byte {error.start}: {error.reason})") from None
    try:
        value, end = _DECODER.raw_decode(text, _skip_whitespace(text, 0))
    except JsonRefused:
        raise
    except json.JSONDecodeError as error:
        raise JsonRefused(f"not valid JSON: {error}") from None
    except RecursionError:
        raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels") from None
    if _skip_whitespace(text, end) != len(text):
        raise JsonRefused(f"not valid JSON: extra data at char {end}")
    check_tree(value)
    return value


def check_tree(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings that are not valid Unicode."""
    # Iterative, so that checking depth cannot itself run out of stack.
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, str):
            _check_string(node, where)
        elif isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise JsonRefused(f"nested deeper than {MAX_DEPTH} levels (at {where})")
            if isinstance(node, dict):
                for key, child in node.items():
                    _check_string(key, where)
                    stack.append((child, depth + 1, f"{where}.{key}"))
            else:
                stack.extend((child, depth + 1, f"{where}[{i}]") for i, child in enumerate(node))


def _check_string(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise JsonRefused(
            f"a string at {where} has a lone surrogate (\\u{ord(text[error.start]):04x}), "
            "which is not Unicode text"
        ) from None


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\n\r":
        index += 1
    return index
