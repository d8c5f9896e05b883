"""``sessctl profile check``: probe a server and suggest the profile that fits it.

It is a short conversation with the server, wired to the chaos upstream like a
scenario run, that answers each question of the profile in turn:

1. Is there a health route (/healthz, or /health)?
2. What does POST /sessions answer, and under which key is the id? Where it is
   absent, do the routes of a known shape answer (AReaL's ``rl/start_session``
   after ``grant_capacity``)? Then that shape's built-in profile is suggested,
   checked end to end where its admin key is in the environment.
3. Does GET /sessions/{id} carry ``messages``, or ``records`` to derive them from?
4. May a user message follow an assistant turn, or only a tool result?
5. Does an exact retry of the last turn replay it (no upstream call), regenerate
   it, or refuse it? Is an exact retry of the *first* turn refused?
6. How is a conflicting request rejected: which status, which error shape? One
   that is accepted may be a branch: if GET's records or a route such as
   ``/sessions/{id}/turns`` then lists both turns, the trajectory is a tree; if
   GET's records also hold the exactly retried turn twice, every call is a record
   (a log).
7. Is a retryable upstream failure (a 503) retried, or passed to the agent?
8. Is ``stream: true`` relayed chunk by chunk, buffered (the answer comes in one
   go once the engine is done), or refused?
9. What does a deleted session answer (404, or 410, 409, 503)?
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import trio

from harness.errors import TargetUnreachable, UsageError
from harness.model.builtin_profiles import builtin_profiles
from harness.model.loader import load_model
from harness.model.messages import message_key
from harness.model.profile import (
    AGENT_TOOLS,
    CreateConvention,
    EngineConvention,
    Profile,
    TrajectoryConvention,
)
from harness.results import Observation, StreamEnd, answer_of, describe
from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind, marker, parse_behaviour
from wire.engine import Flavor
from wire.ids import new_session_id

from .checks import last_turn_start
from .client import StreamProgress, TargetClient
from .lifecycle import Lifecycle
from .preflight import check_session_server, wait_until_up

HEALTH_ROUTES = ("/healthz", "/health")


@dataclass(frozen=True)
class ProbeOptions:
    request_timeout: float = 10.0
    target_wait: float = 5.0
    flavor: Flavor = "openai"


@dataclass
class ProbeResult:
    profile: Profile
    notes: list[str] = field(default_factory=list)
    unprobed: list[str] = field(default_factory=list)
    """What could not be learned, each with the answer that stopped it: the
    profile keeps the reference's value there. Empty: a complete profile."""

    @property
    def partial(self) -> bool:
        return bool(self.unprobed)


ADDRESSINGS = (
    Profile(),
    Profile(addressing="bearer"),
    Profile(addressing="bearer", chat_path="/chat/completions"),
    Profile(addressing="header:X-Session-ID"),
    Profile(addressing="body:metadata.session_id"),
    Profile(addressing="body:session_id"),
    Profile(api="anthropic-messages"),
    Profile(api="anthropic-messages", addressing="header:x-api-key"),
)
"""Where sessions are named, and which API names them, in the order ``profile
check`` tries them: the path, then the published designs where the agent's base
URL is the engine's own (``/v1``) or the server's root; then Anthropic's Messages
API, in the path or in the API key (the ``x-api-key`` header its SDK sends)."""


@dataclass
class _Probe:
    client: TargetClient
    chaos: ChaosUpstream
    notes: list[str] = field(default_factory=list)
    unprobed: list[str] = field(default_factory=list)
    turns: int = 0
    addressing: Profile = field(default_factory=Profile)
    """Where chats name the session (and how sessions are created), once found."""
    id_field: str = "session_id"

    async def chat(
        self, session_id: str, messages: list[dict[str, Any]], *, tools: bool = False
    ) -> Observation:
        body: dict[str, Any] = {"model": "sessctl-probe", "messages": messages}
        if tools:
            body["tools"] = AGENT_TOOLS
        path, headers, body = self.addressing.chat_request(session_id, body)
        return await self.client.send(
            "probe", "chat", "POST", path, json_body=body, headers=headers
        )

    async def new_session(self) -> str:
        """A fresh session: created, or (implicit creation) an id made up."""
        if self.addressing.creation == "implicit":
            return new_session_id()
        created, id_field = await self.create()
        return str(created.body[id_field])

    def user(self, text: str) -> tuple[str, dict[str, Any]]:
        self.turns += 1
        tag = f"probe.{self.turns}"
        return tag, {"role": "user", "content": f"{text} {marker(tag)}"}

    async def create(self, created: Observation | None = None) -> tuple[Observation, str]:
        if created is None:
            created = await self.client.send("probe", "create", "POST", "/sessions")
        body = created.body if isinstance(created.body, dict) else {}
        if created.status is None or created.status // 100 != 2:
            raise TargetUnreachable(
                f"not a session server: POST /sessions answered {_shown(created)}"
            )
        id_field = "session_id" if "session_id" in body else _id_like_field(body)
        if id_field is None:
            raise TargetUnreachable(
                f"not a session server: POST /sessions answered {_shown(created)}, "
                "and no field of it looks like an id"
            )
        return created, id_field


