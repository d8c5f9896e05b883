"""Before any race: is the target up, a session server, and wired to our upstream?

Shared by ``run-scenarios``, ``chaos`` and ``profile check``, so that a
target that cannot be raced is exit 3 with what it answered, everywhere,
instead of a wall of confusing failures (or, worse, a VALID verdict on a
history of nothing).

In order:

1. it answers HTTP at all (any status, on the profile's health route or
   ``/``), within ``wait`` seconds of polling;
2. the profile's create (``POST /sessions`` by default, after any calls that
   must come first) answers 2xx with a JSON body holding the profile's id
   field(s): otherwise it is not a session server (or the profile is wrong);
3. one first user turn on that session answers 2xx: a server whose every
   chat fails cannot show a race, only that it fails;
4. that turn reached the chaos upstream: otherwise its answers come from
   somewhere we cannot script.

The pre-flight session is ended (and, where the read is an export, read) afterwards.
"""

from __future__ import annotations

import trio

from harness.errors import TargetUnreachable
from harness.model.profile import Profile
from harness.results import Observation, describe
from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import marker
from wire.ids import new_session_id

from .client import TargetClient
from .lifecycle import Lifecycle

POLL_INTERVAL = 0.2
"""Between probes of a target that is still starting up."""


async def wait_until_up(client: TargetClient, wait: float) -> str | None:
    """None once the target answers HTTP; else why not, after ``wait`` seconds."""
    problem = await client.probe()
    with trio.move_on_after(wait):
        while problem is not None:
            await trio.sleep(POLL_INTERVAL)
            problem = await client.probe()
    return problem


async def check_target(
    client: TargetClient,
    chaos: ChaosUpstream,
    profile: Profile,
    *,
    wait: float,
    external: bool = True,
) -> str | None:
    """None if the target can be raced; else a sentence saying what it answered.

    ``external=False`` is a reference server the harness started and wired
    itself: only that it is up is checked."""
    problem = await wait_until_up(client, wait)
    if problem is not None:
        return f"{client.base_url} is unreachable: {problem}"
    return await check_session_server(client, chaos, profile) if external else None


async def require_target(
    client: TargetClient,
    chaos: ChaosUpstream,
    profile: Profile,
    *,
    wait: float,
    external: bool = True,
) -> None:
    """``check_target``, for a command that cannot go on without the target: a
    problem is raised as TargetUnreachable (exit 3), quoting what it answered."""
    problem = await check_target(client, chaos, profile, wait=wait, external=external)
    if problem is not None:
        raise TargetUnreachable(problem)


async def check_session_server(
    client: TargetClient, chaos: ChaosUpstream, profile: Profile
) -> str | None:
    lifecycle = Lifecycle(client, profile)
    if profile.creation == "implicit":
        session_id = new_session_id()  # the chat below creates it
    else:
        made = await lifecycle.create("preflight")
        created = made.observation
        route = made.failed_before or profile.create
        if created.status is None:
            return f"{route.describe()} got no answer: {created.transport_error}"
        if made.failed_before is not None:
            return (
                f"{route.describe()}, which comes before each create, answered "
                f"{describe(created)}; expected a 2xx (is the admin key right?)"
            )
        if made.session is None:
            fields = repr(profile.create.id_field)
            if profile.create.agent_id_field is not None:
                fields += f" and {profile.create.agent_id_field!r}"
            return (
                f"not a session server: {route.describe()} answered {describe(created)}; "
                f"expected a 2xx JSON body with {fields} (if it names the id otherwise, say "
                f"so in a profile: --profile, or sessctl profile check; if sessions are created "
                f"by their first request, say creation: implicit)"
            )
        session_id = made.session
    agent = lifecycle.agent_of(session_id)
    chat, calls = await _first_turn(client, chaos, profile, agent, "preflight")
    if chat.status is not None and chat.status // 100 != 2:
        # Some servers refuse a session's first chat (a warm-up) and take the
        # next. One more try on the same session tells such a server from one
        # that can never answer; the scenarios whose first chat it refuses say
        # so, each as UNTESTED with its answer quoted.
        second, second_calls = await _first_turn(client, chaos, profile, agent, "again")
        if second.status is not None and second.status // 100 == 2:
            chat, calls = second, second_calls
    await lifecycle.end("preflight", session_id)
    if profile.read.once:
        await lifecycle.read("preflight", session_id)  # an export removes the session
    if chat.status is None:
        return f"the pre-flight chat got no answer: {chat.transport_error}"
    if chat.status // 100 != 2:
        reached = (
            f"; it did call the chaos upstream ({calls} time(s)), so it is wired, but could "
            "not use the answer: does it expect another dialect (--flavor sglang)?"
            if calls
            else f"; it never called the chaos upstream at {chaos.url}"
        )
        return (
            f"the pre-flight chat (one user turn on a fresh session) answered "
            f"{describe(chat)} to POST {_path_of(chat)}{reached}"
        )
    if calls == 0:
        return (
            f"it answered a chat without calling the chaos upstream; start it with "
            f"{chaos.url} as its LLM upstream (see --upstream-listen)"
        )
    return None


async def _first_turn(
    client: TargetClient, chaos: ChaosUpstream, profile: Profile, session_id: str, name: str
) -> tuple[Observation, int]:
    """One user turn on the session, and how many engine calls it made."""
    tag = f"{name}.{session_id}"
    path, headers, chat_body = profile.chat_request(
        session_id,
        {"model": "sessctl-chaos", "messages": [{"role": "user", "content": marker(tag)}]},
    )
    chat = await client.send(
        "preflight", "chat", "POST", path, json_body=chat_body, headers=headers
    )
    calls = chaos.calls(tag)
    chaos.forget([tag])
    return chat, calls


def _path_of(observation: Observation) -> str:
    url = observation.request.url if observation.request is not None else ""
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
