"""sessctl as a pytest plugin: the race library as test items, and fixtures for a
team's own tests. Registered in the ``pytest11`` entry-point group, so installing
sessctl is enough.

The library, one item per scenario and target::

    pytest --sessctl-target http://127.0.0.1:8000 --sessctl-profile records-tool-400

Items pass, fail with the scenario's rendered matrix and findings, or are skipped
with their reason (NON-STRICT conventions, UNTESTED races); ``--sessctl-strict``
fails those too. The target must use the chaos upstream this run starts
(``--sessctl-upstream-listen``, 127.0.0.1:8900 by default) as its LLM engine.
The other ``run-scenarios`` options are here with a ``--sessctl-`` prefix.

Fixtures, for tests of one's own (sync tests call them directly; an async test
calls the blocking ones in a worker thread: ``await trio.to_thread.run_sync(...)``
or ``await asyncio.to_thread(...)``):

* ``sessctl_upstream``: the chaos upstream, served from a thread of its own, with
  its scripts and holds: ``script(tag, "hold")``, ``release(tag)``,
  ``wait_for(tag, "received")``, ``calls(tag)``, ``marker(tag)``, ``url``;
* ``sessctl_reference``: the reference server's URL, in a child process, wired
  to ``sessctl_upstream``;
* ``sessctl_run``: ``sessctl_run(url, scenario, profile=None)`` runs one
  scenario (a file, or YAML text) against a server wired to ``sessctl_upstream``
  and returns its ``ScenarioResult``.

What this module imports at start-up is only pytest's: the harness is loaded
when a fixture or an item first needs it, so every pytest run in an environment
with sessctl installed stays as fast as before.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    import trio

    from harness.results import ScenarioResult, SuiteResult
    from harness.upstream.chaos_upstream import ChaosUpstream
    from harness.upstream.script import StepEvent

Result = TypeVar("Result")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sessctl", "race-test an LLM session server with sessctl's library")
    group.addoption(
        "--sessctl-target",
        action="append",
        default=[],
        metavar="URL",
        help="A server to run the library against (URL or NAME=URL); repeatable. "
        "Each scenario on each target is a test item.",
    )
    group.addoption("--sessctl-profile", metavar="PROFILE", help="How the target differs.")
    group.addoption(
        "--sessctl-upstream-listen",
        metavar="HOST:PORT",
        help="Where the chaos upstream listens (default 127.0.0.1:8900).",
    )
    group.addoption("--sessctl-flavor", default="openai", metavar="FLAVOR")
    group.addoption("--sessctl-filter", metavar="GLOB[,GLOB]", help="Only these scenarios.")
    group.addoption("--sessctl-exclude", metavar="GLOB[,GLOB]", help="Skip these scenarios.")
    group.addoption(
        "--sessctl-scenarios",
        action="append",
        default=[],
        metavar="PATH",
        help="Scenario files or folders (default: the built-in library).",
    )
    group.addoption("--sessctl-request-timeout", type=float, default=10.0, metavar="SECONDS")
    group.addoption(
        "--sessctl-strict",
        action="store_true",
        help="NON-STRICT conventions and UNTESTED races fail their items too.",
    )


# -- the library as items ---------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect among them
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if not config.getoption("sessctl_target"):
        return
    library = SessctlLibrary.from_parent(session, name="sessctl")
    items.extend(library.items())


class ScenarioFailed(Exception):
    """A scenario FAILed (or ERRORed) on a target: its rendered report."""


class SessctlLibrary(pytest.Collector):
    """Every selected scenario on every target; the whole run happens once, at the
    first item that runs, as ``sessctl run-scenarios`` would run it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._suite: SuiteResult | None = None

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        return list(self.items())

    def items(self) -> Iterator[ScenarioItem]:
        from harness.errors import HarnessError
        from sessctl.run import plan_suite

        try:
            self._plan = plan_suite(self.options())
        except HarnessError as problem:
            raise pytest.UsageError(f"sessctl: {problem}") from None
        for target in self._plan.targets:
            for scenario in self._plan.scenarios:
                yield ScenarioItem.from_parent(
                    self, name=f"{scenario.name}[{target.name}]", scenario=scenario.name,
                    target=target.name,
                )  # fmt: skip

    def options(self) -> Any:
        from sessctl.run import RunOptions

        option = self.config.getoption
        return RunOptions(
            paths=[str(p) for p in option("sessctl_scenarios")],
            targets=list(option("sessctl_target")),
            upstream_listen=option("sessctl_upstream_listen"),
            flavor=option("sessctl_flavor"),
            name_filter=option("sessctl_filter"),
            exclude=option("sessctl_exclude"),
            request_timeout=option("sessctl_request_timeout"),
            profile=option("sessctl_profile"),
            strict=option("sessctl_strict"),
        )

    def suite(self) -> SuiteResult:
        """The library's results, run at the first call (only the selected items' scenarios)."""
        if self._suite is None:
            from harness.run.suite import run_suite

            wanted = {i.scenario for i in self.session.items if isinstance(i, ScenarioItem)}
            scenarios = [s for s in self._plan.scenarios if s.name in wanted]
            plan = self._plan
            self._suite = _in_a_thread(
                lambda: _trio_run(run_suite, scenarios, plan.targets, plan.settings)
            )
        return self._suite


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario: str, target: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario
        self.target = target

    def runtest(self) -> None:
        from harness.results import Verdict

        assert isinstance(self.parent, SessctlLibrary)
        suite = self.parent.suite()
        if self.target in suite.unreachable:
            raise ScenarioFailed(f"{self.target}: {suite.unreachable[self.target]}")
        (result,) = [
            s for s in suite.scenarios if s.name == self.scenario and s.target == self.target
        ]
        strict = self.config.getoption("sessctl_strict")
        verdict = result.verdict
        if verdict is Verdict.PASS:
            return
        if verdict in (Verdict.NON_STRICT, Verdict.UNTESTED) and not strict:
            pytest.skip(_skip_reason(result))
        raise ScenarioFailed(_rendered(result, self.parent._plan.targets))

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None
    ) -> str | Any:
        if isinstance(excinfo.value, ScenarioFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path | str, int | None, str]:
        return "sessctl", None, f"{self.scenario} on {self.target}"


