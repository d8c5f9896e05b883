"""Running and judging: scenarios against targets, one run at a time or a suite.

Owns: the HTTP client for the target (``client``, over its own HTTP/1.1
transport on h11, ``transport``: httpx's pool was most of the harness's CPU),
one scenario run
(``runner``) and what it learned (``context``), the judgement of a run
(``checks``: pure), many scenarios on many targets (``suite``), the self-test
against the known-broken variants (``selftest``), and ``profile check``
(``profile_probe``).

May import: ``harness.model``, ``harness.upstream``, ``harness.errors``,
``harness.results``, ``wire``, ``refserver`` (to embed it). Never ``chaos`` or
``report``.
"""
