"""Target profiles: how a server differs from docs/contract.md in its *conventions*.

A profile adapts how the harness talks to a server (where the session id is,
whether there is a health route, how to read the committed trajectory, which
roles a turn may append). It never excuses a difference: a server that answers
200 where the contract says 201 still gets a NON-STRICT finding, labelled as
declared in the profile, so ``--strict`` can fail it.

The default is ``profiles/reference.yaml``.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.errors import UsageError
from wire.anthropic import chat_to_messages, message_to_chat, messages_to_chat

from .builtin_profiles import builtin_profiles
from .messages import keys_of


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PLACEHOLDERS = frozenset({"session", "agent", "admin_key", "task"})
"""What a route template may name: ``{session}`` the id that ends and reads the
session, ``{agent}`` the id the agent chats with (its API key, on some servers),
``{admin_key}`` the value of the profile's ``admin_key_env``, ``{task}`` a fresh
token per session (a task id)."""


def placeholders_in(template: Any) -> set[str]:
    """The ``{name}`` placeholders in a template: a string, or JSON holding strings."""
    if isinstance(template, str):
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if isinstance(template, dict):
        return set().union(*(placeholders_in(v) for v in template.values()), set())
    if isinstance(template, list):
        return set().union(*(placeholders_in(v) for v in template), set())
    return set()


def fill(template: Any, values: dict[str, str]) -> Any:
    """``template`` with each ``{name}`` replaced by ``values[name]`` (strings in
    JSON too; other JSON values as they are)."""
    if isinstance(template, str):
        for name, value in values.items():
            template = template.replace("{" + name + "}", value)
        return template
    if isinstance(template, dict):
        return {key: fill(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(value, values) for value in template]
    return template


class Route(_Model):
    """One HTTP call of the session's lifecycle. The path, header values and the
    strings of the JSON body may name ``{session}``, ``{agent}``, ``{admin_key}``
    and ``{task}``."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    path: str = Field(pattern=r"^/")
    headers: dict[str, str] = {}
    body: Any = None
    """A JSON body, sent with ``content-type: application/json``; none if null."""

    @model_validator(mode="after")
    def _names_known_placeholders(self) -> Route:
        named = placeholders_in(self.path) | placeholders_in(self.body)
        named |= placeholders_in(list(self.headers.values()))
        unknown = named - PLACEHOLDERS
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {', '.join(sorted('{' + n + '}' for n in unknown))}; "
                f"a route may name {', '.join(sorted('{' + n + '}' for n in PLACEHOLDERS))}"
            )
        return self

    @property
    def placeholders(self) -> set[str]:
        return (
            placeholders_in(self.path)
            | placeholders_in(self.body)
            | placeholders_in(list(self.headers.values()))
        )

    def describe(self) -> str:
        return f"{self.method} {self.path}"


class CreateConvention(Route):
    """How a session is made: by default ``POST /sessions``, answering 201 with
    the id under ``session_id``."""

    path: str = Field(default="/sessions", pattern=r"^/")
    before: list[Route] = []
    """Calls made, in order, before each create (a capacity grant, say); each must
    answer 2xx, or the session was never made."""
    status: int = Field(default=201, ge=200, le=299)
    id_field: str = "session_id"
    """Where the answer holds the id that ends and reads the session: a field, or a
    dotted path (``data.session.id``)."""
    agent_id_field: str | None = None
    """Where the answer holds the id the agent chats with, where it differs (an
    API key issued per session); default: the same id."""

    @model_validator(mode="after")
    def _creates_without_an_id(self) -> CreateConvention:
        for route in (self, *self.before):
            if {"session", "agent"} & route.placeholders:
                raise ValueError(
                    f"{route.describe()}: a create has no session yet; it may name "
                    "{admin_key} and {task}"
                )
        return self


