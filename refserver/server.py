"""Running the reference server: hypercorn on trio, plus the embedded upstream.

``serve`` is the long-running entry point; it reports the bound URLs through
``task_status.started`` so callers (tests, the harness, the CLI) can bind
port 0 and learn the port.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from starlette.types import ASGIApp

from wire.protocol import ChatRequest, parse_chat_request

from .app import HttpLimits, ServerBoundary, create_app
from .collector import CHECK_EVERY, COLLECTOR
from .fake_upstream import create_fake_upstream_app
from .service import SessionService
from .transport import hypercorn_compat
from .transport.engine_http import EngineConnections
from .transport.hypercorn_compat import ProtocolLimits
from .upstream import HttpUpstream, RetryPolicy
from .variants import VARIANTS

logger = logging.getLogger("refserver")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    upstream_url: str | None = None
    """OpenAI-compatible base URL; None starts the embedded fake upstream."""
    upstream_delay: float = 0.0
    """Delay of the embedded fake upstream, in seconds."""
    upstream_timeout: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    limits: HttpLimits = field(default_factory=HttpLimits)
    grace_period: float = 5.0
    log_requests: bool = False
    """Log to stderr: hypercorn's errors, the server's own, and (``access_log``) requests."""
    access_log: bool = True
    """With ``log_requests``: one line per request, too."""
    emulate: str | None = None
    """A known-broken variant from refserver.variants, for self-tests and demos."""
    defer_gc: bool = False
    """Full garbage collections only in a lull (``collector``), not on CPython's
    schedule (over a second's pause each at 10,000 turns held). ``sessctl serve``
    sets it; a server embedded in another program's process (the harness, the
    tests) leaves that process's collector alone."""


@dataclass(frozen=True)
class RunningServer:
    url: str
    upstream_url: str
    upstream_is_embedded: bool


def _hypercorn_config(
    host: str, port: int, *, log_errors: bool, grace: float, limits: HttpLimits | None
) -> HypercornConfig:
    config = hypercorn_compat.LeanConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace
    config.keep_alive_timeout = AGENT_KEEPALIVE
    if limits is not None:
        # hypercorn's default backlog of 100 overflowed under thousands of agents
        # connecting at once; the kernel caps it at net.core.somaxconn.
        config.backlog = max(config.backlog, limits.max_turns_in_flight)
    # The access log is the app's own (one line per request, with its id):
    # hypercorn's logs a request twice when its client closes mid-answer.
    config.accesslog = None
    config.errorlog = "-" if log_errors else None
    if limits is not None:
        hypercorn_compat.enable(config, ProtocolLimits(max_body_bytes=limits.max_body_bytes))
    return config


