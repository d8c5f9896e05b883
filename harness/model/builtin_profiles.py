"""The built-in profiles' files, found without loading them.

Apart from ``profile`` so that the CLI can name them in its help text without
importing pydantic and YAML, which ``sessctl serve`` never needs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def builtin_profiles() -> dict[str, Path]:
    """The built-in profiles by name (``reference``, ``tree-turns``, ...)."""
    root = resources.files("profiles")
    return {
        entry.name.removesuffix(".yaml"): Path(str(entry))
        for entry in root.iterdir()
        if entry.name.endswith(".yaml")
    }
