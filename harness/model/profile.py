"""Target profiles: how a server differs from docs/contract.md in its *conventions*.

A profile adapts how the harness talks to a server (where the session id is,
whether there is a health route, how to read the committed trajectory, which
roles a turn may append). It never excuses a difference: a server that answers
200 where the contract says 201 still gets a NON-STRICT finding, labelled as
declared in the profile, so ``--strict`` can fail it.

The default is ``profiles/reference.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.errors import UsageError
from wire.anthropic import chat_to_messages, message_to_chat, messages_to_chat

from .builtin_profiles import builtin_profiles
from .messages import message_key


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateConvention(_Model):
    status: int = Field(default=201, ge=200, le=299)
    id_field: str = "session_id"


class TrajectoryConvention(_Model):
    model: Literal["linear", "tree"] = "linear"
    """``linear``: one trajectory; a turn that diverges from it is refused. ``tree``:
    a divergent turn starts a branch, and concurrent writers both commit, as
    siblings; every turn answered 200 must be in some branch."""
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
        return self

    @property
    def tree(self) -> bool:
        return self.model == "tree"


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
    error_shape: Literal["openai", "string"] = "openai"
    engine: EngineConvention = EngineConvention()

    @model_validator(mode="after")
    def _closed_statuses_refuse(self) -> Profile:
        if any(not 400 <= code <= 599 for code in self.closed_status):
            raise ValueError("closed_status holds refusals: codes from 400 to 599")
        return self

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
        if self.health_path != reference.health_path:
            found.append(f"health route {self.health_path or 'none'}, not /healthz")
        if self.trajectory.tree:
            found.append(TREE)
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
        if self.error_shape != reference.error_shape:
            found.append("errors are plain strings, not OpenAI-shaped")
        return found


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
    """The trajectory (on a tree, the active path)."""
    num_assistant: int | None
    in_flight: bool | None
    turns: list[list[dict[str, Any]]] | None = None
    """A tree: every committed turn, each as its whole path (its request's
    messages, then its answer); None on a linear model, or if unreadable."""

    def has_turn(self, path: list[dict[str, Any]]) -> bool:
        """Is the turn whose whole path is ``path`` committed (in some branch)?"""
        wanted = [message_key(m) for m in path]
        return any([message_key(m) for m in turn] == wanted for turn in self.turns or [])


def read_trajectory(profile: Profile, body: Any, turns_body: Any = None) -> TrajectoryState:
    """The committed trajectory in a GET body, read the way the profile says;
    ``turns_body``: the answer of the profile's ``turns_path``, if it has one."""
    if not isinstance(body, dict):
        return TrajectoryState(None, None, None)
    records = body.get("records") if isinstance(body.get("records"), list) else None
    in_flight = body.get("in_flight") if isinstance(body.get("in_flight"), bool) else None
    convention = profile.trajectory
    if profile.api == "anthropic-messages" and isinstance(body.get("messages"), list):
        body = {**body, "messages": messages_to_chat(body["messages"])}
    num_assistant: int | None = None
    if convention.num_assistant == "len(records)":
        num_assistant = len(records) if records is not None else None
    elif convention.num_assistant is not None:
        value = body.get(convention.num_assistant)
        num_assistant = value if isinstance(value, int) else None
    turns = None
    if convention.tree:
        listed = turns_body if convention.turns_path is not None else records
        if isinstance(listed, dict) and isinstance(listed.get("records"), list):
            listed = listed["records"]
        turns = _turns_from_records(listed if isinstance(listed, list) else None, profile)
    if convention.source == "messages":
        messages = body.get("messages")
        return TrajectoryState(
            messages if isinstance(messages, list) else None, num_assistant, in_flight, turns
        )
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
    try:
        request_messages = record["request"]["messages"]
        response = record["response"]
        answer = (
            message_to_chat(response)
            if isinstance(response, dict) and response.get("type") == "message"
            else response["choices"][0]["message"]
        )
    except (KeyError, IndexError, TypeError):
        return None
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
