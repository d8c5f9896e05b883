"""The model: what to run and how to read the server under test; no I/O but files.

Owns: scenarios and their steps (``scenario``), loading them from YAML with
``file:line:col`` errors (``loader``), and target profiles, the conventions a
server declares (``profile``).

May import: ``harness.errors``, ``harness.results``, ``harness.upstream.script``
(scenario files name upstream behaviours and events), ``refserver``.
"""
