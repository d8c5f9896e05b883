"""sessctl load end to end, as a user runs it: Locust's master and workers in
processes of their own, the clean reference server VALID, a split lock caught
with chaos's label, a worker from "another machine", and the bad inputs."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .test_readme_commands import DOCS, quoted_block


def sessctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessctl", "load", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_clean_reference_server_is_valid_with_a_master_and_two_workers(
    tmp_path: Path,
) -> None:
    report = tmp_path / "out.json"
    out = tmp_path / "run"
    done = sessctl(
        *("--workers", "2", "--users", "200", "--spawn-rate", "100", "--run-time", "20s"),
        *("--json", str(report), "--out", str(out)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VALID" in done.stdout
    assert "requests (Locust's statistics)" in done.stdout
    # Headless, a progress line every 10 s: agents, requests, sessions checked, findings.
    progress = re.findall(
        r"^load \d+ s: [\d,]+ agents, [\d,]+ requests .+ findings$", done.stdout, re.M
    )
    assert len(progress) >= 2, done.stdout
    document = json.loads(report.read_text())
    assert document["verdict"] == "valid"
    assert document["findings"] == []
    # Both workers ran agents and sent their whole history before they quit.
    done_workers = document["locust"]["workers_done"]
    assert sorted(w["worker"] for w in done_workers) == [0, 1]
    assert sum(w["ops"] for w in done_workers) == document["operations"]
    # Every operation Locust counted is in the history (one request, one operation).
    assert document["locust"]["total"]["requests"] == document["operations"]
    # The races were set up, not only planned.
    races = document["races"]
    for race in ("second-writer", "delete-in-flight", "hangup"):
        assert races.get(f"placed:{race}", 0) > 10, races
    # The history is the one sessctl check reads, and agrees with.
    rechecked = subprocess.run(
        [sys.executable, "-m", "sessctl", "check", str(out / "history.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rechecked.returncode == 0, rechecked.stdout
    assert (out / "locust" / "stats.json").exists()


def test_a_split_lock_is_invalid_with_the_label_chaos_gives_it(tmp_path: Path) -> None:
    report = tmp_path / "out.json"
    done = sessctl(
        *("--workers", "2", "--users", "200", "--spawn-rate", "100", "--run-time", "10s"),
        *("--json", str(report), "--emulate", "split-lock", "--shrink-budget", "30"),
        *("--scenario-out", str(tmp_path / "shrunk.yaml")),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "INVALID" in done.stdout
    # docs/load.md quotes the first lines as they are printed.
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    quoted = quoted_block("checks these lines", DOCS / "load.md")
    assert printed[0] == quoted[0]
    assert quoted[1] in printed
    document = json.loads(report.read_text())
    assert document["verdict"] == "invalid"
    assert "linearizability" in {f["kind"] for f in document["findings"]}
    # The failure was shrunk to a scenario that fails on split-lock alone.
    assert document["shrunk"] is not None
    replay = subprocess.run(
        [sys.executable, "-m", "sessctl", "run-scenarios", str(tmp_path / "shrunk.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stdout  # the reference server passes it


def test_a_server_of_your_own_wired_to_an_upstream_of_its_own(tmp_path: Path) -> None:
    # As a user runs it against their server: the upstream, the server and the load
    # are three commands; the load reads the upstream's events over its control routes.
    from .conftest import HANG_GUARD, start_sessctl_serve

    port = _free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "sessctl", "upstream", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server, url = start_sessctl_serve(
        "--upstream", f"http://127.0.0.1:{port}/v1", "--emulate", "delete-waits",
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        report = tmp_path / "out.json"
        done = sessctl(
            *("--target", url, "--engine", f"http://127.0.0.1:{port}/v1"),
            *("--users", "30", "--run-time", "4s", "--mix", "chat=1,delete-in-flight=1"),
            *("--json", str(report)),
        )
    finally:
        for process in (server, upstream):
            process.terminate()
            process.wait(timeout=HANG_GUARD)
    assert done.returncode == 1, done.stdout + done.stderr
    document = json.loads(report.read_text())
    assert {f["kind"] for f in document["findings"]} == {"delete-waits"}
    # Shrinking replays against an upstream it scripts here; this one runs elsewhere.
    assert "the chaos upstream runs in another process" in document["shrink_skipped"]


class RoundRobin:
    """A TCP load balancer on loopback: each connection goes to the next of ``ports``."""

    def __init__(self, ports: list[int]) -> None:
        import itertools
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._next = itertools.cycle(ports)
        self.connections = dict.fromkeys(ports, 0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            port = next(self._next)
            self.connections[port] += 1
            upstream = socket.create_connection(("127.0.0.1", port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_several_upstreams_behind_a_balancer_are_one_engine(tmp_path: Path) -> None:
    # Where one chaos upstream is not enough: two, behind the user's balancer. The
    # workers script and release on both, count a step's calls over both, and the
    # master puts the second one's events on the first one's clock.
    from .conftest import HANG_GUARD, start_sessctl_serve

    ports = [_free_port(), _free_port()]
    upstreams: list[subprocess.Popen[bytes]] = [
        subprocess.Popen(
            [sys.executable, "-m", "sessctl", "upstream", "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    balancer = RoundRobin(ports)
    servers: list[subprocess.Popen[str]] = []
    try:
        engines = ",".join(f"http://127.0.0.1:{port}/v1" for port in ports)
        reports = {}
        for variant in ("", "delete-waits"):
            server, url = start_sessctl_serve(
                "--upstream", f"http://127.0.0.1:{balancer.port}/v1",
                *(("--emulate", variant) if variant else ()),
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            servers.append(server)
            report = tmp_path / f"{variant or 'clean'}.json"
            done = sessctl(
                *("--target", url, "--engine", engines, "--users", "40", "--run-time", "4s"),
                *("--json", str(report)),
            )
            reports[variant] = (done, json.loads(report.read_text()))
            server.terminate()
            server.wait(timeout=HANG_GUARD)
    finally:
        balancer.close()
        for process in servers:
            process.terminate()
            process.wait(timeout=HANG_GUARD)
        for upstream in upstreams:
            upstream.terminate()
            upstream.wait(timeout=HANG_GUARD)
    assert all(count > 0 for count in balancer.connections.values()), balancer.connections
    clean_run, clean = reports[""]
    assert clean_run.returncode == 0, clean_run.stdout + clean_run.stderr
    assert clean["verdict"] == "valid"
    assert clean["races"].get("placed:delete-in-flight", 0) > 0
    broken_run, broken = reports["delete-waits"]
    assert broken_run.returncode == 1, broken_run.stdout + broken_run.stderr
    assert {f["kind"] for f in broken["findings"]} == {"delete-waits"}


def test_a_real_engine_is_raced_by_timing_and_judged_without_its_events(
    tmp_path: Path,
) -> None:
    # A chaos upstream stands in for a real engine here, but nothing scripts or asks
    # it anything: what is judged needs no engine events (a second DELETE's 200 does).
    from .conftest import HANG_GUARD

    port = _free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "sessctl", "upstream", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        common = ("--engine", f"http://127.0.0.1:{port}/v1", "--real-engine", "--model", "m")
        clean = sessctl(*common, "--users", "30", "--run-time", "3s", "--json", str(tmp_path / "a"))
        broken = sessctl(
            *common, "--users", "30", "--run-time", "3s", "--emulate", "double-delete-ok",
            "--json", str(tmp_path / "b"),
        )  # fmt: skip
    finally:
        engine.terminate()
        engine.wait(timeout=HANG_GUARD)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    valid = json.loads((tmp_path / "a").read_text())
    assert valid["verdict"] == "valid"
    # Every request Locust counted is an operation, the hung-up ones included.
    assert valid["locust"]["total"]["requests"] == valid["operations"]
    assert broken.returncode == 1, broken.stdout + broken.stderr
    invalid = json.loads((tmp_path / "b").read_text())
    assert "success-after-delete" in {f["kind"] for f in invalid["findings"]}
    assert invalid["shrink_skipped"] == "not shrunk: a real engine cannot be scripted to replay it"


def _page(url: str, attempts: int = 300) -> int:
    """The status of a page that may not be served yet (tried every 0.1 s, 30 s at most)."""
    import time
    import urllib.request

    for _ in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status: int = response.status
                return status
        except OSError:
            time.sleep(0.1)
    return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_a_worker_started_on_its_own_joins_a_master(tmp_path: Path) -> None:
    # As on two machines: the master waits; a worker is given only its address.
    port, web = _free_port(), _free_port()
    report = tmp_path / "out.json"
    master = subprocess.Popen(
        [
            sys.executable,
            *("-m", "sessctl", "load", "--master", "--expect-workers", "1"),
            *("--master-bind", f"127.0.0.1:{port}", "--users", "20", "--run-time", "4s"),
            *("--json", str(report), "--csv", str(tmp_path / "locust")),
            *("--html", str(tmp_path / "locust.html"), "--web", f"127.0.0.1:{web}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Locust's web UI is up while the master waits for its worker.
    assert _page(f"http://127.0.0.1:{web}/") == 200
    worker = subprocess.Popen(
        [
            sys.executable,
            *("-m", "sessctl", "load", "--worker", "--master-host", "127.0.0.1"),
            *("--master-port", str(port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        output, _ = master.communicate(timeout=120)
        assert worker.wait(timeout=60) == 0
    finally:
        master.kill()
        worker.kill()
    assert master.returncode == 0, output
    assert "waiting for 1 worker(s) to connect" in output
    document = json.loads(report.read_text())
    assert document["verdict"] == "valid"
    assert document["run"]["workers"] == 1
    assert document["operations"] > 0
    # Locust's own reports, as Locust writes them.
    assert (tmp_path / "locust_stats.csv").read_text().startswith("Type,Name,Request Count")
    assert "<html" in (tmp_path / "locust.html").read_text().lower()


def test_agents_cut_off_at_the_end_leave_a_valid_history(tmp_path: Path) -> None:
    # --stop-timeout 0: every agent is stopped mid-session; what it had in flight is
    # recorded with an unknown outcome, and no false finding follows from it.
    report = tmp_path / "out.json"
    done = sessctl(
        *("--users", "30", "--run-time", "3s", "--stop-timeout", "0", "--no-shrink"),
        *("--json", str(report)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(report.read_text())["verdict"] == "valid"


def test_a_master_whose_workers_never_come_says_so(tmp_path: Path) -> None:
    done = sessctl(
        *("--master", "--expect-workers", "1", "--worker-wait", "2"),
        *("--master-bind", f"127.0.0.1:{_free_port()}", "--run-time", "2s"),
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "0 of 1 workers connected" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--run-time", "soon"), "--run-time 'soon': expected a duration"),
        (("--mix", "chat=1,sing=2"), "--mix: 'sing=2' is not NAME=WEIGHT"),
        (("--mix", "chat=0"), "at least one kind of turn"),
        (("--turns", "5-2"), "--turns '5-2'"),
        (("--worker",), "--worker needs --master-host"),
        (("--master",), "--master with no local --workers needs --expect-workers"),
        (("--users", "0"), "--users must be at least 1"),
        (("--engine", "ftp://x"), "--engine 'ftp://x'"),
        (("--real-engine",), "--real-engine needs --engine"),
        (("--master", "--expect-workers", "2"), "workers on other machines need a server"),
        (("--engine", "http://a:1/v1,http://b:2/v1"), "several --engine addresses"),
        (("--emulate", "nonesuch"), "nonesuch"),
    ],
)
def test_bad_options_are_named(args: tuple[str, ...], message: str) -> None:
    done = sessctl(*args, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_locust_side_never_imports_trio() -> None:
    # Locust monkey-patches the process with gevent; trio must not share it.
    probe = (
        "import sys, harness.load.locust_main, harness.load.agent; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'trio', 'httpx', 'hypercorn'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