async def probe_profile(client: TargetClient, chaos: ChaosUpstream) -> ProbeResult:
    probe = _Probe(client, chaos)
    health_path: str | None = None
    for candidate in HEALTH_ROUTES:
        health = await client.send("probe", "get", "GET", candidate)
        if health.status is not None and health.status // 100 == 2:
            health_path = candidate
            break
        probe.notes.append(f"GET {candidate} answered {_shown(health)}")
    if health_path is None:
        probe.notes.append(f"no health route ({' or '.join(HEALTH_ROUTES)})")

    created = await probe.client.send("probe", "create", "POST", "/sessions")
    explicit = created.status is not None and created.status // 100 == 2
    if not explicit and created.status in (404, 405):
        known = await _known_lifecycle(probe, chaos, health_path)
        if known is not None:
            return known
    if explicit:
        created, id_field = await probe.create(created)
        session_id = str(created.body[id_field])
    else:
        probe.notes.append(
            f"POST /sessions answered {_shown(created)}: sessions may be created by their "
            "first request (creation: implicit); trying made-up ids"
        )
        id_field = "session_id"
        session_id = new_session_id()
    tag, first = probe.user("probe turn one")
    answer = await _first_turn(probe, session_id, first, tag, explicit=explicit)

    state = await client.send("probe", "get", "GET", f"/sessions/{session_id}")
    trajectory = _trajectory_convention(probe, state)

    # May a user message follow an assistant turn?
    messages: list[dict[str, Any]] = [first, answer]
    next_tag, follow_up = probe.user("probe turn two")
    second = await probe.chat(session_id, [*messages, follow_up])
    appends: list[Any] = ["user", "tool"]
    tools = False
    history: tuple[str, list[dict[str, Any]], str] | None = None
    if second.status == 200 and (second_answer := answer_of(second)) is not None:
        history = session_id, [*messages, follow_up, second_answer], next_tag
    else:
        probe.notes.append(f"a user message after an assistant turn got {_shown(second)}")
        history = await _try_tool_results(probe)
        appends, tools = ["tool"], True
        if history is None:
            appends = ["user", "tool"]
            probe.unprobed.append(
                "what may follow an assistant turn (append_after_assistant), and with it "
                "retry, rollback, rejected_status and error_shape: no second turn was accepted"
            )
    retry: Literal["replay", "regenerate", "refuse"] = "replay"
    rollback: Literal["none", "one-step"] = "none"
    rejected_status = 409
    error_shape: Literal["openai", "string", "detail"] = "openai"
    if history is not None:
        session_id, messages, last_tag = history
        retry, rollback, rejected_status, error_shape, trajectory = await _multi_turn(
            probe, session_id, messages, last_tag, tools, trajectory
        )
    await client.send("probe", "delete", "DELETE", f"/sessions/{session_id}")
    closed = await client.send("probe", "get", "GET", f"/sessions/{session_id}")
    closed_status = [404]
    if closed.status is not None and 400 <= closed.status <= 599 and closed.status != 404:
        closed_status = [closed.status]
        probe.notes.append(f"a GET of a deleted session answered {_shown(closed)}")
    upstream_failures = await _upstream_failures(probe, id_field, tools)
    streaming = await _streaming(probe, id_field, tools)
    profile = Profile(
        name="suggested",
        description=f"suggested by sessctl profile check against {client.base_url}",
        api=probe.addressing.api,
        addressing=probe.addressing.addressing,
        chat_path=probe.addressing.chat_path,
        creation=probe.addressing.creation,
        create=CreateConvention(
            status=created.status if explicit and created.status else 201, id_field=id_field
        ),
        health_path=health_path,
        trajectory=trajectory,
        append_after_assistant=appends,
        retry=retry,
        upstream_failures=upstream_failures,
        rollback=rollback,
        rejected_status=rejected_status,
        closed_status=closed_status,
        error_shape=error_shape,
        streaming=streaming,
        engine=EngineConvention(
            tool_call_content="empty" if chaos.tool_call_content == "" else "null"
        ),
    )
    return ProbeResult(profile, probe.notes, probe.unprobed)


