"""The session rules on their own: no I/O, no server."""

from __future__ import annotations

from typing import Any

import pytest

from wire import rules
from wire.rules import Conflict, Extend, Replay, SessionState, Transition, classify_turn

U1: dict[str, Any] = {"role": "user", "content": "one"}
A1: dict[str, Any] = {"role": "assistant", "content": "first answer"}
U2: dict[str, Any] = {"role": "user", "content": "two"}


def test_lifecycle_allows_only_open_closing_gone() -> None:
    assert rules.next_state(SessionState.OPEN, Transition.DELETE_ACCEPTED) is SessionState.CLOSING
    assert rules.next_state(SessionState.CLOSING, Transition.REMOVED) is SessionState.GONE
    for state, transition in [
        (SessionState.CLOSING, Transition.DELETE_ACCEPTED),
        (SessionState.GONE, Transition.DELETE_ACCEPTED),
        (SessionState.OPEN, Transition.REMOVED),
        (SessionState.GONE, Transition.REMOVED),
    ]:
        with pytest.raises(RuntimeError, match="illegal session transition"):
            rules.next_state(state, transition)


def test_only_open_sessions_are_visible() -> None:
    assert rules.is_visible(SessionState.OPEN)
    assert not rules.is_visible(SessionState.CLOSING)
    assert not rules.is_visible(SessionState.GONE)


def test_first_turn_extends_an_empty_trajectory() -> None:
    assert classify_turn([], None, [U1]) == Extend(new_messages=1)


def test_next_turn_extends() -> None:
    assert classify_turn([U1, A1], [U1], [U1, A1, U2]) == Extend(new_messages=1)


def test_exact_retry_of_the_last_turn_replays() -> None:
    assert classify_turn([U1, A1], [U1], [U1]) == Replay()


def test_divergence_is_a_conflict_naming_the_index() -> None:
    other = {"role": "assistant", "content": "not what was committed"}
    decision = classify_turn([U1, A1], [U1], [U1, other, U2])
    assert isinstance(decision, Conflict)
    assert (decision.committed_length, decision.diverging_index) == (2, 1)


def test_a_request_that_adds_nothing_is_a_conflict() -> None:
    decision = classify_turn([U1, A1], [U1], [U1, A1])
    assert isinstance(decision, Conflict)
    assert decision.diverging_index == 2


def test_a_request_ending_with_an_assistant_message_is_a_conflict() -> None:
    decision = classify_turn([], None, [U1, A1])
    assert isinstance(decision, Conflict)
    assert "assistant" in decision.reason


def test_a_stale_writer_is_a_conflict_at_index_zero() -> None:
    decision = classify_turn([U1, A1], [U1], [U2])
    assert isinstance(decision, Conflict)
    assert decision.diverging_index == 0


def test_comparison_ignores_client_added_keys() -> None:
    assert rules.comparable({**A1, "refusal": None, "x-trace": 1}) == rules.comparable(A1)


def test_comparison_sees_every_identifying_field() -> None:
    base: dict[str, Any] = {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}
    for key, value in [
        ("role", "user"),
        ("content", "43"),
        ("tool_call_id", "c2"),
        ("name", "g"),
    ]:
        assert rules.comparable({**base, key: value}) != rules.comparable(base), key


def test_text_parts_and_empty_content_compare_like_strings_and_none() -> None:
    parts = {"role": "assistant", "content": [{"type": "text", "text": "first answer"}]}
    assert rules.comparable(parts) == rules.comparable(A1)
    assert rules.comparable({"role": "assistant", "content": ""}) == rules.comparable(
        {"role": "assistant", "content": None}
    )


def test_tool_calls_compare_on_id_name_and_arguments_only() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    echoed = {**call, "index": 0}
    assert rules.comparable({"role": "assistant", "tool_calls": [call]}) == rules.comparable(
        {"role": "assistant", "tool_calls": [echoed], "content": None}
    )
    changed = {**call, "function": {"name": "f", "arguments": '{"x": 1}'}}
    assert rules.comparable({"role": "assistant", "tool_calls": [call]}) != rules.comparable(
        {"role": "assistant", "tool_calls": [changed]}
    )
