"""The reference server in a child process of its own.

When a load generator, the chaos upstream and the server share one trio
loop, they share one core; in a child process the server gets the other one
(``benchmarks/chaos_bench.py`` measures the difference).

``serve_in_child(config)`` runs ``python -m refserver.child CONFIG`` and
reports the child's URLs through ``task_status.started``, as ``serve`` does.
The child prints them as one JSON line once it listens. Cancelling stops the
child with SIGTERM, which it answers as the CLI server does: turns in flight
get 503 and nothing more is committed. The child also stops when its stdin
closes, so a parent killed with SIGKILL does not leave a server listening.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from functools import partial
from typing import Any

import trio

from .app import HttpLimits
from .errors import ChildServerFailed
from .server import RunningServer, ServerConfig, serve_until_signalled
from .upstream import RetryPolicy


def config_to_json(config: ServerConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> ServerConfig:
    fields: dict[str, Any] = json.loads(text)
    fields["retry"] = RetryPolicy(**fields["retry"])
    fields["limits"] = HttpLimits(**fields["limits"])
    return ServerConfig(**fields)


async def serve_in_child(
    config: ServerConfig, *, task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the server in a child process until cancelled; started() gives its URLs."""
    command = [sys.executable, "-m", "refserver.child", config_to_json(config)]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdin=subprocess.PIPE,  # held open, never written: EOF means we are gone
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        assert process.stdout is not None
        line = await _first_line(process.stdout)
        if line:
            task_status.started(RunningServer(**json.loads(line)))
        await process.wait()
    # Raised here, outside the nursery, so callers get it unwrapped.
    when = "while serving" if line else "before it listened"
    raise ChildServerFailed(f"the server process exited ({process.returncode}) {when}")


async def _first_line(stream: trio.abc.ReceiveStream) -> bytes:
    buffer = b""
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            return b""
        buffer += chunk
    return buffer.split(b"\n", 1)[0]


def _announce(running: RunningServer) -> None:
    print(json.dumps(dataclasses.asdict(running)), flush=True)


async def _serve_while_parent_lives(config: ServerConfig) -> None:
    async with trio.open_nursery() as nursery:

        async def serve_then_stop_watching() -> None:
            await serve_until_signalled(config, _announce)
            nursery.cancel_scope.cancel()

        nursery.start_soon(serve_then_stop_watching)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await stdin.receive_some():
            pass
        # The parent is gone: shut down as if it had sent SIGTERM.
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    config = config_from_json(sys.argv[1])
    try:
        trio.run(_serve_while_parent_lives, config)
    except* OSError as group:  # cannot bind: the parent reports that we exited unstarted
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        print(
            f"refserver.child: cannot listen on {config.host}:{config.port}: {error}",
            file=sys.stderr,
        )
        sys.exit(3)


if __name__ == "__main__":
    main()