async def serve_asgi(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], object] | None = None,
    log_errors: bool = False,
    grace_period: float = 5.0,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve any ASGI app with hypercorn's trio worker; started() gives its base URL.

    With ``limits``, hypercorn's own answers keep the contract too (see
    ``hypercorn_compat``); the reference server passes them, plain test apps do not.
    """
    config = _hypercorn_config(host, port, log_errors=log_errors, grace=grace_period, limits=limits)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(
                hypercorn_compat.serve,
                app,
                config,
                shutdown_trigger=shutdown_trigger,  # type: ignore[arg-type]
            )
        )
        task_status.started(binds[0])


async def serve(
    config: ServerConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until ``shutdown`` is set; in-flight turns then answer 503 and commit nothing."""
    if shutdown is None:
        shutdown = trio.Event()
    with contextlib.ExitStack() as on_exit:
        async with trio.open_nursery() as nursery:
            upstream_url = config.upstream_url
            if upstream_url is None:
                fake = create_fake_upstream_app(delay=config.upstream_delay)
                upstream_url = (
                    await nursery.start(partial(serve_asgi, fake, "127.0.0.1", 0)) + "/v1"
                )
            # Every admitted turn may open its own connection to the engine, so no
            # turn waits for one; the deadline of a whole turn is the upstream's own.
            engine = EngineConnections(upstream_url, keepalive=UPSTREAM_KEEPALIVE)
            on_exit.callback(engine.close)  # after the server's last turn

            service_class: type[SessionService] = SessionService
            retry = config.retry
            parse: Callable[[bytes], ChatRequest] = parse_chat_request
            if config.emulate is not None:
                variant = VARIANTS[config.emulate]
                service_class, retry = variant.service, variant.retry or retry
                parse = variant.parse or parse
            upstream = HttpUpstream(engine, timeout=config.upstream_timeout, retry=retry)
            service = service_class(upstream)

            async def shutdown_trigger() -> None:
                await shutdown.wait()
                service.shutdown()

            app = create_app(
                service,
                config.limits,
                access_log=config.log_requests and config.access_log,
                parse=parse,
            )
            if config.defer_gc:
                COLLECTOR.install()
                on_exit.callback(COLLECTOR.uninstall)
                nursery.start_soon(_collect, app)

            async def run_session_server(task_status: trio.TaskStatus[str]) -> None:
                await serve_asgi(
                    app,
                    config.host,
                    config.port,
                    shutdown_trigger=shutdown_trigger,
                    log_errors=config.log_requests,
                    grace_period=config.grace_period,
                    limits=config.limits,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # the embedded upstream goes with us

            url = await nursery.start(run_session_server)
            task_status.started(
                RunningServer(url, upstream_url, upstream_is_embedded=config.upstream_url is None)
            )


async def _collect(app: ServerBoundary) -> None:
    """The collector's checks, for as long as the server runs (``collector``). Idle
    is a lull: no request in flight, and none begun since the last check."""
    started = app.requests_started
    while True:
        await trio.sleep(CHECK_EVERY)
        lull = app.requests_in_flight == 0 and app.requests_started == started
        started = app.requests_started
        in_flight = app.turns_in_flight
        paused = trio.current_time()
        checked = COLLECTOR.check(in_flight, idle=lull)
        if checked.thawed:
            # A pause for every request: rare and said, so an operator can see it.
            logger.log(
                logging.WARNING if checked.forced else logging.INFO,
                "garbage collection (%s, %d turns in flight): %d objects kept, %.0f ms",
                "forced: frozen objects past their bound" if checked.forced else "in a lull",
                in_flight,
                COLLECTOR.kept_at_thaw,
                1000 * (trio.current_time() - paused),
            )


AGENT_KEEPALIVE = 75.0
"""Seconds an agent's idle connection is kept (nginx's default; hypercorn's is 5 s).
Longer than an HTTP client's own expiry (httpx and the OpenAI SDK keep 5 s), so the
client, not the server, ends an idle connection, and never while it sends on it. With 5 s,
under thousands of agents connecting at once, hundreds of held turns of
``benchmarks/scale_bench.py`` lost their connection this way."""

TURNS_WANTED = 10_000
"""What a trainer running thousands of agents needs in flight at once."""

UPSTREAM_KEEPALIVE = 256
"""Idle connections to the engine kept open for reuse."""

RESERVED_DESCRIPTORS = 64 + UPSTREAM_KEEPALIVE
"""Descriptors kept for everything but turns in flight: listeners, logs, the embedded
upstream, and the idle engine connections kept alive (without them, a server at its
limit ran out of descriptors once earlier turns' connections idled)."""


def default_max_turns_in_flight() -> int:
    """10,000, or as many as the open-file limit allows (two descriptors a turn)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return TURNS_WANTED
    return max(1, min(TURNS_WANTED, (soft - RESERVED_DESCRIPTORS) // 2))


def capacity_hints(max_turns_in_flight: int) -> list[str]:
    """What this machine's limits say about admitting ``max_turns_in_flight`` turns."""
    hints: list[str] = []
    wanted = 2 * max_turns_in_flight  # the agent's connection and the upstream's
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + RESERVED_DESCRIPTORS:
        hints.append(
            f"the open-file limit (ulimit -n) is {soft}, below the {wanted} descriptors "
            f"{max_turns_in_flight} turns in flight need (one connection from the agent, one "
            f"to the engine, each): turns past about {(soft - RESERVED_DESCRIPTORS) // 2} will "
            f"fail; raise it (ulimit -n {wanted + 1024}) or lower --max-turns-in-flight"
        )
    elif soft != resource.RLIM_INFINITY and max_turns_in_flight < TURNS_WANTED:
        hints.append(
            f"admitting {max_turns_in_flight} turns in flight (503 server_busy past that): "
            f"the open-file limit (ulimit -n) is {soft}; raise it to "
            f"{2 * TURNS_WANTED + 1024} to admit {TURNS_WANTED}"
        )
    somaxconn = _read_int(SOMAXCONN)
    # Every admitted turn may be an agent connecting at once. With 4096 here,
    # benchmarks/scale_bench.py lost 60 and 158 of 9,790 turns so (502s and resets);
    # with 16384, none.
    if somaxconn is not None and somaxconn < max_turns_in_flight:
        hints.append(
            f"the kernel caps listen backlogs at {somaxconn} (net.core.somaxconn), below the "
            f"{max_turns_in_flight} turns admitted: a burst of more new connections than that "
            f"may be refused or reset before they are accepted (the engine's connections too, "
            f"if it runs here); raise it (sysctl -w net.core.somaxconn={max_turns_in_flight})"
        )
    return hints


SOMAXCONN = "/proc/sys/net/core/somaxconn"


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


async def serve_until_signalled(
    config: ServerConfig, on_started: Callable[[RunningServer], None]
) -> None:
    """The CLI's entry point: serve until SIGINT or SIGTERM, then shut down gracefully."""
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(partial(serve, config, shutdown=shutdown))
            on_started(running)

            async def wait_for_signal() -> None:
                async for _ in signals:
                    shutdown.set()
                    return

            nursery.start_soon(wait_for_signal)
            # When serve() returns the nursery still waits for wait_for_signal,
            # which is fine: serve() only returns after a signal.
