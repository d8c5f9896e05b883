"""Load: ``sessctl load``, Locust's agents by the thousand, every session's history checked.

Owns two sides of a process line, because Locust runs on gevent (it
monkey-patches the process) and sessctl runs on trio:

* the Locust side, run in processes of its own (``python -m
  harness.load.locust_main``): the agents (``agent``: a session's life, its
  races, its history) and the master and workers (``locust_main``);
* the sessctl side (``run``): the chaos upstream and the embedded server,
  starting the Locust processes, checking the whole sessions as they arrive
  and the history at the end with chaos mode's checker, shrinking a failure.

``settings`` is what crosses the line: plain data, no I/O.

May import: the Locust side, Locust, gevent, ``harness.model``,
``harness.upstream.script``, ``harness.results``, ``harness.errors`` and the
parts of ``wire`` without trio, nothing that brings trio in
(``tests/test_layering.py``, and ``tests/test_load.py`` runs it); the sessctl
side, ``harness.chaos`` and everything below it, never the Locust side.
"""
