"""docs/github-actions.yml's commands, run as the workflow runs them, with the reference
server as "your server" (its SERVER_COMMAND), on ports of this run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "docs" / "github-actions.yml"


def _step(workflow: dict[str, object], name: str) -> str:
    steps = workflow["jobs"]["races"]["steps"]  # type: ignore[index]
    (run,) = [s["run"] for s in steps if s.get("name") == name]
    return str(run)


def test_the_workflow_starts_a_server_and_races_it_as_written(tmp_path: Path) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    server_port, upstream_port = str(free_port()), str(free_port())

    def here(command: str) -> str:
        return command.replace(":8000", f":{server_port}").replace(":8900", f":{upstream_port}")

    start = here(_step(workflow, "Start your server, its LLM engine the chaos upstream"))
    race = here(_step(workflow, "Race it"))
    (tmp_path / "sessctl-profile.yaml").write_text((ROOT / "profiles/reference.yaml").read_text())
    # The reference server as "your server": it reads its engine URL from LLM_BASE_URL.
    server = tmp_path / "my-server"
    server.write_text(
        f'#!/bin/sh\nexec sessctl serve --port {server_port} --upstream "$LLM_BASE_URL"\n'
    )
    server.chmod(0o755)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "NO_COLOR": "1",
        "SERVER_COMMAND": "./my-server",
    }
    subprocess.run(
        ["bash", "-c", f"{start} echo $! > server.pid"], cwd=tmp_path, env=env, timeout=30,
        check=True,
    )  # fmt: skip
    pid = int((tmp_path / "server.pid").read_text())
    try:
        raced = subprocess.run(
            ["bash", "-c", race], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        os.kill(pid, signal.SIGINT)
    assert raced.returncode == 0, raced.stdout + raced.stderr
    summary = json.loads((tmp_path / "sessctl.json").read_text())["summary"]
    assert summary["failed"] == 0
    assert (tmp_path / "sessctl.xml").read_text().startswith("<?xml")
    assert "sessctl" in (tmp_path / "sessctl.md").read_text()
