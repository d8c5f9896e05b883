"""The reference session server: the executable specification of docs/contract.md.

The decisions, with no I/O, are in ``wire``, which the harness reads too:
``wire.rules`` (turn validation), ``wire.streaming`` (assembling a streamed
answer, its commit point, the events), ``wire.protocol`` and ``wire.strictjson``
(what a request may be), ``wire.errors`` (every answer's error). Carrying them
out, here: ``service`` (locks, cancel scopes, commits), ``upstream`` (calling
the engine, retries), ``app`` (HTTP), ``server`` (hypercorn, the engine
connections), ``fake_upstream`` (the embedded engine), ``variants``
(known-broken versions for the self-test), ``child`` (a server in a process of
its own), ``errors`` (its own).
What makes it fast at thousands of connections, and changes with measurement,
is apart in ``transport``: ``hypercorn_compat`` (hypercorn kept to the contract
and lean), ``engine_http`` (HTTP/1.1 to the engine), ``socket_io`` (reading
below trio's layers), beside ``wire.listening``. The transport never imports
the rest of the server.
May import ``wire``; never the harness or the CLI.
"""

from .server import RunningServer, ServerConfig, serve

__all__ = ["RunningServer", "ServerConfig", "serve"]
