"""Exploration: every interfering request at every phase of a turn, under every
engine behaviour, each run as a small deterministic history and checked.

Owns: the cells and which apply to a profile (``cells``: pure), running one
cell (``driver``), and running them all against a target (``explore``).

May import: ``harness.chaos`` (its history, checker and shrinking judge each
cell), ``harness.run``, ``harness.model``, ``harness.upstream``,
``harness.errors``, ``harness.results``, ``wire``, ``refserver`` (to embed it).
Never ``report``.
"""
