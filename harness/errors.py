"""Every error the harness reports to its user, in one place.

Hierarchy::

    HarnessError                     exit status
    ├── UsageError                   2   bad command-line arguments
    │   └── ListenFailed             2   the chaos upstream's address is taken or invalid
    ├── ScenarioFileError            2   a scenario file is malformed (file:line:col)
    ├── ScriptError                  2   an upstream behaviour cannot be understood
    ├── TargetUnreachable            3   the server under test does not answer at all
    └── LoadFailed                   3   sessctl load's Locust processes could not run
                                         (not installed, workers never connected)

Failures *of the server under test* are not exceptions: they are verdicts in
the report (FAIL, with server faults among them; UNTESTED where a race could not
be placed), or notes of a partial profile (``profile check``). Foreign
exceptions (httpx, YAML, pydantic) are translated into these where they are met:
``run/client.py``, ``model/loader.py``.
"""

from __future__ import annotations


class HarnessError(Exception):
    exit_code = 2


class UsageError(HarnessError):
    exit_code = 2


class ListenFailed(UsageError):
    """The chaos upstream cannot listen where it was told (a port in use, say)."""


class ScenarioFileError(HarnessError):
    exit_code = 2

    def __init__(self, path: str, line: int | None, column: int | None, message: str) -> None:
        location = path if line is None else f"{path}:{line}:{column or 1}"
        super().__init__(f"{location}: {message}")
        self.path = path
        self.line = line
        self.column = column
        self.message = message


class ScriptError(HarnessError):
    exit_code = 2


class TargetUnreachable(HarnessError):
    exit_code = 3


class LoadFailed(HarnessError):
    """``sessctl load`` could not run its load: Locust is missing, its workers never
    connected, or its master stopped without a history. Nothing was judged."""

    exit_code = 3
