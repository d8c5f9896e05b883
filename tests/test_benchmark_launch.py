"""The benchmarks find the processes they start by the line each announces; that
line changed once and two benchmarks read the wrong word as the upstream's URL."""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

# benchmarks/ is scripts, not a package: its helper module is found by path.
sessctl_process = import_module("common").sessctl_process


@pytest.mark.parametrize("collector", ["--defer-gc", "--python-gc"])
def test_the_benchmarks_read_the_upstream_and_server_urls_that_sessctl_announces(
    collector: str,
) -> None:
    # Both collector settings of ``sessctl serve`` (scale_bench compares them) serve.
    with sessctl_process(
        "upstream", "--listen", "127.0.0.1:0", url_prefix="chaos upstream"
    ) as upstream:
        assert upstream.url.startswith("http://127.0.0.1:")
        assert upstream.url.endswith("/v1")
        root = upstream.url.removesuffix("/v1")
        assert httpx.get(f"{root}/_sessctl/events").json()["events"] == []
        with sessctl_process(
            "serve", "--port", "0", "--upstream", upstream.url, collector,
            url_prefix="sessctl reference server on",
        ) as served:  # fmt: skip
            assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok"}
