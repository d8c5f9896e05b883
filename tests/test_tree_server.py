"""A server whose trajectories are trees, under ``profiles/tree-turns.yaml``.

``tests/tree_server.py`` through the CLI: with its planted bug (a sibling
committed during another turn's engine call is overwritten, so a 200 is in no
branch), the library FAILs only on concurrent writers, and chaos mode finds the
same bug in the history; fixed, the same server gets no safety failure and its
histories are valid. Branches where a linear server would answer 409, 410 for a
reclaimed session, and refused streams are conventions: never FAIL, never ERROR.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import trio

from harness.model.profile import load_profile
from refserver.server import serve_asgi

from .conftest import free_port, sessctl_cli
from .tree_server import create_tree_app

PLANTED = {"concurrent-writers-no-phantom"}


async def start(nursery: trio.Nursery, *, fixed: bool) -> list[str]:
    """The server, and the options that point sessctl at it under its profile."""
    port = free_port()
    app = create_tree_app(f"http://127.0.0.1:{port}/v1", fixed=fixed)
    url: str = await nursery.start(partial(serve_asgi, app, "127.0.0.1", 0))
    return ["--target", url, "--upstream-listen", f"127.0.0.1:{port}", "--profile", "tree-turns"]


async def test_the_library_fails_exactly_where_a_200_is_in_no_branch(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    target = await start(nursery, fixed=False)
    report = tmp_path / "report.json"
    code, out = await sessctl_cli("run-scenarios", *target, "--json", str(report))
    assert code == 1, out
    assert "Traceback" not in out
    document = json.loads(report.read_text())
    assert document["summary"]["errors"] == 0
    verdicts = {s["name"]: s["verdict"] for s in document["scenarios"]}
    assert {name for name, verdict in verdicts.items() if verdict == "fail"} == PLANTED
    failures = [
        f
        for s in document["scenarios"]
        for run in s["runs"]
        for f in run["failures"]
        if s["name"] in PLANTED
    ]
    assert {f["label"] for f in failures} == {"phantom commit"}
    assert any("in no branch" in f["actual"] for f in failures)
    # A stale first turn is a branch here, not a conflict: no finding at all.
    assert verdicts["stale-writer-gets-409"] == "pass"
    assert "the trajectory is a tree" in out


async def test_chaos_finds_the_turn_in_no_branch(nursery: trio.Nursery, tmp_path: Path) -> None:
    target = await start(nursery, fixed=False)
    code, out = await sessctl_cli(
        "chaos", *target, "--ops", "2000", "--out", str(tmp_path)
    )  # fmt: skip
    assert code == 1, out
    assert "in no branch" in out
    assert "not shrunk" in out
    assert "a tree trajectory" in out
    kinds = {f["kind"] for f in json.loads((tmp_path / "report.json").read_text())["findings"]}
    assert kinds <= {"durability", "linearizability"}, kinds
    # The saved history checks the same way, under the profile it was recorded with.
    history = str(tmp_path / "history.jsonl")
    code, out = await sessctl_cli("check", history, "--profile", "tree-turns")
    assert code == 1, out
    code, out = await sessctl_cli("check", history)
    assert code == 2, out
    assert "pass the --profile it was recorded with" in out


async def test_the_fixed_server_gets_no_safety_failure_and_valid_histories(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    target = await start(nursery, fixed=True)
    code, out = await sessctl_cli("run-scenarios", *target)
    assert code == 0, out
    assert "0 failed, 0 errors" in out
    for seed in ("1", "2"):
        out_dir = tmp_path / seed
        code, out = await sessctl_cli(
            "chaos", *target, "--ops", "2000", "--seed", seed, "--out", str(out_dir)
        )  # fmt: skip
        assert code == 0, out
        assert "VALID" in out
        reads = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]
        # Sibling branches were written, and the reads listed them.
        assert any(op["op"] == "get" and len(op.get("turns") or []) > 1 for op in reads)


async def test_profile_check_finds_the_tree_and_where_it_is_listed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    target = await start(nursery, fixed=True)
    written = tmp_path / "suggested.yaml"
    code, out = await sessctl_cli(
        "profile", "check", *target[:4], "--output", str(written)
    )  # fmt: skip
    assert code == 0, out
    assert "the trajectory is a tree" in out
    suggested = load_profile(str(written))
    expected = load_profile("tree-turns")
    assert suggested.model_dump(exclude={"name", "description"}) == expected.model_dump(
        exclude={"name", "description"}
    )
