"""Chaos mode: seeded random workloads, their histories, the checker, shrinking.

Owns: the workload generator and its embedded server (``workload``), the
history format (``history``), the linearizability checker and invariants
(``linearizability``), a failing session as a replayable case (``case``: pure),
and the shrinking search (``shrink``, over ``ddmin``).

May import: ``harness.run``, ``harness.model``, ``harness.upstream``,
``harness.errors``, ``harness.results``, ``wire``, ``refserver`` (to embed it).
Never ``report``.
"""
