"""The architecture, enforced: imports run one way (see ``harness/__init__.py``).

A small reader over every module's imports (``ast``: top-level, TYPE_CHECKING
and function-local imports alike, since each is an arrow a reader must follow).
It fails when a lower part of the harness imports a higher one, when the
reference server imports the harness, when rich leaks below the report layer,
or when modules import each other in a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wire", "harness", "refserver", "sessctl")

# Lower rank = lower layer. A harness module may import modules of its own
# rank or lower, never higher.
RANK = {
    "base": 0,
    "upstream": 1,
    "model": 2,
    "run": 3,
    "chaos": 4,
    "explore": 5,
    "load": 5,
    "report": 6,
}
BASE_MODULES = {"harness.errors", "harness.results"}
# The model reads the upstream's script language (scenario files name
# behaviours and events), never the engine itself.
MODEL_MAY_IMPORT_FROM_UPSTREAM = {"harness.upstream.script"}
RICH_ALLOWED = ("harness.report", "sessctl")
# What the harness may take from the reference server: the server itself, to
# embed it (its config, its child process, its known-broken variants). What both
# sides read (messages, API shapes, streams, errors) is in ``wire``.
HARNESS_MAY_EMBED = {
    "refserver",
    "refserver.server",
    "refserver.child",
    "refserver.variants",
    "refserver.errors",
    "refserver.upstream",
}


# The Locust side of load runs under gevent, in processes of its own: what it
# imports must never bring trio in (harness/load/__init__.py).
GEVENT_SIDE = ("harness.load.agent", "harness.load.locust_main")
GEVENT_SIDE_MAY_IMPORT = (
    "harness.load.agent",
    "harness.load.settings",
    "harness.model",
    "harness.upstream.script",
    "harness.results",
    "harness.errors",
    "wire.anthropic",
    "wire.engine",
    "wire.ids",
    "wire.errors",
    "wire.protocol",
    "wire.rules",
    "wire.strictjson",
    "wire.streaming",
    "wire.generate",
    "wire.tokens",
)


def module_sources() -> dict[str, str]:
    sources = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources


def imports_of(module: str, source: str, *, is_package: bool, known: set[str]) -> Iterator[str]:
    """Every module ``module`` imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # ``from harness.run import runner`` is an arrow to the module
            # ``runner``; ``from harness.run.runner import X`` to ``runner``.
            submodules = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known]
            yield from submodules or [name]


def part_of(module: str) -> str | None:
    if module in BASE_MODULES or module == "harness":
        return "base"
    parts = module.split(".")
    if parts[0] == "harness" and len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return None


def violations(sources: Mapping[str, str], packages: set[str] | None = None) -> list[str]:
    packages = packages if packages is not None else {m for m in sources if _is_package(m)}
    known = set(sources)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        targets = {
            t
            for t in imports_of(module, source, is_package=module in packages, known=known)
            if t.split(".")[0] in (*PACKAGES, "rich")
        }
        graph[module] = {t for t in targets if t in known and t != module}
        for target in sorted(targets):
            problem = _rule_broken(module, target)
            if problem:
                problems.append(f"{module} imports {target}: {problem}")
    problems.extend(f"import circle: {' -> '.join(c)}" for c in _cycles(graph))
    return problems


