"""A server where every call is a record (``tests/log_server.py``), through the CLI:
``profile check`` recognises it (trajectory model: log), the library on its
suggested profile finds its planted bug and nothing on the fixed build."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import trio

from refserver.server import serve_asgi

from .conftest import free_port, sessctl_cli
from .log_server import create_log_app


async def start(nursery: trio.Nursery, *, fixed: bool) -> tuple[str, int]:
    port = free_port()
    url: str = await nursery.start(
        partial(serve_asgi, create_log_app(f"http://127.0.0.1:{port}/v1", fixed=fixed),
                "127.0.0.1", 0)
    )  # fmt: skip
    return url, port


async def suggest(url: str, port: int, suggested: Path) -> str:
    """``sessctl profile check`` on the server, its suggestion written to ``suggested``."""
    code, out = await sessctl_cli(
        "profile", "check", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--output", str(suggested),
    )  # fmt: skip
    assert code == 0, out
    return out


async def test_profile_check_recognises_a_log_and_the_library_judges_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    url, port = await start(nursery, fixed=True)
    suggested = tmp_path / "log.yaml"
    out = await suggest(url, port, suggested)
    assert "every call is a record (trajectory model: log)" in out
    assert "model: log" in suggested.read_text()
    report = tmp_path / "r.json"
    code, out = await sessctl_cli(
        "run-scenarios", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", str(suggested), "--json", str(report),
    )  # fmt: skip
    assert code == 0, out
    summary = json.loads(report.read_text())["summary"]
    assert summary["failed"] == 0, out
    assert summary["errors"] == 0, out


async def test_a_retry_recorded_in_place_of_its_first_call_fails_by_its_cause(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    fixed_url, fixed_port = await start(nursery, fixed=True)
    suggested = tmp_path / "log.yaml"
    await suggest(fixed_url, fixed_port, suggested)
    url, port = await start(nursery, fixed=False)
    report = tmp_path / "r.json"
    code, out = await sessctl_cli(
        "run-scenarios", "--target", url, "--upstream-listen", f"127.0.0.1:{port}",
        "--profile", str(suggested), "--filter", "exact-retry-replays", "--json", str(report),
    )  # fmt: skip
    assert code == 1, out
    (scenario,) = json.loads(report.read_text())["scenarios"]
    labels = {f["label"] for run in scenario["runs"] for f in run["failures"]}
    assert "phantom commit" in labels, out
