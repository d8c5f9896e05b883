"""The reference session server: the executable specification of docs/contract.md.

The decisions, with no I/O, are in ``wire``, which the harness reads too:
``wire.rules`` (turn validation), ``wire.streaming`` (assembling a streamed
answer, its commit point, the events), ``wire.protocol`` and ``wire.strictjson``
(what a request may be), ``wire.errors`` (every answer's error). Carrying them
out, here: ``service`` (locks, cancel scopes, commits), ``upstream`` (calling
the engine, retries), ``engine_http`` (HTTP/1.1 to the engine), ``app`` (HTTP),
``hypercorn_compat`` and ``server`` (hypercorn), ``socket_io`` (reading at
thousands of connections, beside ``wire.listening``), ``fake_upstream`` (the
embedded engine), ``variants`` (known-broken versions for the self-test),
``child`` (a server in a process of its own), ``errors`` (its own).
May import ``wire``; never the harness or the CLI.
"""

from .server import RunningServer, ServerConfig, serve

__all__ = ["RunningServer", "ServerConfig", "serve"]