class ReadRoute(Route):
    """How the trainer reads a session's trajectory: by default ``GET /sessions/{session}``."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    path: str = Field(default="/sessions/{session}", pattern=r"^/")
    once: bool = False
    """The read is an export: it waits for the session's end, answers every
    record, and removes the session (AReaL's ``export_trajectories``). The harness
    then reads each session once, after its end, at the end of a scenario; a
    scenario's earlier reads are not tested on such a server, and say so."""


DEFAULT_END = Route(method="DELETE", path="/sessions/{session}")


class TrajectoryConvention(_Model):
    model: Literal["linear", "tree", "log"] = "linear"
    """``linear``: one trajectory; a turn that diverges from it is refused. ``tree``:
    a divergent turn starts a branch, and concurrent writers both commit, as
    siblings; every turn answered 200 must be in some branch. ``log``: every call
    is a record (concurrent turns, exact retries, divergent requests), nothing is
    refused for its history; every 2xx must be recorded exactly once."""
    source: Literal["messages", "records"] = "messages"
    """``messages``: GET has the committed messages (on a tree, the active path).
    ``records``: they are the last record's ``request.messages`` plus its
    ``response.choices[0].message``; on a tree, the records are every committed
    turn (the whole tree)."""
    num_assistant: str | None = "num_assistant"
    """A field of the GET body, ``len(records)``, or null where the server shows
    no count (then no scenario judges one)."""
    turns_path: str | None = None
    """A tree: the route that lists every committed turn, as ``{"records": [...]}``
    or a bare list of records (``{session}`` is the id), where GET shows only the
    active path."""
    records: str = "records"
    """Where the read's answer lists the records: a field or dotted path, to a list,
    or to an object whose values are the records (in order)."""
    record_messages: str = "request.messages"
    """Where a record holds the messages its call was sent (a dotted path)."""
    record_answer: str = "response.choices.0.message"
    """Where a record holds the answer: an assistant message, or a list of them
    (the first is the answer); an Anthropic message is translated."""

    @model_validator(mode="after")
    def _a_tree_is_readable(self) -> TrajectoryConvention:
        if self.turns_path is not None and "{session}" not in self.turns_path:
            raise ValueError("turns_path must contain {session}")
        if self.turns_path is not None and self.model != "tree":
            raise ValueError("turns_path is for model: tree (a linear GET shows every turn)")
        if self.model == "tree" and self.source != "records" and self.turns_path is None:
            raise ValueError(
                "model: tree needs every committed turn: source: records (GET lists them "
                "all) or turns_path (a route that does)"
            )
        if self.model == "log" and self.source != "records":
            raise ValueError("model: log is read from records: say source: records")
        return self

    @property
    def tree(self) -> bool:
        return self.model == "tree"

    @property
    def log(self) -> bool:
        return self.model == "log"


class EngineConvention(_Model):
    """What the server needs of its engine's answers, where engines differ."""

    tool_call_content: Literal["null", "empty"] = "null"
    """A tool call's ``content``: ``null``, as OpenAI and current SGLang send it, or
    ``empty`` (""), as SGLang builds patched for servers that refuse null send it.
    The chaos upstream answers the way the server needs."""

    @property
    def content(self) -> str | None:
        return "" if self.tool_call_content == "empty" else None


ADDRESSING = re.compile(r"^(path|bearer|header:[A-Za-z0-9-]+|body:[A-Za-z_][A-Za-z0-9_.]*)$")

REFERENCE_CHAT_PATH = "/sessions/{session}/v1/chat/completions"


class Profile(_Model):
    name: str = "reference"
    description: str = ""
    addressing: str = Field(default="path", pattern=ADDRESSING.pattern)
    """Where the agent's chat names its session: ``path`` (in ``chat_path``),
    ``bearer`` (``Authorization: Bearer ID``: the API key is the session),
    ``header:NAME`` (``X-Session-ID: ID``), or ``body:FIELD`` (a dotted field of
    the chat body, ``metadata.session_id``)."""
    chat_path: str | None = None
    """Where the agent POSTs its chats; ``{session}`` is the id. Default: the
    reference's path with ``path`` addressing, ``/v1/chat/completions`` otherwise."""
    api: Literal["openai-chat", "anthropic-messages"] = "openai-chat"
    """Which API the agent speaks: OpenAI's chat completions, or Anthropic's Messages
    (``/v1/messages``; turns are built in chat form and translated)."""
    creation: Literal["explicit", "implicit"] = "explicit"
    """``explicit``: ``POST /sessions`` creates a session. ``implicit``: the first
    request that names a new id does (the harness makes the ids up); a request
    after the session's DELETE must still not bring it back."""
    create: CreateConvention = CreateConvention()
    end: Route = DEFAULT_END
    """How the trainer ends a session (the contract's DELETE)."""
    read: ReadRoute = ReadRoute()
    """How the trainer reads a session's trajectory (the contract's GET)."""
    admin_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable that holds the admin key routes name as
    ``{admin_key}``. The key is never in the profile, and reports show
    ``$NAME`` where it was sent."""
    health_path: str | None = "/healthz"
    trajectory: TrajectoryConvention = TrajectoryConvention()
    append_after_assistant: list[Literal["user", "tool"]] = Field(
        default=["user", "tool"], min_length=1
    )
    retry: Literal["replay", "regenerate", "refuse"] = "replay"
    """What an exact retry of the last turn does: answer the stored turn, generate
    it again, or refuse it with a 4xx (state unchanged)."""
    upstream_failures: Literal["retry", "pass-through"] = "retry"
    """What the server does with a retryable upstream failure (abort, reset, 429,
    503): retry it, or pass it to the agent (state unchanged) for the agent to retry."""
    aborted_completions: Literal["retry", "commit"] = "retry"
    """What the server does with an engine answer whose ``finish_reason`` is
    ``abort`` (SGLang's, during a weight update): retry it (the contract), or
    answer the agent 200 with that ``finish_reason`` and commit it as it is
    (some RL servers keep aborted samples, marked, on purpose)."""
    rollback: Literal["none", "one-step"] = "none"
    """``one-step``: a request that differs from the committed trajectory only in its
    last turn replaces that turn (the server rolls it back) instead of a refusal."""
    streaming: Literal["relay", "buffered", "unsupported"] = "relay"
    """``relay``: chunks are forwarded as the engine sends them. ``buffered``: the
    whole answer is generated first, then sent as a stream (a "fake stream").
    ``unsupported``: ``stream: true`` is refused with a 4xx."""
    rejected_status: int = Field(default=409, ge=400, le=499)
    closed_status: list[int] = Field(default=[404], min_length=1)
    """What a request on a deleted session answers: 404; or 410 (reclaimed), 409
    (the rollout concluded), 503 (still closing). Any of them is safe."""
    error_shape: Literal["openai", "string", "detail"] = "openai"
    """``openai``: ``{"error": {"type", "message"}}``; ``string``: ``{"error": "..."}``;
    ``detail``: FastAPI's ``{"detail": "..."}``. Either way an error type the
    contract names cannot be read, which is a convention, not a failure."""
    engine: EngineConvention = EngineConvention()

    @model_validator(mode="after")
    def _closed_statuses_refuse(self) -> Profile:
        if any(not 400 <= code <= 599 for code in self.closed_status):
            raise ValueError("closed_status holds refusals: codes from 400 to 599")
        return self

    @model_validator(mode="after")
    def _admin_key_has_a_source(self) -> Profile:
        for route in self.routes:
            if "admin_key" in route.placeholders and self.admin_key_env is None:
                raise ValueError(
                    f"{route.describe()} names {{admin_key}}: say which environment "
                    "variable holds it (admin_key_env: NAME)"
                )
        for route in (self.end, self.read):
            if "task" in route.placeholders:
                raise ValueError(f"{route.describe()}: {{task}} is known only to a create")
        return self

    @model_validator(mode="after")
    def _an_export_lists_every_turn(self) -> Profile:
        if self.read.once and self.trajectory.turns_path is not None:
            raise ValueError("read: once is the only read; a tree's turns_path cannot follow it")
        return self

    @property
    def routes(self) -> list[Route]:
        return [*self.create.before, self.create, self.end, self.read]

    def admin_key(self) -> str | None:
        """The admin key, from the environment variable the profile names."""
        if self.admin_key_env is None:
            return None
        value = os.environ.get(self.admin_key_env)
        if not value:
            raise UsageError(
                f"profile {self.name!r} reads its admin key from the environment "
                f"variable {self.admin_key_env}, which is not set"
            )
        return value

    @property
    def default_lifecycle(self) -> bool:
        """Sessions are made, ended and read at the contract's own routes."""
        reference = REFERENCE_PROFILE
        create = self.create.model_copy(update={"status": 201, "id_field": "session_id"})
        return (
            create == reference.create and self.end == reference.end and self.read == reference.read
        )

    @model_validator(mode="after")
    def _chat_path_names_the_session(self) -> Profile:
        if self.addressing == "path" and "{session}" not in self.resolved_chat_path:
            raise ValueError("with addressing: path, chat_path must contain {session}")
        return self

    @property
    def resolved_chat_path(self) -> str:
        if self.chat_path is not None:
            return self.chat_path
        route = "/v1/messages" if self.api == "anthropic-messages" else "/v1/chat/completions"
        return f"/sessions/{{session}}{route}" if self.addressing == "path" else route

    def chat_request(
        self, session_id: str, body: dict[str, Any], *, raw: bool = False
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The path, headers and body of a chat on ``session_id``, addressed as the
        server expects (the body is copied, never changed in place). ``raw``: a body
        of bad input, sent as it is (for the Messages API, with ``max_tokens`` added,
        so that what is wrong with it is what the scenario meant)."""
        path = self.resolved_chat_path.replace("{session}", session_id)
        if self.api == "anthropic-messages":
            body = {"max_tokens": 256, **body} if raw else chat_to_messages(body)
        kind, _, name = self.addressing.partition(":")
        if kind == "bearer":
            return path, {"authorization": f"Bearer {session_id}"}, body
        if kind == "header":
            return path, {name: session_id}, body
        if kind == "body":
            return path, {}, _with_field(body, name.split("."), session_id)
        return path, {}, body

    @property
    def appends_tool_results(self) -> bool:
        """Turns after an assistant message must be tool results, not user messages."""
        return "user" not in self.append_after_assistant

    def lifecycle_in_words(self) -> str:
        create = self.create
        made = " then ".join(route.describe() for route in (*create.before, create))
        agent = (
            f", the agent's id at {create.agent_id_field!r}"
            if create.agent_id_field is not None
            else ""
        )
        return (
            f"sessions are made by {made} (the id at {create.id_field!r}{agent}), "
            f"ended by {self.end.describe()}, read by {self.read.describe()}"
        )

    def differences(self) -> list[str]:
        """Where this profile departs from the reference conventions, in words."""
        reference = REFERENCE_PROFILE
        found: list[str] = []
        if self.api != reference.api:
            found.append("the agent speaks Anthropic's Messages API")
        if self.addressing != reference.addressing:
            found.append(f"the session is named by {self.addressing}, not the path")
        if self.creation != reference.creation:
            found.append(IMPLICIT_CREATION)
        if self.create.status != reference.create.status:
            found.append(f"create answers {self.create.status}, not 201")
        if not self.default_lifecycle:
            found.append(self.lifecycle_in_words())
        if self.read.once:
            found.append(READ_ONCE)
        if self.health_path != reference.health_path:
            found.append(f"health route {self.health_path or 'none'}, not /healthz")
        if self.trajectory.tree:
            found.append(TREE)
        if self.trajectory.log:
            found.append(LOG)
        if self.trajectory.source != reference.trajectory.source:
            found.append("the trajectory is derived from records")
        if self.trajectory.num_assistant is None:
            found.append("GET shows no count of turns")
        elif self.trajectory.num_assistant not in (
            reference.trajectory.num_assistant,
            "len(records)",
        ):
            found.append(f"the number of turns is read from {self.trajectory.num_assistant}")
        if self.appends_tool_results:
            found.append("only tool messages may follow an assistant turn")
        if self.retry != reference.retry:
            found.append(
                "an exact retry regenerates instead of replaying"
                if self.retry == "regenerate"
                else "an exact retry is refused (state unchanged)"
            )
        if self.upstream_failures != reference.upstream_failures:
            found.append(PASSED_THROUGH)
        if self.aborted_completions != reference.aborted_completions:
            found.append(ABORTS_COMMITTED)
        if self.rollback != reference.rollback:
            found.append(ROLLED_BACK)
        if self.streaming != reference.streaming:
            found.append(BUFFERED if self.streaming == "buffered" else STREAMING_UNSUPPORTED)
        if self.closed_status != reference.closed_status:
            shown = " or ".join(str(code) for code in self.closed_status)
            found.append(f"a closed session answers {shown}, not 404")
        if self.rejected_status != reference.rejected_status:
            found.append(f"rejected requests answer {self.rejected_status}, not 409")
        if self.error_shape == "string":
            found.append("errors are plain strings, not OpenAI-shaped")
        elif self.error_shape == "detail":
            found.append('errors are FastAPI\'s {"detail": ...}, not OpenAI-shaped')
        return found


READ_ONCE = "the read is an export: once, after the end, and it removes the session"

LOG = "every call is a record: nothing is refused for its history"

ABORTS_COMMITTED = "aborted completions are answered 200 and committed, not retried"
"""The convention's label: ``finish_reason: abort`` reaches the agent and the trajectory."""

PASSED_THROUGH = "upstream failures are passed through, not retried"
"""The convention's label: the server hands abort/503s to the agent, state unchanged."""

IMPLICIT_CREATION = "sessions are created implicitly, by the first request that names them"

BUFFERED = "streams are buffered: chunks come only once the whole answer is there"

STREAMING_UNSUPPORTED = "stream: true is refused"

REFUSED_RETRY = "an exact retry is refused (state unchanged)"

ROLLED_BACK = "a request that differs in its last turn rolls that turn back"

TREE = "the trajectory is a tree: a divergent turn starts a branch"

REFERENCE_PROFILE = Profile()


@dataclass(frozen=True)
class TrajectoryState:
    messages: list[dict[str, Any]] | None
    """The trajectory (on a tree, the active path; on a log, the last record's)."""
    num_assistant: int | None
    in_flight: bool | None
    turns: list[list[dict[str, Any]]] | None = None
    """A tree or a log: every committed turn (record), each as its whole path (its
    request's messages, then its answer); None on a linear model, or if unreadable."""
    record_count: int | None = None
    """A log: how many records the read lists, even where they cannot be read as
    messages (token ids only, say)."""

    def has_turn(self, path: list[dict[str, Any]]) -> bool:
        """Is the turn whose whole path is ``path`` committed (in some branch)?"""
        return self.times_recorded(path) > 0

    def times_recorded(self, path: list[dict[str, Any]]) -> int:
        """How many committed turns (records) have ``path`` as their whole path."""
        wanted = keys_of(path)
        return sum(1 for turn in self.turns or [] if keys_of(turn) == wanted)


def lookup(value: Any, dotted: str) -> Any:
    """The value at a dotted path (``response.choices.0.message``); None if absent."""
    for key in dotted.split(".") if dotted else []:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _records_in(body: Any, convention: TrajectoryConvention) -> list[Any] | None:
    listed = lookup(body, convention.records)
    if isinstance(listed, dict):
        return list(listed.values())
    return listed if isinstance(listed, list) else None


@dataclass(frozen=True)
class RouteCall:
    """One call of a session's lifecycle, filled in: what to send (the harness's
    clients, trio's and the load workers', each send it their own way)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


def route_call(route: Route, values: dict[str, str]) -> RouteCall:
    """``route`` with its placeholders filled from ``values``."""
    return RouteCall(
        route.method,
        fill(route.path, values),
        {name: fill(value, values) for name, value in route.headers.items()},
        fill(route.body, values) if route.body is not None else None,
    )


def id_at(body: Any, path: str) -> str | None:
    """The id a create's answer holds at ``path`` (a string, or a number)."""
    value = lookup(body, path)
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


AGENT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "sessctl_step",
            "description": "Run the next step of the scenario.",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
"""The tools an agent declares where the profile appends tool results."""


def next_message(profile: Profile, base: list[dict[str, Any]], text: str) -> dict[str, Any]:
    """A user message; or, where the profile allows only tool results after an
    assistant turn, the result of the tool call that turn made."""
    last = base[-1] if base else None
    calls = last.get("tool_calls") if last and last.get("role") == "assistant" else None
    if profile.appends_tool_results and isinstance(calls, list) and calls:
        return {"role": "tool", "tool_call_id": calls[0].get("id"), "content": text}
    return {"role": "user", "content": text}


def read_trajectory(profile: Profile, body: Any, turns_body: Any = None) -> TrajectoryState:
    """The committed trajectory in a GET body, read the way the profile says;
    ``turns_body``: the answer of the profile's ``turns_path``, if it has one."""
    if not isinstance(body, dict):
        return TrajectoryState(None, None, None)
    convention = profile.trajectory
    records = _records_in(body, convention)
    in_flight = body.get("in_flight") if isinstance(body.get("in_flight"), bool) else None
    if profile.api == "anthropic-messages" and isinstance(body.get("messages"), list):
        body = {**body, "messages": messages_to_chat(body["messages"])}
    num_assistant: int | None = None
    if convention.num_assistant == "len(records)" or convention.log:
        num_assistant = len(records) if records is not None else None
    elif convention.num_assistant is not None:
        value = body.get(convention.num_assistant)
        num_assistant = value if isinstance(value, int) else None
    turns = None
    if convention.tree or convention.log:
        listed: Any = records
        if convention.turns_path is not None:
            listed = turns_body
            if isinstance(listed, dict) and isinstance(listed.get("records"), list):
                listed = listed["records"]
        turns = _turns_from_records(listed if isinstance(listed, list) else None, profile)
    count = len(records) if convention.log and records is not None else None
    if convention.source == "messages":
        messages = body.get("messages")
        return TrajectoryState(
            messages if isinstance(messages, list) else None, num_assistant, in_flight, turns
        )
    if convention.log:
        last = (turns[-1] if turns else []) if turns is not None else None
        return TrajectoryState(last, num_assistant, in_flight, turns, count)
    return TrajectoryState(
        _path_of_record(records[-1], profile) if records else ([] if records == [] else None),
        num_assistant,
        in_flight,
        turns,
    )


def _turns_from_records(
    records: list[Any] | None, profile: Profile
) -> list[list[dict[str, Any]]] | None:
    if records is None:
        return None
    paths = [_path_of_record(record, profile) for record in records]
    return None if any(path is None for path in paths) else [p for p in paths if p is not None]


def _path_of_record(record: Any, profile: Profile) -> list[dict[str, Any]] | None:
    """A record's whole path: its request's messages, then its answer (an OpenAI
    choice's message, or an Anthropic message, translated to chat form)."""
    convention = profile.trajectory
    request_messages = lookup(record, convention.record_messages)
    answer = lookup(record, convention.record_answer)
    if answer is None and isinstance(record, dict) and isinstance(record.get("response"), dict):
        response = record["response"]
        answer = message_to_chat(response) if response.get("type") == "message" else None
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if isinstance(answer, dict) and answer.get("type") == "message":
        answer = message_to_chat(answer)
    if not isinstance(request_messages, list) or not isinstance(answer, dict):
        return None
    if profile.api == "anthropic-messages":
        request_messages = messages_to_chat(request_messages)
    return [*request_messages, answer]


def _with_field(body: dict[str, Any], keys: list[str], value: str) -> dict[str, Any]:
    """``body`` with ``value`` at the dotted path ``keys`` (objects made on the way)."""
    head, *rest = keys
    inner = body.get(head)
    if rest:
        return {**body, head: _with_field(inner if isinstance(inner, dict) else {}, rest, value)}
    return {**body, head: value}


def load_profile(spec: str | None) -> Profile:
    """A profile file, or the name of a built-in one; None is the reference profile."""
    from .loader import load_model

    if spec is None:
        return REFERENCE_PROFILE
    builtin = builtin_profiles()
    path = builtin[spec] if spec in builtin else Path(spec)
    if not path.is_file():
        raise UsageError(
            f"--profile {spec!r}: no such file, and not a built-in profile "
            f"({', '.join(sorted(builtin))})"
        )
    return load_model(path, Profile)
