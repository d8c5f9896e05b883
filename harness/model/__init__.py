"""The model: what to run and how to read the server under test; no I/O but files.

Owns: scenarios and their steps (``scenario``; which steps set a race up and
which observe it), loading them from YAML with ``file:line:col`` errors
(``loader``), target profiles, the conventions a server declares (``profile``),
and messages as the checker compares them, whatever JSON a server sends back
(``messages``).

May import: ``harness.errors``, ``harness.results``, ``harness.upstream.script``
(scenario files name upstream behaviours and events), ``wire``.
"""
