"""The reference server's own error, outside the contract's vocabulary.

Every error a client is answered with is in ``wire.errors``. This one no client
ever sees::

    ChildServerFailed                 a server in a child process (``child.py``)
                                      exited before it listened, or while serving
"""

from __future__ import annotations


class ChildServerFailed(Exception):
    """The server's child process exited before it listened, or while serving.

    Raised to whoever started it; the harness translates it into
    ``TargetUnreachable``.
    """
