"""The harness: everything that tests a session server from the outside.

Six parts, each a subpackage whose ``__init__`` says what it owns. Imports run
one way, down this list, never up (``tests/test_layering.py`` enforces it)::

    report     the terminal report (rich), JSON/JUnit/Markdown, the HTML timeline
      ↓
    explore    every interference at every phase of a turn, with its coverage
      ↓
    chaos      random concurrent workloads, histories, the checker, shrinking
      ↓
    run        running scenarios against targets and judging them; profile check
      ↓
    model      what to run: scenarios, their YAML loading, target profiles
      ↓
    upstream   the scriptable LLM engine and its script language

``errors`` (every error the harness reports) and ``results`` (frozen records
of what a run observed and concluded) sit below all six and import nothing of
the harness. Any part may import ``wire`` (the API shapes, streams, errors and
the contract's rules, which the reference server reads too). ``refserver`` is
imported only to embed it: its server, child process, known-broken variants and
their config; a judge that treats the reference as a black box shares nothing
else of it. ``refserver`` never imports the harness. Only ``report`` (and the
CLI in ``sessctl/``) imports rich.
"""
