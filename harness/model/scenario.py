"""The scenario model: what a YAML scenario file may say (see scenarios/README.md).

A step is a mapping whose *operation key* names the step::

    - chat: c1            # op "chat", step id "c1"
      session: s1
      upstream: hold
      background: true

Validation happens in two passes: pydantic checks each field's shape, then
``check_references`` checks that every name a step uses was defined by an
earlier step. ``loader.py`` turns both kinds of error into file:line:col.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.errors import ScriptError
from harness.upstream.script import Action, Behaviour, EventKind, parse_behaviour

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", max_length=40)]


# -- status expectations ------------------------------------------------------


@dataclass(frozen=True)
class StatusMatcher:
    codes: frozenset[int]
    classes: frozenset[int]
    """Hundreds digits for "2xx"-style entries."""

    def matches(self, status: int | None) -> bool:
        if status is None:
            return False
        return status in self.codes or status // 100 in self.classes

    def describe(self) -> str:
        parts = [str(c) for c in sorted(self.codes)] + [f"{c}xx" for c in sorted(self.classes)]
        return " or ".join(parts)

    @property
    def outcome(self) -> bool | None:
        """True if every accepted status is a success, False if none is, None if mixed.

        This is the safety half of a status expectation: a 2xx where a refusal was
        expected (or the reverse) breaks the contract on any server; which exact
        code a refusal uses is a convention.
        """
        successes = {c // 100 == 2 for c in self.codes} | {c == 2 for c in self.classes}
        return next(iter(successes)) if len(successes) == 1 else None


_STATUS_CLASS = re.compile(r"^([1-5])xx$")


def parse_status(spec: int | str | Sequence[int | str]) -> StatusMatcher:
    items = [spec] if isinstance(spec, int | str) else list(spec)
    codes: set[int] = set()
    classes: set[int] = set()
    for item in items:
        if isinstance(item, int) and 100 <= item <= 599:
            codes.add(item)
            continue
        if isinstance(item, str):
            if item.isdigit() and 100 <= int(item) <= 599:
                codes.add(int(item))
                continue
            match = _STATUS_CLASS.match(item)
            if match:
                classes.add(int(match.group(1)))
                continue
        raise ValueError(f"{item!r} is not a status: use a code like 404, or a class like 2xx")
    if not codes and not classes:
        raise ValueError("expected at least one status")
    return StatusMatcher(frozenset(codes), frozenset(classes))


StatusSpec = int | str | list[int | str]

TrajectoryModel = Literal["linear", "tree", "log"]
"""A log (every call a record) accepts every turn a tree accepts, and more: a
scenario's ``tree:`` expectations are what such a server must meet as well."""


def accepts_divergence(model: TrajectoryModel) -> bool:
    """A divergent turn is accepted (a branch, or a record), not refused."""
    return model != "linear"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Expect(_Model):
    status: StatusSpec | None = None
    error_type: str | list[str] | None = None
    within_ms: float | None = Field(default=None, gt=0)
    # For get steps: the committed trajectory as the server reports it.
    num_assistant: int | None = Field(default=None, ge=0)
    length: int | None = Field(default=None, ge=0)
    in_flight: bool | None = None
    contains: list[Identifier] = []
    """Chat steps whose answer must be in the trajectory."""
    excludes: list[Identifier] = []
    """Chat steps whose new user message must not be in the trajectory."""
    convention: str | None = None
    """Set when every expectation here is a convention, not safety; says which."""
    stream: Literal["done", "error", "cut"] | None = None
    """For a streamed chat answered 200: how the stream ends. ``done``: with
    ``[DONE]``; ``error``: with an error event (of ``error_type``, if given) and
    no ``[DONE]``; ``cut``: with neither."""
    on_tree: Expect | None = Field(default=None, alias="tree")
    """What differs on a server whose trajectory is a tree (a divergent turn starts
    a branch): only the keys given here replace the ones above; ``null`` drops one.
    A log (every call a record) gets these too."""
    on_log: Expect | None = Field(default=None, alias="log")
    """What differs again on a log, where nothing is refused for its history: the
    keys given here replace those above (after any ``tree:``)."""

    @field_validator("status")
    @classmethod
    def _status_is_parseable(cls, value: StatusSpec | None) -> StatusSpec | None:
        if value is not None:
            parse_status(value)
        return value

    def for_model(self, model: TrajectoryModel) -> Expect:
        """These expectations on a server of this trajectory model."""
        changed: dict[str, Any] = {"on_tree": None, "on_log": None}
        for override, applies in (
            (self.on_tree, accepts_divergence(model)),
            (self.on_log, model == "log"),
        ):
            if applies and override is not None:
                changed |= {name: getattr(override, name) for name in override.model_fields_set}
        return self.model_copy(update=changed)

    @property
    def status_matcher(self) -> StatusMatcher | None:
        return None if self.status is None else parse_status(self.status)

    @property
    def error_types(self) -> frozenset[str]:
        if self.error_type is None:
            return frozenset()
        return frozenset([self.error_type] if isinstance(self.error_type, str) else self.error_type)