async def _known_lifecycle(
    probe: _Probe, chaos: ChaosUpstream, health_path: str | None
) -> ProbeResult | None:
    """A server with no ``POST /sessions`` whose routes are those of a known shape
    (a built-in profile with lifecycle routes of its own, AReaL's proxy among
    them): that profile, checked end to end if its admin key is in the
    environment; None if no known shape answers."""
    for name, path in sorted(builtin_profiles().items()):
        shape = load_model(path, Profile)
        if shape.default_lifecycle:
            continue
        signature = [*shape.create.before, shape.create]
        answers = [
            await probe.client.send("probe", "create", route.method, route.path)
            for route in signature
        ]
        if any(a.status is None or a.status in (404, 405) for a in answers):
            continue
        seen = ", ".join(
            f"{r.describe()} {_shown(a)}" for r, a in zip(signature, answers, strict=True)
        )
        probe.notes.append(
            f"POST /sessions is absent, but the routes of a known shape answer ({seen}): "
            f"{shape.description} (the built-in profile {name!r})"
        )
        suggested = shape.model_copy(
            update={
                "name": "suggested",
                "description": f"suggested by sessctl profile check against "
                f"{probe.client.base_url}: {shape.description}",
                "health_path": health_path,
            }
        )
        try:
            suggested.admin_key()
        except UsageError:
            probe.unprobed.append(
                f"whether a session can be made, chatted on, ended and read with these "
                f"routes: that needs the admin key; set {shape.admin_key_env} and run "
                "profile check again (the rest is the built-in profile's, as read from "
                "that server's code)"
            )
            return ProbeResult(suggested, probe.notes, probe.unprobed)
        problem = await check_session_server(probe.client, chaos, suggested)
        if problem is None:
            probe.notes.append(
                "checked: a session was made, a chat on it reached the chaos upstream, "
                "and it was ended and read with these routes"
            )
        else:
            probe.unprobed.append(f"a session's life with these routes: {problem}")
        return ProbeResult(suggested, probe.notes, probe.unprobed)
    return None


async def _multi_turn(
    probe: _Probe,
    session_id: str,
    messages: list[dict[str, Any]],
    last_tag: str,
    tools: bool,
    trajectory: TrajectoryConvention,
) -> tuple[
    Literal["replay", "regenerate", "refuse"],
    Literal["none", "one-step"],
    int,
    Literal["openai", "string", "detail"],
    TrajectoryConvention,
]:
    """On a session with two committed turns: what an exact retry, a rewound last
    turn and a stranger's first turn do."""
    chaos = probe.chaos
    # Replay or regenerate? Count upstream calls for an exact retry of the last turn.
    calls_before = chaos.calls(last_tag)
    retried = await probe.chat(session_id, messages[:-1], tools=tools)
    if retried.status != 200:
        probe.notes.append(f"an exact retry of the last turn got {_shown(retried)}")
    retry: Literal["replay", "regenerate", "refuse"] = (
        "refuse"
        if retried.status is not None and 400 <= retried.status < 500
        else "replay"
        if chaos.calls(last_tag) == calls_before
        else "regenerate"
    )

    # Does a request that differs only in the last turn replace it (a rollback)?
    rollback: Literal["none", "one-step"] = "none"
    if not tools:
        _, rewound = probe.user("a rewound last turn")
        rewind = await probe.chat(session_id, [*messages[: last_turn_start(messages)], rewound])
        if rewind.status is not None and rewind.status // 100 == 2:
            rollback = "one-step"  # noted below, unless it turns out to be a branch

    # How is a conflicting request rejected? Or is it a branch of a tree?
    _, stranger = probe.user("a different first turn")
    conflict = await probe.chat(session_id, [stranger], tools=tools)
    rejected_status = 409
    branch = answer_of(conflict)
    if conflict.status is not None and 400 <= conflict.status < 500:
        rejected_status = conflict.status
    elif conflict.status is not None and conflict.status // 100 == 2 and branch is not None:
        tree = await _tree_convention(probe, session_id, trajectory, [messages, [stranger, branch]])
        log = (
            await _log_convention(probe, session_id, tree)
            if tree is not None and retry == "regenerate"
            else None
        )
        if log is not None:
            trajectory, rollback = log, "none"  # a rewound turn was one more record
            probe.notes.append(
                "a request that diverges from the committed trajectory was accepted, and the "
                "exact retry of a turn is a second record of it in GET's records: every call "
                "is a record (trajectory model: log)"
            )
        elif tree is not None:
            trajectory, rollback = tree, "none"  # a rewound turn was a branch too
            listed = tree.turns_path or "GET's records"
            probe.notes.append(
                f"a request that diverges from the committed trajectory started a branch, "
                f"and both turns are listed ({listed}): the trajectory is a tree"
            )
        else:
            probe.notes.append(
                f"a request that diverges from the committed trajectory was accepted "
                f"({_shown(conflict)}), but no list of every turn was found (GET's records, "
                f"{', '.join(TURN_LISTS)}): if the server keeps branches, set trajectory.model: "
                "tree and turns_path; as suggested, concurrent and stale writers will FAIL"
            )
    else:
        probe.notes.append(f"a conflicting request got {_shown(conflict)}, not a 4xx")
    if rollback == "one-step":
        probe.notes.append("a request that differs in its last turn replaced that turn")
    body = conflict.body if isinstance(conflict.body, dict) else {}
    error_shape: Literal["openai", "string", "detail"] = "openai"
    if isinstance(body.get("error"), str):
        error_shape = "string"
    elif "error" not in body and isinstance(body.get("detail"), str):
        error_shape = "detail"
    return retry, rollback, rejected_status, error_shape, trajectory