def _is_package(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return (path / "__init__.py").exists()


def _rule_broken(module: str, target: str) -> str | None:
    top = module.split(".")[0]
    target_top = target.split(".")[0]
    if target_top == "rich":
        if not module.startswith(RICH_ALLOWED):
            return "only the report layer and the CLI render with rich"
        return None
    if top == "wire" and target_top in ("refserver", "harness", "sessctl"):
        return "the wire formats are below both the server and the harness"
    if top == "refserver" and target_top not in ("refserver", "wire"):
        return "the reference server stays blind to the harness and the CLI"
    if (
        module.startswith("refserver.transport")
        and target_top == "refserver"
        and not target.startswith("refserver.transport")
    ):
        return "the transport is below the specification it carries"
    if top == "harness" and target_top == "refserver" and target not in HARNESS_MAY_EMBED:
        return "the harness embeds the reference server; what both read is in wire"
    if top == "harness" and target_top == "sessctl":
        return "the harness never imports the CLI"
    if (
        module.startswith(GEVENT_SIDE)
        and target_top in PACKAGES
        and target != "harness"
        and not target.startswith(GEVENT_SIDE_MAY_IMPORT)
    ):
        return "the Locust side runs under gevent: nothing of it may bring trio in"
    if (
        module.startswith("harness.load")
        and not module.startswith(GEVENT_SIDE)
        and target.startswith(GEVENT_SIDE)
    ):
        return "sessctl's side of load starts Locust's processes, never imports Locust"
    if top != "harness" or target_top != "harness":
        return None
    source_part, target_part = part_of(module), part_of(target)
    if source_part is None or target_part is None or target == "harness":
        return None
    if module in BASE_MODULES and target not in BASE_MODULES:
        return "errors and results sit below every part"
    if RANK[target_part] > RANK[source_part]:
        return f"{source_part} is below {target_part}; imports run one way"
    if (
        source_part == "model"
        and target_part == "upstream"
        and not any(target.startswith(m) for m in MODEL_MAY_IMPORT_FROM_UPSTREAM)
    ):
        return "the model may read the upstream's script language, not the engine"
    return None


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_tree_keeps_its_layers() -> None:
    sources = module_sources()
    assert "harness.run.runner" in sources  # the reader found the tree
    assert violations(sources) == []


def test_every_harness_part_says_what_it_owns_and_may_import() -> None:
    for part in RANK:
        if part == "base":
            continue
        doc = ast.get_docstring(ast.parse((ROOT / "harness" / part / "__init__.py").read_text()))
        assert doc, f"harness/{part}/__init__.py has no docstring"
        assert "May import" in doc, f"harness/{part}/__init__.py does not say what it may import"


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("harness.run.checks", "from harness.report.console import x", "run is below report"),
        ("harness.model.scenario", "from harness.chaos import workload", "model is below chaos"),
        ("harness.results", "from harness.run.runner import RunSettings", "errors and results"),
        ("harness.model.scenario", "from harness.upstream.chaos_upstream import X", "script"),
        ("harness.run.suite", "import rich.table", "only the report layer"),
        ("refserver.app", "from harness.errors import UsageError", "blind to the harness"),
        ("harness.chaos.shrink", "from sessctl.cli import app", "never imports the CLI"),
        ("harness.chaos.case", "from ..report import timeline", "chaos is below report"),
        ("harness.run.checks", "from refserver.rules import comparable", "what both read"),
        ("wire.rules", "from refserver.service import SessionService", "below both"),
        ("refserver.transport.engine_http", "from ..service import X", "below the specification"),
        ("harness.load.agent", "from harness.run.client import TargetClient", "under gevent"),
        ("harness.load.run", "from .agent import SessionAgent", "never imports Locust"),
    ],
)
def test_a_wrong_arrow_is_caught(module: str, source: str, expected: str) -> None:
    found = violations({module: source}, packages=set())
    assert len(found) == 1
    assert expected in found[0]


def test_a_circle_is_caught() -> None:
    found = violations(
        {
            "harness.run.runner": "from .checks import check_run",
            "harness.run.checks": "if TYPE_CHECKING:\n    from .runner import RunContext",
        },
        packages=set(),
    )
    assert found == [
        "import circle: harness.run.checks -> harness.run.runner -> harness.run.checks"
    ]


def test_the_cli_imports_the_harness_only_for_the_commands_that_use_it() -> None:
    # `sessctl serve` is the reference server at scale; the harness's libraries
    # were a third of an idle server's memory when the CLI imported them up front.
    probe = (
        "import sys, sessctl.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml', 'httpx')"
        " or m.startswith(('harness.run', 'harness.chaos', 'harness.report', 'sessctl.run',"
        " 'locust', 'gevent', 'harness.load'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
