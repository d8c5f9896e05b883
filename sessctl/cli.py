"""The ``sessctl`` command line: thin typer commands that forward to plain functions."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated

import trio
import typer
from rich.console import Console

from refserver import RunningServer, ServerConfig
from refserver.server import serve_until_signalled

app = typer.Typer(
    help="Race-test LLM session servers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@app.callback()
def _group() -> None:
    """Race-test LLM session servers: a reference server, a chaos upstream, a scenario harness."""


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Interface to bind; loopback unless told otherwise.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.")] = 8000,
    upstream: Annotated[
        str | None,
        typer.Option(
            help=(
                "OpenAI-compatible base URL of the LLM engine (POSTs go to "
                "URL/chat/completions). Without it, an embedded deterministic fake "
                "upstream is started."
            )
        ),
    ] = None,
    upstream_delay: Annotated[
        float, typer.Option(help="Delay of the embedded fake upstream, in seconds.")
    ] = 0.0,
    upstream_timeout: Annotated[
        float,
        typer.Option(help="Deadline of one turn's upstream call, retries included, in seconds."),
    ] = 300.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 8
    * 1024
    * 1024,
    grace_period: Annotated[
        float, typer.Option(help="Seconds to wait for requests on shutdown.")
    ] = 5.0,
) -> None:
    """Run the reference session server."""
    from refserver.app import HttpLimits

    logging.getLogger("refserver").addHandler(logging.StreamHandler())
    config = ServerConfig(
        host=host,
        port=port,
        upstream_url=upstream,
        upstream_delay=upstream_delay,
        upstream_timeout=upstream_timeout,
        limits=HttpLimits(max_body_bytes=max_body_bytes),
        grace_period=grace_period,
        log_requests=True,
    )

    def announce(running: RunningServer) -> None:
        upstream_note = "embedded fake" if running.upstream_is_embedded else "external"
        console.print(f"sessctl reference server on {running.url}")
        console.print(f"upstream ({upstream_note}): {running.upstream_url}")
        console.print(f"agents use {running.url}/sessions/{{id}}/v1 as their OpenAI base URL")

    bind_error = _run_trio(partial(serve_until_signalled, config, announce))
    if bind_error is not None:
        err_console.print(f"[red]error:[/red] cannot listen on {host}:{port}: {bind_error}")
        raise typer.Exit(3)


def _run_trio(entry: Callable[[], Awaitable[object]]) -> str | None:
    """Run a trio entry point; an OSError (a port in use, say) comes back as a message."""
    failure: str | None = None
    try:
        trio.run(entry)
    except* OSError as group:
        leaf = _first_leaf(group)
        failure = getattr(leaf, "strerror", None) or str(leaf)
    return failure


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def main() -> None:
    app()
