"""How the reference server moves bytes fast: the workarounds, apart from the spec.

Owns: ``hypercorn_compat`` (hypercorn kept to the contract and lean: its own
400/431 answers in the OpenAI shape, a client's disconnect delivered to the
turn, less memory per waiting connection), ``engine_http`` (HTTP/1.1 to the
engine on h11 and trio sockets) and ``socket_io`` (reads and writes on a
trio socket below trio's layers: what a waiting connection costs, and one
scheduler round per call at most). ``wire.listening``
(accepting connections in bursts) is the one piece shared with the chaos
upstream, so it lives in ``wire``.

May import: ``wire``, trio, h11, hypercorn. Never the rest of ``refserver``:
the specification (``app``, ``service``, ``upstream``, ``server``) uses the
transport, and reads the same whatever the transport does to be fast
(``tests/test_layering.py``).
"""
