"""Reading scenario files: YAML in, ``Scenario`` out, every error as file:line:col.

PyYAML's node tree keeps a mark for every value, so a pydantic error's
location (``steps.3.expect.status``) can be walked back to the line that
holds the offending value. That is the only reason we compose nodes
rather than call ``safe_load``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from harness.errors import ScenarioFileError

from .scenario import STEP_TYPES, Scenario, Step, check_references, step_fields

ModelT = TypeVar("ModelT", bound=BaseModel)

BUILTIN_PREFIX = "builtin:"


def builtin_scenario_files() -> list[Path]:
    """The library shipped inside the package (works for wheel and editable installs)."""
    root = resources.files("scenarios")
    return sorted(
        Path(str(entry)) for entry in root.iterdir() if entry.name.endswith((".yaml", ".yml"))
    )


def is_builtin(path: Path) -> bool:
    return path.parent in (
        Path(str(resources.files("scenarios"))),
        Path(str(resources.files("profiles"))),
    )


def collect_files(paths: Sequence[str]) -> list[Path]:
    if not paths:
        return builtin_scenario_files()
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
        elif path.is_file():
            files.append(path)
        else:
            raise ScenarioFileError(raw, None, None, "no such file or directory")
    if not files:
        raise ScenarioFileError(", ".join(paths), None, None, "no .yaml scenario files found")
    return files


def load_scenarios(
    paths: Sequence[str], name_filter: str | None = None, exclude: str | None = None
) -> list[Scenario]:
    scenarios = [load_file(path) for path in collect_files(paths)]
    seen: dict[str, str] = {}
    for scenario in scenarios:
        if scenario.name in seen:
            raise ScenarioFileError(
                scenario.source,
                None,
                None,
                f"scenario name {scenario.name!r} is already used by {seen[scenario.name]}",
            )
        seen[scenario.name] = scenario.source
    if name_filter:
        scenarios = [s for s in scenarios if _matches(s.name, name_filter)]
    if exclude:
        scenarios = [s for s in scenarios if not _matches(s.name, exclude)]
    return scenarios


def _matches(name: str, globs: str) -> bool:
    return any(fnmatch.fnmatch(name, p.strip()) for p in globs.split(",") if p.strip())


def load_file(path: Path) -> Scenario:
    shown = _shown_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioFileError(shown, None, None, f"cannot read: {error}") from None
    return parse_scenario(text, shown)


def read_yaml_mapping(text: str, source: str) -> tuple[yaml.Node, dict[str, Any]]:
    """Parse YAML into data plus the node tree that knows every value's line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ScenarioFileError(source, line, column, f"invalid YAML: {error.problem}") from None
    except yaml.YAMLError as error:
        raise ScenarioFileError(source, None, None, f"invalid YAML: {error}") from None
    if not isinstance(data, dict) or root is None:
        raise ScenarioFileError(source, 1, 1, "the file must be a YAML mapping")
    return root, data


def load_model(path: Path, model: type[ModelT]) -> ModelT:
    """Any YAML file validated against a pydantic model, with file:line:col errors."""
    shown = _shown_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioFileError(shown, None, None, f"cannot read: {error}") from None
    root, data = read_yaml_mapping(text, shown)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise error_from_validation(shown, root, (), error, whole=model.__name__.lower()) from None


def parse_scenario(text: str, source: str) -> Scenario:
    root, data = read_yaml_mapping(text, source)

    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise error_at(source, root, ("steps",), "'steps' must be a non-empty list")
    steps = [_parse_step(source, root, index, raw) for index, raw in enumerate(raw_steps)]
    try:
        scenario = Scenario.model_validate({**data, "steps": steps, "source": source})
    except ValidationError as error:
        raise error_from_validation(source, root, (), error) from None
    for problem in check_references(scenario):
        raise error_at(source, root, problem.location, problem.message)
    return scenario


def _parse_step(source: str, root: yaml.Node, index: int, raw: Any) -> Step:
    here: tuple[str | int, ...] = ("steps", index)
    if not isinstance(raw, dict):
        raise error_at(source, root, here, "a step must be a mapping like '- chat: c1'")
    ops = [key for key in raw if key in STEP_TYPES]
    if len(ops) != 1:
        known = ", ".join(STEP_TYPES)
        found = f"found {ops}" if ops else "found none"
        raise error_at(source, root, here, f"a step needs exactly one of: {known} ({found})")
    op = ops[0]
    rest = {k: v for k, v in raw.items() if k != op}
    model = STEP_TYPES[op]
    try:
        return model.model_validate(step_fields(op, raw[op], rest, index + 1))
    except ValidationError as error:
        raise error_from_validation(source, root, here, error, op_key=op) from None


def error_from_validation(
    source: str,
    root: yaml.Node,
    prefix: tuple[str | int, ...],
    error: ValidationError,
    op_key: str | None = None,
    whole: str = "scenario",
) -> ScenarioFileError:
    """``whole``: what the file is, named where an error is about all of it."""
    first = error.errors()[0]
    loc: tuple[str | int, ...] = tuple(first["loc"])
    # Fields synthesised from the op key ("id", "target", "steps") live on its line.
    if op_key and loc and loc[0] in ("id", "target", "steps"):
        loc = (op_key, *loc[1:])
    field = ".".join(str(part) for part in loc) or whole
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        # Point at the misspelt key itself, not at its value.
        mark = _key_node_at(root, (*prefix, *loc)).start_mark
        return ScenarioFileError(
            source, mark.line + 1, mark.column + 1, f"{field}: unknown field {loc[-1]!r}"
        )
    elif first["type"] == "missing":
        message = f"missing field {loc[-1]!r}"
        loc = loc[:-1]
    return error_at(source, root, (*prefix, *loc), f"{field}: {message}")


def error_at(
    source: str, root: yaml.Node, location: Iterable[str | int], message: str
) -> ScenarioFileError:
    node = _node_at(root, location)
    mark = node.start_mark
    return ScenarioFileError(source, mark.line + 1, mark.column + 1, message)


def _key_node_at(root: yaml.Node, location: tuple[str | int, ...]) -> yaml.Node:
    parent = _node_at(root, location[:-1])
    if isinstance(parent, yaml.MappingNode):
        for key_node, _ in parent.value:
            if key_node.value == str(location[-1]):
                found: yaml.Node = key_node
                return found
    return _node_at(root, location)


def _node_at(root: yaml.Node, location: Iterable[str | int]) -> yaml.Node:
    """The deepest node along ``location``; parts that name no node are skipped."""
    node = root
    for part in location:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    node = value_node
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            node = node.value[part]
    return node


def _shown_path(path: Path) -> str:
    if is_builtin(path):
        return BUILTIN_PREFIX + path.name
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
