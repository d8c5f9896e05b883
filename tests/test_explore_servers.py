"""``sessctl explore`` through the CLI against servers written apart from the reference
(``tests/``), each under its profile, the full product: their planted defects found at
the cells where they live, and no finding on a clean build."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from refserver.server import serve_asgi

from .bearer_server import create_bearer_app
from .conftest import free_port, sessctl_cli
from .messages_server import create_messages_app
from .third_party_server import serve_third_party
from .tree_server import create_tree_app

Start = Callable[[trio.Nursery, str], Awaitable[str]]


def asgi(make: Callable[[str], Any]) -> Start:
    async def start(nursery: trio.Nursery, upstream: str) -> str:
        url: str = await nursery.start(partial(serve_asgi, make(upstream), "127.0.0.1", 0))
        return url

    return start


async def explore(
    nursery: trio.Nursery, tmp_path: Path, start: Start, profile: str, *extra: str
) -> tuple[int, dict[str, Any]]:
    port = free_port()
    url = await start(nursery, f"http://127.0.0.1:{port}/v1")
    report = tmp_path / "explore.json"
    code, out = await sessctl_cli(
        "explore", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", profile, "--json", str(report), "--no-shrink", "--parallel", "8", *extra,
    )  # fmt: skip
    assert "Traceback" not in out, out
    assert "internal error" not in out, out
    return code, json.loads(report.read_text())


def failed(document: dict[str, Any]) -> dict[str, str]:
    """Failed cell -> the kind of its first finding."""
    return {
        c["cell"]: c["findings"][0]["kind"] for c in document["cells"] if c["outcome"] == "failed"
    }


async def test_the_third_party_server_shows_its_three_planted_bugs_and_nothing_else(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async def third_party(nursery: trio.Nursery, upstream: str) -> str:
        url: str = await nursery.start(serve_third_party, upstream)
        return url

    code, document = await explore(
        nursery, tmp_path, third_party, "records-tool-400", "--flavor", "sglang"
    )
    assert code == 1
    found = failed(document)
    assert found["held/writer-same/text"] == "linearizability"  # phantom commit
    assert found["queued/delete/text"] == "linearizability"  # queued chats proceed
    assert found["held/delete/text"] == "llm-leak"  # the turn in flight is not preempted
    # Every failed cell is one of those races: a DELETE, or a second writer (in the
    # queued phase, the turn it queues behind is one already).
    racing = ("delete", "delete-twice", "writer-same", "writer-divergent", "retry")
    for cell in found:
        phase, interferer, _ = cell.split("/")
        assert interferer in racing or phase == "queued", cell


async def test_clean_builds_have_no_finding_in_any_cell(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    for name, start, profile in (
        ("tree", asgi(partial(create_tree_app, fixed=True)), "tree-turns"),
        ("bearer", asgi(partial(create_bearer_app, fixed=True)), "bearer-implicit"),
    ):
        code, document = await explore(nursery, tmp_path, start, profile)
        assert code == 0, (name, failed(document))
        assert document["summary"]["passed"] > 200, name


async def test_planted_defects_are_found_where_they_live(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    code, document = await explore(
        nursery, tmp_path, asgi(partial(create_tree_app, fixed=False)), "tree-turns"
    )
    assert code == 1
    assert set(failed(document)) >= {"held/writer-same/text"}
    # Its planted defect, a 200 in no branch, wherever two writers met, and only that.
    for cell in document["cells"]:
        if cell["outcome"] == "failed":
            assert "answered 200 but in no branch" in cell["why"], cell
    code, document = await explore(
        nursery, tmp_path, asgi(create_messages_app), "anthropic-messages"
    )
    assert code == 1
    # Its planted defect: a streamed turn a DELETE does not stop.
    assert set(failed(document).values()) == {"llm-leak"}
    assert all("stream" in cell and "delete" in cell for cell in failed(document))
