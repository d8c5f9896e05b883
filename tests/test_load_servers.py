"""sessctl load on servers written apart from the reference, under their profiles: a
bearer key with sessions made on first use, a tree of turns, Anthropic's Messages
API (streamed as its events). Each fixed server is VALID; each planted bug is found
with chaos mode's label."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from . import test_bearer_implicit, test_messages_server, test_tree_server
from .conftest import sessctl_cli

LOAD = ("load", "--users", "30", "--spawn-rate", "30", "--run-time", "4s", "--no-shrink")


async def _load(options: list[str], report: Path) -> tuple[int, str, dict[str, object]]:
    code, out = await sessctl_cli(*LOAD, *options, "--json", str(report))
    written = trio.Path(report)
    return code, out, json.loads(await written.read_text()) if await written.exists() else {}


async def test_a_bearer_server_that_makes_sessions_on_first_use(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    for fixed in (True, False):
        url, port = await test_bearer_implicit.start(nursery, fixed=fixed)
        options = ["--target", url, "--upstream-listen", f"127.0.0.1:{port}"]
        code, out, report = await _load(
            [*options, "--profile", "bearer-implicit"], tmp_path / f"{fixed}.json"
        )
        assert "Traceback" not in out
        if fixed:
            assert code == 0, out
            assert report["verdict"] == "valid"
        else:
            # A chat after the DELETE brings the session back.
            assert code == 1, out
            assert "resurrection after its DELETE" in out


async def test_a_tree_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    for fixed in (True, False):
        options = await test_tree_server.start(nursery, fixed=fixed)
        code, out, report = await _load(options, tmp_path / f"{fixed}.json")
        assert "Traceback" not in out
        if fixed:
            assert code == 0, out
        else:
            assert code == 1, out
            assert "in no branch" in out
            findings = report["findings"]
            assert isinstance(findings, list)
            assert {f["kind"] for f in findings} <= {"durability", "linearizability"}


async def test_an_anthropic_messages_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    # Its planted bug (a DELETE does not stop a streaming turn) lives only in streams:
    # with none, the history is valid; with Anthropic's events streamed, it is found.
    _, options = await test_messages_server.start(nursery)
    code, out, _ = await _load([*options, "--stream-ratio", "0"], tmp_path / "plain.json")
    assert code == 0, out
    code, out, report = await _load([*options, "--stream-ratio", "0.5"], tmp_path / "streams.json")
    assert code == 1, out
    findings = report["findings"]
    assert isinstance(findings, list)
    assert "llm-leak" in {f["kind"] for f in findings}