# -- steps ----------------------------------------------------------------------


class Step(_Model):
    id: Identifier
    background: bool = False
    expect: Expect | None = None
    note: str | None = None
    """Why this step is here; shown in the report."""
    safety_property: str | None = Field(default=None, alias="property")
    """The safety property this step's expectations guard (default: the scenario's)."""
    setup: bool | None = None
    """This step builds the state the race needs (True) or observes the property
    (False). A setup step answered on the other side than expected means the
    race was never placed: the run is UNTESTED, not FAIL. Default: see
    ``Scenario.setup_steps``."""

    op: str = ""

    def references(self) -> list[tuple[str, str]]:
        """(field, step id) pairs this step refers to, for the reference check."""
        return []


class SessionStep(Step):
    session: Identifier | None = None
    """A session created (or ghosted) by an earlier step; default: the latest one."""


class CreateStep(Step):
    op: Literal["create"] = "create"


class GhostStep(Step):
    """Names a fresh random session id that was never created."""

    op: Literal["ghost"] = "ghost"


class ChatStep(SessionStep):
    op: Literal["chat"] = "chat"
    upstream: Any = "respond"
    """One behaviour, or a list (one per upstream call, the last repeating)."""
    after: Identifier | None = None
    """Build on the trajectory as this earlier chat's client saw it."""
    retry: Identifier | None = None
    """Send exactly the messages that earlier chat sent (an exact retry)."""
    messages: list[dict[str, Any]] | None = None
    """Explicit messages; the harness marker is appended to the last one."""
    content: str | None = None
    """Text of the new user message (default: "turn <id>")."""
    stream: bool = False
    """Send ``stream: true`` and read the answer as Server-Sent Events."""
    hang_up_after: int | Literal["finish"] | None = None
    """Hang up once this many chunks have arrived, or the chunk with ``finish_reason``."""

    @model_validator(mode="after")
    def _hang_up_needs_a_stream(self) -> ChatStep:
        if self.hang_up_after is not None and not self.stream:
            raise ValueError("hang_up_after needs stream: true")
        if isinstance(self.hang_up_after, int) and self.hang_up_after < 1:
            raise ValueError("hang_up_after must be 1 or more chunks, or 'finish'")
        return self

    @field_validator("upstream")
    @classmethod
    def _upstream_is_a_script(cls, value: Any) -> Any:
        try:
            behaviours_of(value)
        except ScriptError as error:
            raise ValueError(str(error)) from None
        return value

    @property
    def behaviours(self) -> list[Behaviour]:
        return behaviours_of(self.upstream)

    @property
    def plain_script(self) -> bool:
        """The engine just answers every call: nothing about it is the race."""
        return all(b == Behaviour() for b in self.behaviours)

    @property
    def starts_with_retryable_failure(self) -> bool:
        """Its first upstream call fails in a way the contract retries (an abort,
        a reset, 429 or 503): a server that passes such failures through to the
        agent answers this chat with an error instead. A stream cut after chunks
        were relayed is not one: nothing can be retried once the agent has text."""
        first = self.behaviours[0]
        if self.stream and first.after is not None and first.after > 0:
            return False
        return first.action in (Action.ABORT, Action.RESET) or (
            first.action is Action.STATUS and first.status in (429, 503)
        )

    def references(self) -> list[tuple[str, str]]:
        return [(f, v) for f, v in (("after", self.after), ("retry", self.retry)) if v]


def behaviours_of(spec: Any) -> list[Behaviour]:
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise ScriptError("the upstream script is empty")
    return [parse_behaviour(item) for item in items]


class DeleteStep(SessionStep):
    op: Literal["delete"] = "delete"


class GetStep(SessionStep):
    op: Literal["get"] = "get"


