"""A server that names sessions by bearer token and creates them on first use.

``tests/bearer_server.py`` under ``profiles/bearer-implicit.yaml``, through the
CLI: with its planted resurrection bug, the library FAILs only where that bug
shows, and chaos mode finds it; fixed (tombstones for deleted ids), the same
server gets no safety failure anywhere, and its chaos history is valid.
Creating sessions on first use, refusing streams and not finding a session
before its first turn are conventions: NON-STRICT, never FAIL, never ERROR.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import trio

from harness.model.profile import load_profile
from harness.run.checks import RESURRECTION
from refserver.server import serve_asgi

from .bearer_server import create_bearer_app
from .conftest import free_port, sessctl_cli

ALWAYS_CAUGHT = {"chat-and-get-after-delete", "no-resurrection-after-preempt"}
SOMETIMES_CAUGHT = {
    "chat-during-delete",  # its race is left free on purpose
    # The server reads a chat's body before it looks the session up. Whether the
    # queued chat got that far before the DELETE, the harness can only approximate
    # for a black box (round trips to settle it); under CI load it once had not,
    # and it recreated the deleted session: the planted bug, labelled as such.
    "chats-queued-then-delete",
}


async def start(nursery: trio.Nursery, *, fixed: bool) -> tuple[str, int]:
    port = free_port()
    app = create_bearer_app(f"http://127.0.0.1:{port}/v1", fixed=fixed)
    url: str = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
    return url, port


async def test_the_library_fails_exactly_where_sessions_come_back_after_delete(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    url, port = await start(nursery, fixed=False)
    report = tmp_path / "report.json"
    code, out = await sessctl_cli(
        "run-scenarios", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", "bearer-implicit", "--json", str(report),
    )  # fmt: skip
    assert code == 1, out
    assert "Traceback" not in out
    document = json.loads(report.read_text())
    assert document["summary"]["errors"] == 0
    verdicts = {s["name"]: s["verdict"] for s in document["scenarios"]}
    failed = {name for name, verdict in verdicts.items() if verdict == "fail"}
    assert ALWAYS_CAUGHT <= failed <= ALWAYS_CAUGHT | SOMETIMES_CAUGHT
    # Every failing run shows the planted bug itself, whatever else it also shows.
    for scenario in document["scenarios"]:
        for run in scenario["runs"]:
            if run["verdict"] == "fail":
                assert RESURRECTION in {f["label"] for f in run["failures"]}, scenario["name"]
    assert verdicts["chat-never-existed"] == "non-strict"  # made on first use: by design
    assert "sessions are created implicitly" in out


async def test_chaos_finds_the_resurrection_and_says_why_it_cannot_shrink_it(
    nursery: trio.Nursery,
) -> None:
    url, port = await start(nursery, fixed=False)
    code, out = await sessctl_cli(
        "chaos", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", "bearer-implicit", "--ops", "2000",
    )  # fmt: skip
    assert code == 1, out
    assert "resurrection after its DELETE" in out
    assert "not shrunk: the expected answers come from the reference server" in out


async def test_the_fixed_server_gets_no_safety_failure_and_a_valid_history(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    url, port = await start(nursery, fixed=True)
    listen = ["--upstream-listen", f"127.0.0.1:{port}", "--profile", "bearer-implicit"]
    code, out = await sessctl_cli("run-scenarios", "--target", url, *listen)
    assert code == 0, out
    assert "0 failed, 0 errors" in out
    code, out = await sessctl_cli("chaos", "--target", url, *listen, "--ops", "2000")
    assert code == 0, out
    assert "VALID" in out


async def test_profile_check_finds_the_bearer_token_and_creation_on_first_use(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    url, port = await start(nursery, fixed=True)
    written = tmp_path / "suggested.yaml"
    code, out = await sessctl_cli(
        "profile", "check", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--output", str(written),
    )  # fmt: skip
    assert code == 0, out
    assert "trying made-up ids" in out
    suggested = load_profile(str(written))
    expected = load_profile("bearer-implicit")
    assert suggested.model_dump(exclude={"name", "description", "chat_path"}) == (
        expected.model_dump(exclude={"name", "description", "chat_path"})
    )
    assert suggested.resolved_chat_path == expected.resolved_chat_path
