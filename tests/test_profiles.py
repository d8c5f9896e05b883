"""Profiles: loading, reading trajectories through them, and `profile check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from pydantic import ValidationError

from harness.errors import ScenarioFileError, UsageError
from harness.model.profile import REFERENCE_PROFILE, Profile, load_profile, read_trajectory
from harness.run.client import TargetClient
from harness.run.profile_probe import ProbeResult, probe_profile
from harness.upstream.chaos_upstream import ChaosUpstream
from refserver.server import RunningServer, ServerConfig, serve

from .third_party_server import serve_third_party


def comparable(profile: Profile) -> dict[str, object]:
    return profile.model_dump(exclude={"name", "description"})


def test_builtin_profiles_load_by_name() -> None:
    assert comparable(load_profile("reference")) == comparable(REFERENCE_PROFILE)
    assert load_profile(None) is REFERENCE_PROFILE
    example = load_profile("records-tool-400")
    assert example.differences() == [
        "create answers 200, not 201",
        "health route /health, not /healthz",
        "the trajectory is derived from records",
        "only tool messages may follow an assistant turn",
        "an exact retry regenerates instead of replaying",
        "upstream failures are passed through, not retried",
        "streams are buffered: chunks come only once the whole answer is there",
        "rejected requests answer 400, not 409",
        "errors are plain strings, not OpenAI-shaped",
    ]


def test_a_bad_profile_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ncreate:\n  status: 201\n  id_feld: id\n")
    with pytest.raises(ScenarioFileError) as raised:
        load_profile(str(path))
    assert (raised.value.line, raised.value.column) == (4, 3)
    assert "unknown field 'id_feld'" in raised.value.message
    with pytest.raises(UsageError, match="not a built-in profile"):
        load_profile("no-such-profile")


def test_reading_a_trajectory_from_records() -> None:
    profile = load_profile("records-tool-400")
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "hello"}
    body = {
        "records": [
            {"request": {"messages": [user]}, "response": {"choices": [{"message": answer}]}}
        ]
    }
    state = read_trajectory(profile, body)
    assert state.messages == [user, answer]
    assert state.num_assistant == 1
    assert read_trajectory(profile, {"records": []}).messages == []
    assert read_trajectory(profile, {"records": [{"request": {}}]}).messages is None
    assert read_trajectory(REFERENCE_PROFILE, "not a dict").messages is None


async def _probe(nursery: trio.Nursery, third_party: bool) -> ProbeResult:
    chaos = ChaosUpstream("sglang" if third_party else "openai")
    await nursery.start(chaos.serve)
    assert chaos.url is not None
    if third_party:
        url = await nursery.start(serve_third_party, chaos.url)
    else:
        running: RunningServer = await nursery.start(
            serve, ServerConfig(port=0, upstream_url=chaos.url)
        )
        url = running.url
    client = TargetClient(url, request_timeout=10)
    try:
        return await probe_profile(client, chaos)
    finally:
        await client.aclose()


async def test_profile_check_recognises_the_reference_server(nursery: trio.Nursery) -> None:
    result = await _probe(nursery, third_party=False)
    assert comparable(result.profile) == comparable(REFERENCE_PROFILE)


async def test_profile_check_rediscovers_a_third_party_servers_conventions(
    nursery: trio.Nursery,
) -> None:
    result = await _probe(nursery, third_party=True)
    assert comparable(result.profile) == comparable(load_profile("records-tool-400"))
    notes = "\n".join(result.notes)
    assert "GET /healthz answered 404" in notes  # and /health answered
    assert "an upstream 503 was passed to the agent" in notes
    assert "an exact retry of the first turn is refused" in notes


def test_a_chat_is_addressed_as_the_profile_says() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "metadata": {"tag": "x"}}
    reference = REFERENCE_PROFILE.chat_request("abc", body)
    assert reference == ("/sessions/abc/v1/chat/completions", {}, body)
    bearer = Profile(addressing="bearer").chat_request("abc", body)
    assert bearer == ("/v1/chat/completions", {"authorization": "Bearer abc"}, body)
    header = Profile(addressing="header:X-Session-ID").chat_request("abc", body)
    assert header[1] == {"X-Session-ID": "abc"}
    path, headers, sent = Profile(addressing="body:metadata.session_id").chat_request("abc", body)
    assert (path, headers) == ("/v1/chat/completions", {})
    assert sent["metadata"] == {"tag": "x", "session_id": "abc"}
    assert "session_id" not in body["metadata"]  # the caller's body is not changed


def test_addressing_and_chat_paths_that_cannot_work_are_refused() -> None:
    for fields in (
        {"addressing": "cookie"},
        {"addressing": "header:"},
        {"addressing": "path", "chat_path": "/v1/chat/completions"},
    ):
        with pytest.raises(ValidationError):
            Profile.model_validate(fields)
    example = load_profile("bearer-implicit")
    assert example.differences()[:2] == [
        "the session is named by bearer, not the path",
        "sessions are created implicitly, by the first request that names them",
    ]


def test_a_closed_session_may_answer_any_refusal_the_profile_names() -> None:
    reclaimed = Profile(closed_status=[410])
    assert "a closed session answers 410, not 404" in reclaimed.differences()
    with pytest.raises(ValidationError):
        Profile(closed_status=[204])


def test_a_tree_is_read_from_records_in_get_or_from_its_turns_route() -> None:
    first = [{"role": "user", "content": "one"}]
    other = [{"role": "user", "content": "other"}]
    answer = {"role": "assistant", "content": "a"}

    def record(messages: list[dict[str, str]]) -> dict[str, object]:
        return {"request": {"messages": messages}, "response": {"choices": [{"message": answer}]}}

    records = [record(first), record(other)]
    in_get = Profile(trajectory={"model": "tree", "source": "records"})  # type: ignore[arg-type]
    state = read_trajectory(in_get, {"records": records})
    assert state.turns == [[*first, answer], [*other, answer]]
    assert state.messages == [*other, answer]  # the active path: the branch committed last
    assert state.has_turn([*first, answer])
    assert not state.has_turn([*first, answer, *other])
    routed = load_profile("tree-turns")
    body = {"messages": [*other, answer]}
    for listed in ({"records": records}, records):
        assert read_trajectory(routed, body, listed).turns == state.turns
    assert read_trajectory(routed, body, None).turns is None  # the route did not answer
    assert read_trajectory(REFERENCE_PROFILE, {"records": records}).turns is None  # linear
    assert routed.differences()[2:4] == [
        "the trajectory is a tree: a divergent turn starts a branch",
        "GET shows no count of turns",
    ]


def test_a_tree_must_say_where_every_turn_is_listed() -> None:
    for trajectory in (
        {"model": "tree"},  # GET's messages show one path only
        {"model": "linear", "turns_path": "/sessions/{session}/turns"},
        {"model": "tree", "turns_path": "/turns"},
    ):
        with pytest.raises(ValidationError):
            Profile.model_validate({"trajectory": trajectory})