def _skip_reason(result: ScenarioResult) -> str:
    from harness.results import Kind, Verdict

    if result.verdict is Verdict.UNTESTED:
        cause = result.untested_because
        return f"not tested: {cause.actual if cause else 'the race was never placed'}"
    run = result.first_problem_run
    labels = sorted({f.label for f in run.failures if f.kind is Kind.CONVENTION}) if run else []
    return "NON-STRICT: " + "; ".join(labels)


def _rendered(result: ScenarioResult, targets: Any) -> str:
    from rich.console import Console

    from harness.report.console import render_scenario

    by_name = {t.name: t for t in targets}
    console = Console(file=StringIO(), width=120, no_color=True, highlight=False)
    render_scenario(console, result, by_name.get(result.target))
    file = console.file
    assert isinstance(file, StringIO)
    return file.getvalue()


# -- fixtures ---------------------------------------------------------------------------


class SessctlUpstream:
    """The chaos upstream in a thread of its own (its own trio loop), driven from
    any test: the server under test must run elsewhere (a process, another thread,
    another loop), since the blocking calls here wait on it."""

    chaos: ChaosUpstream
    """Set by the upstream's own thread once it serves."""
    _token: trio.lowlevel.TrioToken
    _nursery: trio.Nursery

    def __init__(self, flavor: str = "openai") -> None:
        self._ready = threading.Event()
        self._flavor = flavor
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="sessctl-upstream", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        self.url: str = self.chaos.url or ""
        """The OpenAI base URL a server under test gets as its engine (``.../v1``)."""

    def _serve(self) -> None:
        import trio

        from harness.upstream.chaos_upstream import ChaosUpstream

        async def main() -> None:
            self.chaos = ChaosUpstream(self._flavor)  # type: ignore[arg-type]
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.chaos.serve)
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as failure:  # reported to the fixture's caller
            self._failure = failure
            self._ready.set()

    def call(self, function: Callable[..., Awaitable[Result]], *args: Any) -> Result:
        """Run ``await function(*args)`` on the upstream's loop, from another thread."""
        import trio

        return trio.from_thread.run(function, *args, trio_token=self._token)

    def _sync(self, function: Callable[..., Result], *args: Any) -> Result:
        import trio

        return trio.from_thread.run_sync(function, *args, trio_token=self._token)

    def marker(self, tag: str) -> str:
        """The text to put in a chat's last message so the upstream plays ``tag``'s script."""
        from harness.upstream.script import marker

        return marker(tag)

    def script(self, tag: str, *behaviours: Any) -> None:
        """What the engine does with each call for ``tag``: ``"hold"``, ``{"status": 503}``..."""
        from harness.upstream.script import parse_behaviour

        parsed = [parse_behaviour(b) for b in behaviours]
        self._sync(self.chaos.script, tag, parsed)

    def release(self, tag: str) -> None:
        self._sync(self.chaos.release, tag)

    def calls(self, tag: str) -> int:
        return self._sync(self.chaos.calls, tag)

    def events(self, tag: str) -> list[StepEvent]:
        return self._sync(self.chaos.events, tag)

    def wait_for(self, tag: str, kind: str, count: int = 1, timeout: float = 10.0) -> None:
        """Block until ``count`` events of ``kind`` (received, answered, cancelled,
        dropped, sent) were recorded for ``tag``; TimeoutError after ``timeout`` s."""
        import trio

        from harness.upstream.script import EventKind

        async def wait() -> None:
            with trio.fail_after(timeout):
                await self.chaos.wait_for(tag, EventKind(kind), count)

        try:
            self.call(wait)
        except trio.TooSlowError:
            raise TimeoutError(f"no {count} {kind} event(s) for {tag} in {timeout:g} s") from None

    def start_reference(self) -> str:
        """The reference server in a child process, wired to this upstream; its URL."""
        from refserver.child import serve_in_child
        from refserver.server import ServerConfig

        async def start() -> str:
            config = ServerConfig(port=0, upstream_url=self.url)
            running = await self._nursery.start(serve_in_child, config)
            return str(running.url)

        return self.call(start)

    def run(self, url: str, scenario: str | Path, profile: str | None = None) -> ScenarioResult:
        """One scenario (a file, or YAML text) against the server at ``url``, which
        must use this upstream as its engine."""
        from harness.model.loader import load_file, parse_scenario
        from harness.model.profile import load_profile
        from harness.run.runner import RunSettings
        from harness.run.suite import SuiteSettings, Target, run_suite

        loaded = (
            load_file(scenario)
            if isinstance(scenario, Path)
            else parse_scenario(scenario, "<yaml text>")
        )
        settings = SuiteSettings(
            concurrency=1, target_wait=30.0, run=RunSettings(profile=load_profile(profile))
        )

        async def run() -> SuiteResult:
            return await run_suite([loaded], [Target("target", url)], settings, chaos=self.chaos)

        suite = self.call(run)
        if suite.unreachable:
            raise RuntimeError(f"sessctl: {suite.unreachable['target']}")
        return suite.scenarios[0]

    def close(self) -> None:
        if self._failure is None:
            self._sync(self._nursery.cancel_scope.cancel)
        self._thread.join()


@pytest.fixture(scope="session")
def sessctl_upstream() -> Iterator[SessctlUpstream]:
    upstream = SessctlUpstream()
    try:
        yield upstream
    finally:
        upstream.close()


@pytest.fixture(scope="session")
def sessctl_reference(sessctl_upstream: SessctlUpstream) -> str:
    """The reference server's URL (a child process, its engine ``sessctl_upstream``)."""
    return sessctl_upstream.start_reference()


@pytest.fixture
def sessctl_run(
    sessctl_upstream: SessctlUpstream,
) -> Callable[..., ScenarioResult]:
    """``sessctl_run(url, scenario, profile=None)``: one scenario's result."""
    return sessctl_upstream.run


def _trio_run(function: Callable[..., Awaitable[Result]], *args: Any) -> Result:
    import trio

    return trio.run(function, *args)


def _in_a_thread(work: Callable[[], Result]) -> Result:
    """``work()`` in a thread of its own: a trio loop may already run in this one."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as failure:
            outcome.append((False, failure))

    thread = threading.Thread(target=target, name="sessctl-library")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
