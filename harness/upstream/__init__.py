"""The upstream: a scriptable, OpenAI-compatible LLM engine for forcing races.

Owns: the script language (``script``: markers, behaviours, events; no I/O),
the engine that plays scripts and records events (``chaos_upstream``), and the
raw HTTP/1.1 server under it (``http11``: h11 over trio sockets, because ASGI
can neither reset a connection nor see the moment a held call is hung up on).

May import: ``harness.errors``, ``wire``. Nothing else of the harness.
"""