async def _streaming(
    probe: _Probe, id_field: str, tools: bool
) -> Literal["relay", "buffered", "unsupported"]:
    """On a fresh session: a streamed chat whose upstream holds after its first
    chunk. The client has that chunk while the upstream holds: relayed. The
    server asked the engine for a whole answer, or sent nothing while it held:
    buffered. A 4xx: unsupported."""
    session_id = await probe.new_session()
    tag, first = probe.user("probe a stream")
    probe.chaos.script(tag, [parse_behaviour({"chunks": 3, "hold_after": 1})])
    body: dict[str, Any] = {"model": "sessctl-probe", "messages": [first], "stream": True}
    if tools:
        body["tools"] = AGENT_TOOLS
    progress = StreamProgress()
    turn: Observation | None = None
    relayed = False
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            nonlocal turn
            path, headers, addressed = probe.addressing.chat_request(session_id, body)
            turn = await probe.client.send_stream(
                "probe", path, addressed, progress, headers=headers
            )

        async def held_chunk_arrives() -> None:
            nonlocal relayed
            await probe.chaos.wait_for(tag, EventKind.SENT)
            with trio.move_on_after(min(probe.client.timeout, 3.0)):
                await progress.wait_for("chunks", 1)
            relayed = progress.chunks >= 1 and probe.chaos.count(tag, EventKind.SENT) == 1
            probe.chaos.release(tag)

        async def whole_answer_asked() -> None:
            await probe.chaos.wait_for(tag, EventKind.RECEIVED)
            if not probe.chaos.streamed_calls.get(tag):
                probe.chaos.release(tag)

        nursery.start_soon(send)
        nursery.start_soon(held_chunk_arrives)
        nursery.start_soon(whole_answer_asked)
        await progress.wait_for("chunks", 10**9)  # returns when the stream has ended
        nursery.cancel_scope.cancel()
    await probe.client.send("probe", "delete", "DELETE", f"/sessions/{session_id}")
    assert turn is not None
    if turn.status is not None and 400 <= turn.status < 500:
        probe.notes.append(f"stream: true was refused ({_shown(turn)})")
        return "unsupported"
    if relayed:
        return "relay"
    if turn.stream is not None and turn.stream.end is StreamEnd.NOT_STREAMED:
        probe.notes.append("stream: true was answered with one JSON completion, not a stream")
    else:
        probe.notes.append(
            "a streamed answer came in one go once the engine was done (a buffered stream)"
        )
    return "buffered"