class GeneratedBody(_Model):
    """A valid chat body with one extra top-level key, ``x``, holding the generated value."""

    nesting: int | None = Field(default=None, ge=1, le=100_000)
    """``x`` is an array nested this many levels deep."""
    integer_digits: int | None = Field(default=None, ge=1, le=100_000)
    """``x`` is an integer with this many digits."""

    @model_validator(mode="after")
    def _exactly_one(self) -> GeneratedBody:
        if (self.nesting is None) == (self.integer_digits is None):
            raise ValueError("give exactly one of nesting, integer_digits")
        return self

    def render(self) -> bytes:
        head = b'{"model": "sessctl", "messages": [{"role": "user", "content": "hi"}], "x": '
        if self.nesting is not None:
            value = b"[" * self.nesting + b"]" * self.nesting
        else:
            value = b"9" * (self.integer_digits or 1)
        return head + value + b"}"


class RequestStep(SessionStep):
    """A raw HTTP request, for bad input. ``{session}`` in the path is the session id."""

    op: Literal["request"] = "request"
    method: str = "POST"
    path: str
    body: str | None = None
    json_body: Any = Field(default=None, alias="json")
    body_bytes: int | None = Field(default=None, ge=1, le=256 * 1024 * 1024)
    """Send a syntactically valid chat body padded to this many bytes."""
    generate: GeneratedBody | None = None
    """Send a chat body too unwieldy to write in YAML (deep nesting, a huge integer)."""
    headers: dict[str, str] = {}

    @model_validator(mode="after")
    def _one_body(self) -> RequestStep:
        given = [
            name
            for name, value in (
                ("body", self.body),
                ("json", self.json_body),
                ("body_bytes", self.body_bytes),
                ("generate", self.generate),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give at most one of body, json, body_bytes, generate; got {given}")
        return self

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WaitStep(Step):
    op: Literal["wait"] = "wait"
    target: str = Field(
        pattern=(
            r"^[A-Za-z][A-Za-z0-9_-]*\."
            r"(received|sent|answered|cancelled|dropped|chunks|finished)$"
        )
    )
    """``STEP.EVENT``: an upstream event of a chat step (``received``, ``sent`` for
    each chunk streamed, ``answered``, ``cancelled``, ``dropped``), or what the
    step's client has received of a stream (``chunks``; ``finished``: the chunk
    with ``finish_reason``)."""
    count: int = Field(default=1, ge=1)
    timeout: float = Field(default=5.0, gt=0)

    @property
    def chat_step(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def on_client(self) -> bool:
        """Waits on what the client received, not on the upstream."""
        return self.target.split(".", 1)[1] in CLIENT_EVENTS

    @property
    def event(self) -> EventKind:
        """The upstream event waited for; only for a wait that is not ``on_client``."""
        return EventKind(self.target.split(".", 1)[1])

    @property
    def places_the_race(self) -> bool:
        """Waits until the race can be placed (the upstream has the call, the client
        has chunks), rather than for what the race should bring about (a call
        cancelled or answered): one that never fills means nothing was raced."""
        return self.on_client or self.event in (EventKind.RECEIVED, EventKind.SENT)

    def references(self) -> list[tuple[str, str]]:
        return [("wait", self.chat_step)]


CLIENT_EVENTS = frozenset({"chunks", "finished"})


class StepListStep(Step):
    steps: list[Identifier]

    def references(self) -> list[tuple[str, str]]:
        return [(self.op, s) for s in self.steps]


class ReleaseStep(StepListStep):
    op: Literal["release"] = "release"


class AwaitStep(StepListStep):
    op: Literal["await"] = "await"
    timeout: float | None = Field(default=None, gt=0)
    """Fail the run if the steps have not answered by then (default: the request timeout)."""


class SettleStep(Step):
    """Let the target take in every request already sent (e.g. queue on a session lock).

    Exact against the in-process reference server (every task is blocked);
    against an external target, a best-effort barrier of a few round trips.
    """

    op: Literal["settle"] = "settle"


class CancelStep(StepListStep):
    """The harness hangs up on background chats: a client disconnect mid-turn."""

    op: Literal["cancel"] = "cancel"


STEP_TYPES: dict[str, type[Step]] = {
    "create": CreateStep,
    "ghost": GhostStep,
    "chat": ChatStep,
    "delete": DeleteStep,
    "get": GetStep,
    "request": RequestStep,
    "wait": WaitStep,
    "release": ReleaseStep,
    "await": AwaitStep,
    "cancel": CancelStep,
    "settle": SettleStep,
}
HTTP_OPS = frozenset({"create", "chat", "delete", "get", "request"})
"""Steps that send a request and so get a status."""


def step_fields(op: str, value: Any, rest: dict[str, Any], position: int) -> dict[str, Any]:
    """Map ``{op: value, **rest}`` onto the step model's fields."""
    fields = dict(rest)
    if op == "wait":
        fields["target"] = value
        fields.setdefault("id", f"wait{position}")
    elif op in ("release", "await", "cancel"):
        fields["steps"] = value if isinstance(value, list) else [value]
        fields.setdefault("id", f"{op}{position}")
    elif op == "settle":
        fields.setdefault("id", f"settle{position}")
    else:
        fields["id"] = value
    return fields


# -- scenario-level expectations ----------------------------------------------------


class UpstreamExpect(_Model):
    received: int | bool | None = None
    answered: int | bool | None = None
    cancelled: int | bool | None = None
    dropped: int | bool | None = None
    sent: int | bool | None = None
    """Chunks of streamed answers sent."""
    calls: int | None = Field(default=None, ge=0)
    convention: str | None = None
    """Set when these counts are a convention, not safety; says which (shown when they differ)."""


class Group(_Model):
    """A constraint over several steps' statuses, e.g. exactly one 204."""

    safety_property: str | None = Field(default=None, alias="property")

    exactly_one: list[Identifier] | None = None
    at_most_one: list[Identifier] | None = None
    at_least_one: list[Identifier] | None = None
    status: StatusSpec

    @field_validator("status")
    @classmethod
    def _status_is_parseable(cls, value: StatusSpec) -> StatusSpec:
        parse_status(value)
        return value

    @property
    def kind_and_steps(self) -> tuple[str, list[str]]:
        given = [
            (kind, steps)
            for kind, steps in (
                ("exactly_one", self.exactly_one),
                ("at_most_one", self.at_most_one),
                ("at_least_one", self.at_least_one),
            )
            if steps is not None
        ]
        if len(given) != 1:
            raise ValueError("a group needs exactly one of exactly_one, at_most_one, at_least_one")
        return given[0]


class ScenarioExpect(_Model):
    upstream: dict[Identifier, UpstreamExpect] = {}
    groups: list[Group] = []
    durable: bool = True
    """Every chat answered 200 is a prefix of its session's final trajectory."""
    no_success_after_delete: bool = True
    """No step on a session gets 2xx once a DELETE of it has completed with 2xx."""
    on_tree: ScenarioExpect | None = Field(default=None, alias="tree")
    """What differs on a tree-shaped trajectory: ``groups`` given here replace the
    ones above; ``upstream`` entries replace the same steps' entries."""

    def for_model(self, model: TrajectoryModel) -> ScenarioExpect:
        tree = self.on_tree
        if not accepts_divergence(model) or tree is None:
            return self.model_copy(update={"on_tree": None})
        changed: dict[str, Any] = {name: getattr(tree, name) for name in tree.model_fields_set}
        changed["upstream"] = {**self.upstream, **tree.upstream}
        return self.model_copy(update={**changed, "on_tree": None})


class Scenario(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=80)]
    description: str
    why: str = ""
    """Why the expected codes are right (every built-in scenario says)."""
    safety_property: str = Field(default="", alias="property")
    """The safety property it guards, in a few words; labels its failures (default: name)."""
    mirrors: str | None = None
    """The seed test this scenario mirrors, where there is one."""
    repeat: int = Field(default=1, ge=1, le=10_000)
    timeout: float = Field(default=30.0, gt=0)
    steps: list[Step]
    expect: ScenarioExpect = ScenarioExpect()
    source: str = ""
    """The file it came from (set by the loader)."""

    @property
    def guards(self) -> str:
        return self.safety_property or self.name

    def property_of(self, step_id: str | None) -> str:
        if step_id is not None:
            for step in self.steps:
                if step.id == step_id and step.safety_property:
                    return step.safety_property
        return self.guards

    @property
    def setup_steps(self) -> frozenset[str]:
        """The steps that build the state the race needs.

        A step's own ``setup:`` decides. Otherwise: every create and ghost, every
        wait that places the race (``WaitStep.places_the_race``), and the plain
        turns that open the scenario: chats in the foreground, answered by the
        default upstream script, expected to succeed, before the first step that
        is not setup. Anything later, or scripted, observes the property."""
        found: set[str] = set()
        opening = True
        for step in self.steps:
            if step.setup is not None:
                is_setup = step.setup
            elif isinstance(step, CreateStep | GhostStep):
                is_setup = True
            elif isinstance(step, WaitStep):
                is_setup = step.places_the_race
            elif isinstance(step, ChatStep):
                is_setup = opening and _plain_turn(step)
            else:
                is_setup = False
            if is_setup:
                found.add(step.id)
            elif not isinstance(step, WaitStep):
                opening = False
        return frozenset(found)

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def for_model(self, model: TrajectoryModel) -> Scenario:
        """This scenario as a server of this trajectory model should pass it: each
        ``tree:`` expectation applied (on a tree or a log) or dropped (on a linear one)."""
        steps = [
            step
            if step.expect is None
            else step.model_copy(update={"expect": step.expect.for_model(model)})
            for step in self.steps
        ]
        return self.model_copy(update={"steps": steps, "expect": self.expect.for_model(model)})


def _plain_turn(step: ChatStep) -> bool:
    """A turn that only builds history: sent and awaited, answered by the engine at
    once, expected to succeed, with nothing of a race about it."""
    matcher = step.expect.status_matcher if step.expect else None
    return (
        not step.background
        and not step.stream
        and step.retry is None
        and step.plain_script
        and (matcher is None or matcher.outcome is True)
    )


@dataclass(frozen=True)
class ReferenceProblem:
    location: tuple[str | int, ...]
    """Where in the file, as a path of keys and indexes (``("steps", 3, "session")``)."""
    message: str


def check_references(scenario: Scenario) -> list[ReferenceProblem]:
    """Names must be defined before use; ids must be unique."""
    problems: list[ReferenceProblem] = []
    seen: dict[str, Step] = {}
    sessions: set[str] = set()
    for index, step in enumerate(scenario.steps):
        if step.id in seen:
            problems.append(
                ReferenceProblem(("steps", index, "id"), f"step id {step.id!r} is used twice")
            )
        if isinstance(step, SessionStep):
            if step.session is not None and step.session not in sessions:
                problems.append(
                    ReferenceProblem(
                        ("steps", index, "session"),
                        f"session {step.session!r} is not created before this step",
                    )
                )
            if step.session is None and not sessions and not isinstance(step, RequestStep):
                problems.append(
                    ReferenceProblem(
                        ("steps", index, "session"), "no session exists yet: add a create step"
                    )
                )
        for field, ref in step.references():
            target = seen.get(ref)
            if target is None:
                problems.append(
                    ReferenceProblem(("steps", index, field), f"{ref!r} is not an earlier step")
                )
            elif field in ("wait", "release", "after", "retry", "cancel") and not isinstance(
                target, ChatStep
            ):
                problems.append(
                    ReferenceProblem(("steps", index, field), f"{ref!r} is not a chat step")
                )
            elif (
                isinstance(step, WaitStep)
                and step.on_client
                and isinstance(target, ChatStep)
                and not (target.stream and target.background)
            ):
                problems.append(
                    ReferenceProblem(
                        ("steps", index, "wait"),
                        f"{ref!r} must be a background chat with stream: true to wait on "
                        "what its client received",
                    )
                )
            elif field == "cancel" and not target.background:
                problems.append(
                    ReferenceProblem(
                        ("steps", index, field), f"{ref!r} must be a background step to cancel"
                    )
                )
        tree = step.expect.on_tree if step.expect is not None else None
        log = step.expect.on_log if step.expect is not None else None
        for expect in (e for e in (step.expect, tree, log) if e is not None):
            for ref in [*expect.contains, *expect.excludes]:
                if not isinstance(seen.get(ref), ChatStep):
                    problems.append(
                        ReferenceProblem(
                            ("steps", index, "expect"), f"{ref!r} is not an earlier chat step"
                        )
                    )
        if isinstance(step, CreateStep | GhostStep):
            sessions.add(step.id)
        seen[step.id] = step
    problems.extend(_expect_references(scenario.expect, ("expect",), seen))
    if scenario.expect.on_tree is not None:
        problems.extend(_expect_references(scenario.expect.on_tree, ("expect", "tree"), seen))
    return problems


def _expect_references(
    expect: ScenarioExpect, where: tuple[str | int, ...], seen: dict[str, Step]
) -> list[ReferenceProblem]:
    problems: list[ReferenceProblem] = []
    for name in expect.upstream:
        if not isinstance(seen.get(name), ChatStep):
            problems.append(
                ReferenceProblem((*where, "upstream", name), f"{name!r} is not a chat step")
            )
    for group_index, group in enumerate(expect.groups):
        here: tuple[str | int, ...] = (*where, "groups", group_index)
        try:
            kind, steps = group.kind_and_steps
        except ValueError as error:
            problems.append(ReferenceProblem(here, str(error)))
            continue
        for ref in steps:
            if ref not in seen:
                problems.append(ReferenceProblem((*here, kind), f"{ref!r} is not a step"))
    return problems
