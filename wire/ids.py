"""Session ids, as the reference server mints them and the harness makes them up."""

from __future__ import annotations

import secrets


def new_session_id() -> str:
    # 128 bits from the OS CSPRNG: ids are capabilities, they must not be guessable.
    return secrets.token_hex(16)