async def _first_turn(
    probe: _Probe, session_id: str, first: dict[str, Any], tag: str, *, explicit: bool
) -> dict[str, Any]:
    """Send the first turn, naming the session each way in ``ADDRESSINGS`` until one
    is answered 2xx by way of the chaos upstream; that one is the server's."""
    creation: Literal["explicit", "implicit"] = "explicit" if explicit else "implicit"
    refusals: dict[str, list[str]] = {}
    """Each answer once, with every way of naming the session that got it."""
    for candidate in ADDRESSINGS:
        probe.addressing = candidate.model_copy(update={"creation": creation})
        calls = probe.chaos.calls(tag)
        turn = await probe.chat(session_id, [first])
        answer = answer_of(turn)
        if turn.status == 200 and answer is not None and probe.chaos.calls(tag) > calls:
            if candidate.addressing != "path" or not explicit or candidate.api != "openai-chat":
                probe.notes.append(
                    f"the first chat went through with the session named by "
                    f"{candidate.addressing} at {candidate.resolved_chat_path} ({candidate.api})"
                )
            return answer
        if turn.status == 200 and answer is not None:
            raise TargetUnreachable(
                f"the server answered a chat without calling the chaos upstream at "
                f"{probe.chaos.url}; start it with that as its LLM upstream"
            )
        if probe.chaos.calls(tag) > calls:
            raise TargetUnreachable(
                f"the first chat (one user turn on a fresh session) answered {_shown(turn)}; "
                "it did call the chaos upstream: another dialect (--flavor)?"
            )
        way = f"{candidate.addressing} at {candidate.resolved_chat_path}"
        refusals.setdefault(_shown(turn), []).append(way)
    answers = "; ".join(
        f"{', '.join(ways)}: {answer}" if len(refusals) > 1 else answer
        for answer, ways in refusals.items()
    )
    raise TargetUnreachable(
        "the first chat (one user turn on a fresh session) was refused whichever way the "
        f"session was named ({len(ADDRESSINGS)} ways): {answers}"
    )


async def _upstream_failures(
    probe: _Probe, id_field: str, tools: bool
) -> Literal["retry", "pass-through"]:
    """On a fresh session: the first call of a turn fails with 503, the next would
    answer. Two calls and a 2xx: retried. One call and the failure: passed through.
    Also: is an exact retry of that first turn refused?"""
    session_id = await probe.new_session()
    tag, first = probe.user("probe an upstream 503")
    probe.chaos.script(tag, [parse_behaviour({"status": 503}), parse_behaviour("respond")])
    turn = await probe.chat(session_id, [first], tools=tools)
    calls = probe.chaos.calls(tag)
    found: Literal["retry", "pass-through"] = "retry"
    committed = turn.status is not None and turn.status // 100 == 2
    if (
        not committed
        and calls == 1
        and turn.status is not None
        and (turn.status == 429 or turn.status >= 500)
    ):
        found = "pass-through"
        probe.notes.append(f"an upstream 503 was passed to the agent ({_shown(turn)}), not retried")
        again = await probe.chat(session_id, [first], tools=tools)  # as its agent would
        committed = again.status is not None and again.status // 100 == 2
    elif not committed:
        probe.notes.append(
            f"a turn whose first upstream call failed with 503 got {_shown(turn)} "
            f"after {calls} call(s)"
        )
    if committed:
        retried = await probe.chat(session_id, [first], tools=tools)
        if retried.status is not None and 400 <= retried.status < 500:
            probe.notes.append(
                f"an exact retry of the first turn is refused ({_shown(retried)}); "
                "later turns may differ"
            )
    await probe.client.send("probe", "delete", "DELETE", f"/sessions/{session_id}")
    return found


async def _try_tool_results(probe: _Probe) -> tuple[str, list[dict[str, Any]], str] | None:
    """On a fresh session: offer a tool, then answer the tool call with its result.
    A server that refuses the engine's tool call as it comes (``content: null``) is
    offered one with ``content: ""``, as some SGLang builds send it. None, with a
    note quoting the answers, if no second turn is accepted either way."""
    session_id = await probe.new_session()
    _, first = probe.user("probe with tools")
    turn = await probe.chat(session_id, [first], tools=True)
    answer = answer_of(turn)
    if not _has_tool_call(turn, answer) and probe.chaos.tool_call_content is None:
        refused = _shown(turn)
        probe.chaos.tool_call_content = ""
        _, first = probe.user("probe with tools, content empty")
        turn = await probe.chat(session_id, [first], tools=True)
        answer = answer_of(turn)
        if _has_tool_call(turn, answer):
            probe.notes.append(
                f'a tool call with content: null was refused ({refused}); with content: "" '
                "it was accepted (engine.tool_call_content: empty)"
            )
        else:
            probe.chaos.tool_call_content = None
            probe.notes.append(
                f"a chat offering a tool was refused, with the tool call's content null "
                f"({refused}) and empty ({_shown(turn)})"
            )
            return None
    elif not _has_tool_call(turn, answer):
        probe.notes.append(f"a chat offering a tool answered {_shown(turn)}")
        return None
    assert answer is not None
    calls = answer["tool_calls"]
    tag, _ = probe.user("unused")
    result = {"role": "tool", "tool_call_id": calls[0].get("id"), "content": f"ok {marker(tag)}"}
    second = await probe.chat(session_id, [first, answer, result], tools=True)
    second_answer = answer_of(second)
    if second.status != 200 or second_answer is None:
        probe.notes.append(
            f"neither a user message nor a tool result may follow an assistant turn "
            f"(the tool result got {_shown(second)})"
        )
        return None
    probe.notes.append("a tool result after an assistant turn was accepted")
    return session_id, [first, answer, result, second_answer], tag


