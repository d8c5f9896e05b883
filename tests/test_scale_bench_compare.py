"""``scale_bench.py``: ``--versus-peer`` names the better server per row (a row read the
wrong way round, turns/s where higher is better, would claim a lead it does not
have), and a sample at a level times the DELETE of a turn the engine holds."""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

import httpx
import pytest
import trio

from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind
from refserver.server import RunningServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

# benchmarks/ is scripts, not a package: found by path.
scale_bench = import_module("scale_bench")
Comparison = scale_bench.Comparison
Measured = scale_bench.Measured


def level(held: int, **figures: float) -> dict[str, float]:
    base = {"level": held, "reached_s": 10.0, "ramp_cpu_s": 5.0, "rss_mb": 100.0, "lost": 0}
    return {**base, **figures}


def test_a_cost_is_ahead_when_lower_and_a_rate_when_higher() -> None:
    assert Comparison("DELETE p99", ours=2.0, peer=3.0, unit="ms").verdict == "sessctl"
    assert Comparison("DELETE p99", ours=3.0, peer=2.0, unit="ms").verdict == "peer"
    turns = Comparison("turns/s", ours=60.0, peer=20.0, unit="/s", higher_is_better=True)
    assert turns.verdict == "sessctl"
    assert turns.ratio == 20.0 / 60.0


def test_figures_within_five_percent_are_even_on_either_side() -> None:
    assert Comparison("x", ours=100.0, peer=104.0, unit="ms").verdict == "even"
    assert Comparison("x", ours=104.0, peer=100.0, unit="ms").verdict == "even"
    assert Comparison("x", ours=100.0, peer=106.0, unit="ms").verdict == "sessctl"


def test_the_comparison_takes_each_level_and_the_churn_from_the_right_server() -> None:
    ours = Measured(
        "sessctl serve",
        idle_rss_mb=50.0,
        rows=[
            level(1, delete_p99=1.0),
            level(
                1000,
                delete_p99=2.0,
                rss_mb=86.0,
                churn_delete_p99=7.0,
                churn_turns_per_s=60.0,
                churn_cpu_ms_per_turn=4.0,
            ),
        ],
        met=True,
    )
    peer = Measured(
        "peer",
        idle_rss_mb=40.0,
        rows=[
            level(1, delete_p99=0.5),
            level(
                1000,
                delete_p99=3.0,
                rss_mb=90.0,
                reached_s=60.0,
                churn_delete_p99=400.0,
                churn_turns_per_s=20.0,
                churn_cpu_ms_per_turn=4.1,
            ),
        ],
        met=True,
    )
    rows = {row.row: row for row in scale_bench.compare(ours, peer)}
    assert rows["DELETE p99 at 1 held"].verdict == "peer"
    assert rows["DELETE p99 at 1000 held"].verdict == "sessctl"
    memory = rows["memory per held turn (RSS over idle)"]
    assert (memory.ours, memory.peer) == (1024 * 36 / 1000, 1024 * 50 / 1000)
    assert rows["time to reach the top level (1000 / 1000 held)"].verdict == "sessctl"
    assert rows["turns/s the churning agents got"].verdict == "sessctl"
    assert rows["server CPU per churning turn"].verdict == "even"
    assert rows["DELETE p99 with turns starting and ending"].ratio == 400.0 / 7.0


def test_the_verdict_line_lists_the_rows_the_peer_leads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [
        Comparison("DELETE p99 at 1 held", ours=2.0, peer=1.0, unit="ms"),
        Comparison("memory per held turn", ours=37.0, peer=48.0, unit="KB"),
        Comparison("turns/s", ours=60.0, peer=61.0, unit="/s", higher_is_better=True),
    ]
    assert scale_bench.print_comparison(rows) is False
    printed = capsys.readouterr().out
    assert "sessctl serve ahead on 1 of 3 rows, even on 1, behind on 1: DELETE p99 at 1 held" in (
        printed
    )
    assert scale_bench.print_comparison(rows[1:]) is True
    assert "behind on 0\n" in capsys.readouterr().out


async def test_a_sample_at_the_level_deletes_a_turn_the_engine_already_holds(
    server: RunningServer, chaos: ChaosUpstream
) -> None:
    """The timed DELETE goes once the upstream has received the sample's chat: a
    server says a turn is in flight before it sends the engine call, and a DELETE
    timed then is timed beside that work, not beside held turns alone."""
    tag = scale_bench.AT_LEVEL_TAG.format(level=1)
    received_at_delete: list[int] = []

    async def note(request: httpx.Request) -> None:
        if request.method == "DELETE":
            received_at_delete.append(chaos.count(tag, EventKind.RECEIVED))

    assert chaos.url is not None
    upstream = chaos.url.removesuffix("/v1")
    async with (
        httpx.AsyncClient(base_url=server.url, event_hooks={"request": [note]}) as control,
        httpx.AsyncClient(base_url=server.url) as agents,
    ):
        run = scale_bench.Level(control, [agents], upstream, tag)
        await control.post(f"{upstream}/_sessctl/steps/{tag}", json={"script": ["hold"]})
        samples = scale_bench.Samples()
        async with trio.open_nursery() as chats:
            for _ in range(3):
                await run.sample(chats, samples)
    assert received_at_delete == [1, 2, 3]
    assert len(samples.deletes) == len(samples.healthz) == 3
    assert [run.outcomes[session_id] for session_id in run.extras] == ["410"] * 3
