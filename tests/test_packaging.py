"""A plain ``pip install .`` installs every package of the tree (not only an
editable install, which sees the source tree whatever pyproject lists)."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("wire", "refserver", "harness", "sessctl", "scenarios", "profiles")


def test_every_package_in_the_tree_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = config["tool"]["setuptools"]["packages"]["find"]
    in_tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert "harness.explore" in in_tree
    assert "refserver.transport" in in_tree
    # setuptools' find matches its include patterns against the dotted names so.
    installed = {p for p in in_tree if any(fnmatchcase(p, i) for i in found["include"])}
    assert in_tree <= installed, sorted(in_tree - installed)
    assert not any(fnmatchcase("tests", i) for i in found["include"])