def _has_tool_call(turn: Observation, answer: dict[str, Any] | None) -> bool:
    calls = answer.get("tool_calls") if answer else None
    return turn.status == 200 and isinstance(calls, list) and bool(calls)


TURN_LISTS = (
    "/sessions/{session}/turns",
    "/sessions/{session}/records",
    "/sessions/{session}/tree",
)
"""Routes that may list every committed turn of a tree, tried in this order."""


async def _log_convention(
    probe: _Probe, session_id: str, tree: TrajectoryConvention
) -> TrajectoryConvention | None:
    """Every call a record: GET's records hold one turn twice (the exact retry the
    server sent the engine again), which a tree, a set of turns, never does."""
    if tree.turns_path is not None:
        return None
    log = TrajectoryConvention(model="log", source="records", num_assistant=None)
    _, state = await Lifecycle(probe.client, Profile(trajectory=log)).read("probe", session_id)
    if state.turns is None:
        return None
    keys = [tuple(message_key(m) for m in turn) for turn in state.turns]
    return log if len(set(keys)) < len(keys) else None


async def _tree_convention(
    probe: _Probe,
    session_id: str,
    linear: TrajectoryConvention,
    branches: list[list[dict[str, Any]]],
) -> TrajectoryConvention | None:
    """Where a server that accepted a divergent turn lists every turn: GET's records,
    or a route of ``TURN_LISTS``; the tree convention if one lists both ``branches``."""
    for turns_path in (None, *TURN_LISTS):
        tree = TrajectoryConvention(
            model="tree",
            source="records" if turns_path is None else linear.source,
            num_assistant=linear.num_assistant,
            turns_path=turns_path,
        )
        profile = Profile(api=probe.addressing.api, trajectory=tree)
        _, state = await Lifecycle(probe.client, profile).read("probe", session_id)
        if state.turns is not None and all(state.has_turn(path) for path in branches):
            return tree
    return None


def _trajectory_convention(probe: _Probe, state: Observation) -> TrajectoryConvention:
    body = state.body if isinstance(state.body, dict) else {}
    count = (
        "num_assistant"
        if isinstance(body.get("num_assistant"), int)
        else "len(records)"
        if isinstance(body.get("records"), list)
        else None  # the server shows no count
    )
    if state.status == 200 and isinstance(body.get("messages"), list):
        return TrajectoryConvention(source="messages", num_assistant=count)
    if state.status == 200 and isinstance(body.get("records"), list):
        return TrajectoryConvention(source="records", num_assistant=count)
    shown = (
        f"answered {_shown(state)}"
        if state.status != 200
        else f"has neither messages nor records: {sorted(body)}"
    )
    probe.unprobed.append(
        f"where the trajectory is read (trajectory): GET /sessions/{{id}} {shown}"
    )
    return TrajectoryConvention()


def _id_like_field(body: dict[str, Any]) -> str | None:
    for key, value in body.items():
        if "id" in key.lower() and isinstance(value, str | int):
            return key
    return None


def _shown(observation: Observation) -> str:
    return describe(observation, limit=160)


async def check_profile(
    url: str,
    host: str,
    port: int,
    options: ProbeOptions,
    on_upstream_ready: Callable[[str], None] = lambda url: None,
) -> ProbeResult:
    chaos = ChaosUpstream(options.flavor)
    client = TargetClient(url, request_timeout=options.request_timeout, health_path=None)
    try:
        async with trio.open_nursery() as nursery:
            on_upstream_ready(await nursery.start(partial(chaos.serve, host, port)))
            problem = await wait_until_up(client, options.target_wait)
            if problem is not None:
                raise TargetUnreachable(f"{url} is unreachable: {problem}")
            try:
                return await probe_profile(client, chaos)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
