"""A session's life, the profile's way: made (after any calls that must come
first), chatted on under the id the agent is given, ended, and read.

The contract's routes (``POST /sessions``, ``DELETE`` and ``GET
/sessions/{id}``) are only the default. A server such as AReaL's proxy grants
capacity, then starts a session with an admin key and answers two ids: the
``session_id`` that ends and exports it, and an ``api_key`` the agent chats
with. Everything that creates, ends or reads a session goes through here, so
that scenarios, pre-flight and chaos never name a route themselves.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from harness.model.profile import (
    Profile,
    Route,
    TrajectoryState,
    id_at,
    read_trajectory,
    route_call,
)
from harness.results import Observation

from .client import TargetClient


@dataclass(frozen=True)
class Created:
    observation: Observation
    """The create's answer, or that of the first call before it that failed."""
    session: str | None
    """The id that ends and reads the session; None if none was made."""
    agent: str | None
    """The id the agent chats with (the same as ``session`` unless the profile
    says where the answer holds another)."""
    failed_before: Route | None = None
    """The call before the create that did not answer 2xx, if one did not."""


class Lifecycle:
    def __init__(self, client: TargetClient, profile: Profile) -> None:
        self.client = client
        self.profile = profile
        self._admin_key = profile.admin_key()
        if self._admin_key is not None and profile.admin_key_env is not None:
            client.secrets[self._admin_key] = f"${profile.admin_key_env}"
        self._agents: dict[str, str] = {}

    def agent_of(self, session: str) -> str:
        """The id the agent addresses its chats with, for the session ``session``."""
        return self._agents.get(session, session)

    async def create(self, step: str) -> Created:
        convention = self.profile.create
        values = self._values(task=f"sessctl-{secrets.token_hex(6)}")
        for route in convention.before:
            before = await self._call(step, "create", route, values)
            if before.status is None or before.status // 100 != 2:
                return Created(before, None, None, failed_before=route)
        observation = await self._call(step, "create", convention, values)
        session = _id_at(observation, convention.id_field)
        agent = session
        if convention.agent_id_field is not None:
            agent = _id_at(observation, convention.agent_id_field)
        if session is None or agent is None:
            return Created(observation, None, None)
        self._agents[session] = agent
        return Created(observation, session, agent)

    async def end(
        self, step: str, session: str, *, on_sent: Callable[[], None] | None = None
    ) -> Observation:
        """End ``session``; ``on_sent`` is called as the request's first bytes go out."""
        return await self._call(
            step, "delete", self.profile.end, self._values(session=session), on_sent=on_sent
        )

    async def read(self, step: str, session: str) -> tuple[Observation, TrajectoryState]:
        """Read a session's trajectory the profile's way. A tree whose read shows
        only the active path is listed whole by its ``turns_path``, read just
        after (on a 200): its turns are those of that second answer."""
        profile = self.profile
        observation = await self._call(step, "get", profile.read, self._values(session=session))
        turns_path = profile.trajectory.turns_path
        turns_body = None
        if turns_path is not None and observation.status == 200:
            listed = await self.client.send(
                step, "get", "GET", turns_path.replace("{session}", session)
            )
            turns_body = listed.body if listed.status == 200 else None
            # The read lasts until the list is in: a turn may commit between the two.
            observation = replace(observation, ended=listed.ended)
        return observation, read_trajectory(profile, observation.body, turns_body)

    def _values(self, *, session: str | None = None, task: str | None = None) -> dict[str, str]:
        values: dict[str, str] = {}
        if session is not None:
            values["session"] = session
            values["agent"] = self.agent_of(session)
        if task is not None:
            values["task"] = task
        if self._admin_key is not None:
            values["admin_key"] = self._admin_key
        return values

    async def _call(
        self,
        step: str,
        op: str,
        route: Route,
        values: dict[str, str],
        on_sent: Callable[[], None] | None = None,
    ) -> Observation:
        call = route_call(route, values)
        return await self.client.send(
            step,
            op,
            call.method,
            call.path,
            json_body=call.body,
            headers=call.headers or None,
            on_sent=on_sent,
        )


def _id_at(observation: Observation, path: str) -> str | None:
    if observation.status is None or observation.status // 100 != 2:
        return None
    return id_at(observation.body, path)
