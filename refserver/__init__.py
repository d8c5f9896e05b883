"""The reference session server: the executable specification of docs/contract.md.

The decisions, with no I/O: ``rules`` (session lifecycle, turn validation),
``streaming`` (assembling a streamed answer, its commit point, the events),
``protocol`` and ``strictjson`` (what a request may be). Carrying them out:
``service`` (locks, cancel scopes, commits), ``upstream`` (calling the engine,
retries), ``engine_http`` (HTTP/1.1 to the engine), ``app`` (HTTP),
``hypercorn_compat`` and ``server`` (hypercorn), ``listening`` and ``socket_io``
(accepting, and reading, at thousands of connections), ``errors`` (every
answer's error).
Never imports the harness.
"""

from .server import RunningServer, ServerConfig, serve

__all__ = ["RunningServer", "ServerConfig", "serve"]
