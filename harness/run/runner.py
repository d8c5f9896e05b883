"""Running one scenario once against one target.

Order is forced, never hoped for: a race is set up by holding a chat at the
chaos upstream (``upstream: hold``), waiting for the upstream to *receive* it
(``wait: c1.received``), doing the racing operation, and releasing. Every
wait has a timeout, so a server that never forwards a call fails the step
instead of hanging the run.

After the steps: upstream-event expectations are checked while holds are
still in place (so a leaked call cannot be mistaken for an answered one),
then this run's holds are released, background steps are awaited, and the
final trajectories are read for the durability checks.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import trio

from harness.model.profile import (
    AGENT_TOOLS,
    PASSED_THROUGH,
    REFERENCE_CHAT_PATH,
    REFERENCE_PROFILE,
    Profile,
    next_message,
)
from harness.model.scenario import (
    AwaitStep,
    CancelStep,
    ChatStep,
    CreateStep,
    DeleteStep,
    GetStep,
    GhostStep,
    ReleaseStep,
    RequestStep,
    Scenario,
    SessionStep,
    SettleStep,
    Step,
    UpstreamExpect,
    WaitStep,
)
from harness.results import Finding, Kind, Observation, RunResult, Verdict, answer_of, describe
from harness.upstream.chaos_upstream import ChaosUpstream
from harness.upstream.script import EventKind, StepEvent, marker
from wire.ids import new_session_id

from .checks import (
    ABORT_AS_SUCCESS,
    ROLLED_BACK_DECLARED,
    abort_answered,
    abort_label,
    check_run,
    curl_line,
    declared_rollback,
    implicit_creation_excuse,
    passed_through,
    passed_through_label,
    refused_stream,
    server_fault,
    streaming_label,
    with_causes,
)
from .client import StreamProgress, TargetClient
from .context import RunContext
from .lifecycle import Created, Lifecycle


@dataclass(frozen=True)
class RunSettings:
    request_timeout: float = 10.0
    """How long one HTTP request may take before its cell reads "no answer"."""
    event_grace: float = 2.0
    """How long an expected upstream event may lag behind the HTTP answer."""
    profile: Profile = REFERENCE_PROFILE
    strict: bool = False
    """Conventions count as failures too."""
    timing_bounds: bool = False
    """Judge ``within_ms`` budgets (``--latency-budgets``). Off by default: a safety
    verdict must not depend on a wall clock a loaded CI runner can miss. The holds
    already make the race structural (a DELETE that waits for the held upstream
    never answers before the scenario's ``await`` gives up); the latency is
    reported as a figure either way."""


# Offered on every chat when the profile says only tool results may follow an
# assistant turn: the chaos upstream then answers with a call to this tool.
UNREAD_EARLIER = (
    "the read is an export: a read before the end is not judged (declared in the profile)"
)


CLEANUP_BUDGET = 5.0
"""Seconds a run may spend after its steps: upstream expectations (within their
grace), released holds answering, the final trajectories read."""


class _Abort(Exception):
    """Stop the remaining steps of this run; the finding says why.

    ``untested``: the race was never placed (a setup step answered otherwise, a
    wait that places it never filled), so the finding is the run's cause of
    being UNTESTED, not a failure of the scenario's property."""

    def __init__(self, finding: Finding, *, untested: bool = False) -> None:
        super().__init__(finding.actual)
        self.finding = finding
        self.untested = untested


@dataclass
class _Background:
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)


class ScenarioRun:
    def __init__(
        self,
        scenario: Scenario,
        client: TargetClient,
        chaos: ChaosUpstream,
        index: int,
        settings: RunSettings,
    ) -> None:
        self.scenario = scenario.for_model(settings.profile.trajectory.model)
        self.client = client
        self.chaos = chaos
        self.index = index
        self.settings = settings
        self.run_id = f"{scenario.name}.{index}.{secrets.token_hex(3)}"
        # Derived from the steps once per run (this model is what it judges by).
        self._setup_steps = self.scenario.setup_steps
        self.context = RunContext()
        self.lifecycle = Lifecycle(client, settings.profile)
        self._unread: list[Finding] = []
        """Reads a scenario makes that a read-once server cannot answer yet."""
        self._background: dict[str, _Background] = {}
        self._progress: dict[str, StreamProgress] = {}
        self._nursery: trio.Nursery | None = None

    def tag(self, step_id: str) -> str:
        return f"{self.run_id}.{step_id}"

    async def run(self) -> RunResult:
        failures: list[Finding] = []
        errors: list[Finding] = []
        untested: list[Finding] = []
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            completed = True
            with trio.move_on_after(self.scenario.timeout) as deadline:
                try:
                    for step in self.scenario.steps:
                        await self._run_step(step)
                except _Abort as abort:
                    stopped = replace(abort.finding, seen_at=trio.current_time())
                    (untested if abort.untested else failures).append(stopped)
                    completed = False
            if deadline.cancelled_caught:
                completed = False
                # Every wait and request has its own bound, so a run over its
                # whole budget is a server that keeps answering too slowly.
                failures.append(
                    Finding(
                        None,
                        f"the scenario finishes within {self.scenario.timeout:g} s",
                        "it did not; the target may hang",
                        kind=Kind.FAULT,
                        label="server too slow to finish the scenario",
                        seen_at=trio.current_time(),
                    )
                )
            # The clean-up has a budget of its own, so a run takes at most
            # timeout + CLEANUP_BUDGET, however the target behaves.
            cleanup_deadline = trio.current_time() + CLEANUP_BUDGET
            with trio.move_on_at(cleanup_deadline) as cleanup:
                # After an abort only "must never happen" expectations can still be
                # judged; one that waits for something would fail only because the
                # steps that bring it about were skipped.
                if not untested:
                    counted = await self._check_upstream_expectations(positive=completed)
                    now = trio.current_time()
                    failures.extend(replace(f, seen_at=now) for f in counted)
                if self.settings.profile.read.once:
                    # As a trainer does: the export right after the end, while
                    # whatever the end did not stop is still held at the engine.
                    # A turn that answers 200 after it is missing from it.
                    await self._read_final_trajectories(ended_only=True)
                await self._wind_down()
            nursery.cancel_scope.cancel()
        with trio.move_on_at(cleanup_deadline) as final_reads:
            await self._read_final_trajectories()
        if cleanup.cancelled_caught or final_reads.cancelled_caught:
            failures.append(
                Finding(
                    None,
                    f"the run's clean-up (releasing holds, reading the final trajectories) "
                    f"within {CLEANUP_BUDGET:g} s",
                    "it did not finish; the target may hang",
                    kind=Kind.FAULT,
                    label="server stopped answering",
                    seen_at=trio.current_time(),
                )
            )
        events = [
            {"step": e.tag.rsplit(".", 1)[-1], "kind": e.kind.value, "call": e.call}
            for e in self._own_events()
        ]
        for step in self.scenario.steps:
            if isinstance(step, ChatStep) and step.retry is None:
                self.context.engine_calls[step.id] = self.chaos.calls(self.tag(step.id))
        self.chaos.forget([self.tag(s.id) for s in self.scenario.steps])

        failures.extend(
            check_run(
                self.scenario,
                self.context,
                self.settings.profile,
                timing_bounds=self.settings.timing_bounds,
                placed=not untested,
            )
        )
        for observation in self.context.observations.values():
            if observation.status is not None or observation.cancelled_by_scenario:
                continue
            if observation.minted:
                continue
            if observation.unreachable:
                errors.append(
                    Finding(
                        observation.step,
                        "a connection to the target",
                        observation.transport_error or "none",
                    )
                )
            else:
                fault = server_fault(observation, self.context.observations)
                failures.append(replace(fault, seen_at=observation.ended))
        failures = with_causes(failures, self.context.session_of_step)
        # Reads a read-once server cannot answer: what they expected is not judged
        # (a declared convention); if nothing else observed the race, it is untested.
        if self._unread and self._only_reads_observe():
            untested.extend(replace(f, kind=Kind.SAFETY, label="") for f in self._unread)
        else:
            failures.extend(self._unread)
        verdict = self._verdict(failures, errors, untested)
        return RunResult(
            self.index,
            verdict,
            dict(self.context.observations),
            failures,
            errors,
            events,
            untested,
        )

    def _verdict(
        self, failures: list[Finding], errors: list[Finding], untested: list[Finding]
    ) -> Verdict:
        if errors:
            return Verdict.ERROR
        if any(f.kind is not Kind.CONVENTION for f in failures):
            return Verdict.FAIL
        if untested:
            return Verdict.UNTESTED
        if failures and self.settings.strict:
            return Verdict.FAIL
        return Verdict.NON_STRICT if failures else Verdict.PASS

    # -- steps ----------------------------------------------------------------------

    async def _run_step(self, step: Step) -> None:
        if step.background:
            self._start_background(step)
        elif isinstance(step, WaitStep):
            await self._wait(step)
        elif isinstance(step, ReleaseStep):
            for chat in step.steps:
                self.chaos.release(self.tag(chat))
        elif isinstance(step, AwaitStep):
            await self._await(step)
        elif isinstance(step, SettleStep):
            await self.client.settle()
        elif isinstance(step, CancelStep):
            for name in step.steps:
                self._background[name].scope.cancel()
                await self._background[name].done.wait()
        elif isinstance(step, GhostStep):
            self._name_session(step.id, secrets.token_hex(16))
        else:
            await self._http_step(step)

    def _start_background(self, step: Step) -> None:
        assert self._nursery is not None
        background = self._background[step.id] = _Background(trio.CancelScope())

        async def run() -> None:
            started = trio.current_time()
            with background.scope:
                await self._http_step(step)
            if background.scope.cancelled_caught:
                self.context.observations[step.id] = Observation(
                    step.id,
                    step.op,
                    None,
                    None,
                    started,
                    trio.current_time(),
                    cancelled_by_scenario=True,
                )
            background.done.set()

        self._nursery.start_soon(run)

    def _stream_progress(self, step_id: str) -> StreamProgress:
        return self._progress.setdefault(step_id, StreamProgress())

    async def _wait(self, step: WaitStep) -> None:
        progress = self._stream_progress(step.chat_step)
        with trio.move_on_after(step.timeout):
            if step.on_client:
                if await self._client_received(step, progress):
                    return
            elif await self._upstream_event(step):
                return
        chat = self.context.observations.get(step.chat_step)
        if step.on_client:
            seen = progress.chunks if step.target.endswith("chunks") else int(progress.finished)
            expected = (
                f"the client received {step.target} (x{step.count}) within {step.timeout:g} s"
            )
        else:
            seen = self.chaos.count(self.tag(step.chat_step), step.event)
            expected = f"upstream event {step.target} (x{step.count}) within {step.timeout:g} s"
        actual = f"seen {seen} time(s); {self._chat_state(step.chat_step)}"
        never_called = self._engine_calls(step.chat_step) == 0
        not_relayed = self._streaming_convention(step.chat_step, chat)
        if step.id in self._setup_steps or never_called or not_relayed is not None:
            why = not_relayed
            if why is not None:
                # The server does not relay chunks as they come (or refuses to
                # stream): the mid-stream race this step sets up cannot happen on it.
                self.context.not_relayed[step.chat_step] = why
            elif not step.on_client and passed_through(
                self.scenario, step.chat_step, chat, self.chaos.calls(self.tag(step.chat_step))
            ):
                why = f"{PASSED_THROUGH}: the retry this race needs never came"
            elif never_called:
                why = f"{step.chat_step} never reached the engine"
            actual += f" ({why})" if why else ""
            raise _Abort(
                Finding(step.id, expected, f"{actual}; the race was never placed"),
                untested=True,
            )
        raise _Abort(
            Finding(
                step.id,
                expected,
                f"{actual}; the remaining steps were not run",
                label=self._cause_of_missing_event(step),
            )
        )

    async def _upstream_event(self, step: WaitStep) -> bool:
        """Wait until the upstream has recorded what ``step`` waits for: True; or
        False at once when it never can, because the chat was answered before its
        call reached the engine (a refusal) and no call can come for it now."""
        tag = self.tag(step.chat_step)
        background = self._background.get(step.chat_step)
        placing = step.event in (EventKind.RECEIVED, EventKind.SENT)
        async with trio.open_nursery() as nursery:

            async def recorded() -> None:
                await self.chaos.wait_for(tag, step.event, step.count)
                nursery.cancel_scope.cancel()

            async def answered() -> None:
                assert background is not None
                await background.done.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(recorded)
            if placing and background is not None:
                nursery.start_soon(answered)
        return self.chaos.count(tag, step.event) >= step.count

    def _cause_of_missing_event(self, step: WaitStep) -> str:
        """The label of a wait for what the race should bring about (a call
        cancelled, answered, dropped) that never came."""
        if step.safety_property:
            return step.safety_property
        chat_over = step.chat_step in self.context.observations  # answered, or hung up on
        if not step.on_client and step.event is EventKind.CANCELLED and chat_over:
            # Its caller is gone or has its answer, yet the engine works on.
            return "LLM work leaked (upstream call not cancelled)"
        # Still waiting: the turn itself was not stopped, whatever that guards.
        return self.scenario.property_of(step.chat_step)

    def _chat_state(self, step_id: str) -> str:
        """Where chat ``step_id`` stands, quoting what the server answered."""
        observation = self.context.observations.get(step_id)
        if observation is None:
            return f"{step_id} is still waiting for its answer"
        if observation.status is None:
            return f"{step_id} got no answer ({observation.transport_error or 'none'})"
        return f"{step_id} was answered {describe(observation)}"

    async def _client_received(self, step: WaitStep, progress: StreamProgress) -> bool:
        """Wait until the client has what ``step`` waits for: True; or until it never
        can, because the stream ended or the server asked the engine for a whole
        answer (it buffers): False at once, rather than at the timeout."""
        what: Literal["chunks", "finished"] = (
            "finished" if step.target.endswith(".finished") else "chunks"
        )
        chat = self.scenario.step(step.chat_step)
        tag = self.tag(chat.retry if isinstance(chat, ChatStep) and chat.retry else chat.id)
        async with trio.open_nursery() as nursery:

            async def arrived() -> None:
                await progress.wait_for(what, step.count)
                nursery.cancel_scope.cancel()

            async def buffered() -> None:
                await self.chaos.wait_for(tag, EventKind.RECEIVED)
                if not self.chaos.streamed_calls.get(tag):
                    nursery.cancel_scope.cancel()

            nursery.start_soon(arrived)
            nursery.start_soon(buffered)
        return progress.finished if what == "finished" else progress.chunks >= step.count

    def _streaming_convention(self, step_id: str, chat: Observation | None) -> str | None:
        """Why a streamed chat's chunks do not come as the engine sends them, where
        that is the server's convention (it refuses to stream, or buffers)."""
        step = self.scenario.step(step_id)
        if not isinstance(step, ChatStep) or not step.stream:
            return None
        profile = self.settings.profile
        if refused_stream(self.scenario, step_id, chat, profile):
            return streaming_label(profile, "unsupported")
        tag = self.tag(step.retry or step_id)
        calls = self.chaos.calls(tag)
        if calls and not self.chaos.streamed_calls.get(tag):
            return streaming_label(profile, "buffered")  # it asked the engine for a whole answer
        progress = self._stream_progress(step_id)
        if self.chaos.count(tag, EventKind.SENT) > progress.chunks:
            return streaming_label(profile, "buffered")  # it holds back what it received
        return None

    async def _await(self, step: AwaitStep) -> None:
        timeout = step.timeout or self.settings.request_timeout
        with trio.move_on_after(timeout):
            for name in step.steps:
                await self._background[name].done.wait()
            return
        pending = [name for name in step.steps if not self._background[name].done.is_set()]
        raise _Abort(
            Finding(
                step.id,
                f"{', '.join(step.steps)} answered within {timeout:g} s",
                f"{', '.join(pending)} still waiting; the remaining steps were not run",
                label=self._cause_of_waiting(pending),
            )
        )

    def _cause_of_waiting(self, pending: list[str]) -> str:
        """The label of an await that timed out: what kept which step waiting.

        Upstream calls are held until this run releases them, so a step still
        waiting is waiting on the held call, whatever the scenario as a whole
        guards. A step's own ``property`` wins; otherwise its kind says it."""
        steps = [self.scenario.step(name) for name in pending]
        for step in steps:
            if step.safety_property:
                return step.safety_property
        ops = {step.op for step in steps}
        if "delete" in ops:
            return "DELETE waits for the upstream"
        if "get" in ops:
            return "GET waits for a turn in flight"
        deleted = {
            self.context.session_of_step.get(step_id)
            for step_id, observation in self.context.observations.items()
            if observation.op == "delete" and (observation.status or 0) // 100 == 2
        }
        if any(self.context.session_of_step.get(name) in deleted for name in pending):
            return "in-flight turn not preempted"
        refused = [
            observation
            for step_id, observation in self.context.observations.items()
            if observation.op == "delete"
            and observation.status is not None
            and observation.status // 100 != 2
            and any(
                self.context.session_of_step.get(step_id) == self.context.session_of_step.get(n)
                for n in pending
            )
        ]
        if refused:
            return f"DELETE refused ({refused[0].status}) while a turn was in flight"
        return self.scenario.property_of(pending[0])

    async def _http_step(self, step: Step) -> None:
        if isinstance(step, CreateStep) and self.settings.profile.creation == "implicit":
            now = trio.current_time()
            self.context.observations[step.id] = Observation(
                step.id, "create", None, None, now, now, minted=True
            )
            self._name_session(step.id, new_session_id())
            return
        if isinstance(step, CreateStep):
            created = await self.lifecycle.create(step.id)
            observation = created.observation
            self.context.observations[step.id] = observation
            if created.session is None:
                raise _Abort(self._not_created(step.id, created), untested=True)
            self._name_session(step.id, created.session)
            return
        assert isinstance(step, SessionStep)
        session_id = self._session_id(step)
        self.context.session_of_step[step.id] = session_id
        if isinstance(step, ChatStep):
            observation = await self._chat(step, session_id)
        elif isinstance(step, DeleteStep):
            observation = await self.lifecycle.end(step.id, session_id)
        elif isinstance(step, GetStep):
            if self.settings.profile.read.once:
                self._leave_unread(step)
                return
            observation, state = await self.lifecycle.read(step.id, session_id)
            self.context.reads[step.id] = state
        else:
            assert isinstance(step, RequestStep)
            observation = await self._raw_request(step, session_id)
        self.context.observations[step.id] = observation
        if not step.background and step.id in self._setup_steps:
            self._check_setup(step, observation)
        elif not step.background and isinstance(step, ChatStep):
            self._check_engine_reached(step, observation)

    def _not_created(self, step_id: str, created: Created) -> Finding:
        profile = self.settings.profile
        if created.failed_before is not None:
            return Finding(
                step_id,
                f"{created.failed_before.describe()} answers 2xx (it comes before each create)",
                f"{describe(created.observation)}; the race was never placed",
                curl_line(created.observation),
            )
        fields = repr(profile.create.id_field)
        if profile.create.agent_id_field is not None:
            fields += f" and {profile.create.agent_id_field!r}"
        return Finding(
            step_id,
            f"a created session (a 2xx JSON body with {fields})",
            f"{describe(created.observation)}; the race was never placed",
            curl_line(created.observation),
        )

    def _leave_unread(self, step: GetStep) -> None:
        """A read-once server's trajectory is read at the end, after the session's
        end; a read a scenario makes before then is not made, and what it expected
        is not judged (a convention the profile declares)."""
        if step.expect is None:
            return
        self._unread.append(
            Finding(
                step.id,
                f"a read of the trajectory at {step.id}",
                "not made: this server's read is an export (once, after the end, and it "
                "removes the session), so what the scenario expects of an earlier read "
                "is not judged here",
                kind=Kind.CONVENTION,
                label=UNREAD_EARLIER,
            )
        )

    def _only_reads_observe(self) -> bool:
        """Nothing but the reads this server cannot answer observes the race: the
        scenario's property is then not tested at all."""
        unread = {f.step for f in self._unread}
        return not any(
            step.expect is not None and step.id not in unread and step.id not in self._setup_steps
            for step in self.scenario.steps
        )

    def _engine_calls(self, step_id: str) -> int:
        step = self.scenario.step(step_id)
        retried = step.retry if isinstance(step, ChatStep) else None
        return self.chaos.calls(self.tag(retried or step_id))

    def _check_engine_reached(self, step: ChatStep, observation: Observation) -> None:
        """A chat whose upstream script is the race (an abort, a hold, a cut
        stream) refused before it reached the engine: that script never played."""
        matcher = step.expect.status_matcher if step.expect else None
        if step.plain_script or step.retry is not None:
            return
        if matcher is None or matcher.outcome is not True or observation.succeeded:
            return
        if observation.status is None or self._engine_calls(step.id):
            return
        script = ", ".join(b.describe() for b in step.behaviours)
        raise _Abort(
            Finding(
                step.id,
                f"status {matcher.describe()}, after the engine plays {script}",
                f"{describe(observation)} before any engine call; the race was never placed",
                curl_line(observation),
            ),
            untested=True,
        )

    def _check_setup(self, step: Step, observation: Observation) -> None:
        """A setup step answered on the other side than the race needs: what it was
        to build is not there, so nothing after it would test the property."""
        matcher = step.expect.status_matcher if step.expect else None
        if matcher is None or matcher.outcome is None:
            return
        if observation.status is not None and observation.succeeded == matcher.outcome:
            return
        side = "success" if matcher.outcome else "a refusal"
        raise _Abort(
            Finding(
                step.id,
                f"status {matcher.describe()} ({side}: this step sets the race up)",
                f"{describe(observation)}; the race was never placed",
                curl_line(observation),
            ),
            untested=True,
        )

    async def _chat(self, step: ChatStep, session_id: str) -> Observation:
        tag = self.tag(step.id)
        messages = self._messages_for(step, session_id, tag)
        self.context.sent_messages[step.id] = messages
        self.context.seen_before[step.id] = list(self.context.views.get(session_id, []))
        # An exact retry carries the original's marker, so the upstream files
        # its calls under the original step: script that tag for this attempt.
        scripted = self.tag(step.retry) if step.retry is not None else tag
        self.chaos.script(scripted, step.behaviours)
        body: dict[str, Any] = {"model": "sessctl-chaos", "messages": messages}
        if self.settings.profile.appends_tool_results:
            body["tools"] = AGENT_TOOLS
        if step.stream:
            body["stream"] = True
        agent = self.lifecycle.agent_of(session_id)
        path, headers, body = self.settings.profile.chat_request(agent, body)
        if step.stream:
            observation = await self.client.send_stream(
                step.id,
                path,
                body,
                self._stream_progress(step.id),
                hang_up_after=step.hang_up_after,
                headers=headers,
            )
        else:
            observation = await self.client.send(
                step.id, "chat", "POST", path, json_body=body, headers=headers
            )
        answer = answer_of(observation)
        if observation.status == 200 and answer is not None:
            self.context.views[session_id] = [*messages, answer]
        return observation

    def _messages_for(self, step: ChatStep, session_id: str, tag: str) -> list[dict[str, Any]]:
        if step.retry is not None:
            return list(self.context.sent_messages[step.retry])
        text = f"{step.content or 'turn ' + step.id} {marker(tag)}"
        if step.messages is not None:
            messages = [dict(m) for m in step.messages]
            last = messages[-1]
            last["content"] = f"{last.get('content') or ''} {marker(tag)}".strip()
            return messages
        if step.after is not None:
            base = list(self.context.sent_messages[step.after])
            answer = answer_of(self.context.observations.get(step.after))
            if answer is not None:
                base.append(answer)
        else:
            base = list(self.context.views.get(session_id, []))
        return [*base, next_message(self.settings.profile, base, text)]

    async def _raw_request(self, step: RequestStep, session_id: str) -> Observation:
        path = step.path.replace("{session}", session_id)
        json_body = step.json_body
        addressed: dict[str, str] = {}
        if step.path == REFERENCE_CHAT_PATH:
            # The chat route, addressed as this server names its sessions (a raw
            # body cannot carry a body field; it goes as it is).
            body = json_body if isinstance(json_body, dict) else {}
            path, addressed, addressed_body = self.settings.profile.chat_request(
                self.lifecycle.agent_of(session_id), body, raw=True
            )
            if isinstance(json_body, dict):
                json_body = addressed_body
        # Bad input may make a server drop the connection after answering (a 500
        # and a close, say): ask for a connection of its own so no later step
        # inherits a dead one from the pool.
        headers = {"connection": "close", **addressed, **step.headers}
        if step.body_bytes is not None:
            return await self.client.send(
                step.id,
                "request",
                step.method,
                path,
                raw_body=_padded_chat_body(step.body_bytes),
                headers={"content-type": "application/json", **headers},
            )
        if step.body is not None or step.generate is not None:
            raw = (
                step.generate.render() if step.generate is not None else (step.body or "").encode()
            )
            return await self.client.send(
                step.id,
                "request",
                step.method,
                path,
                raw_body=raw,
                headers={"content-type": "application/json", **headers},
            )
        return await self.client.send(
            step.id, "request", step.method, path, json_body=json_body, headers=headers
        )

    def _name_session(self, name: str, session_id: str) -> None:
        self.context.sessions[name] = session_id
        self.context.latest_session = name

    def _session_id(self, step: SessionStep) -> str:
        name = step.session or self.context.latest_session
        if name is None:  # only raw requests may run before any session exists
            return "no-session"
        return self.context.sessions[name]

    # -- the end of a run -----------------------------------------------------------

    async def _check_upstream_expectations(self, *, positive: bool) -> list[Finding]:
        findings: list[Finding] = []
        expected = self.scenario.expect.upstream
        # Positive expectations may lag the HTTP answer a little: wait for them first.
        if positive:
            with trio.move_on_after(self.settings.event_grace):
                for step_id, spec in expected.items():
                    for kind, wanted in _positive_targets(spec):
                        await self.chaos.wait_for(self.tag(step_id), kind, wanted)
        for step_id, spec in expected.items():
            tag = self.tag(step_id)
            calls_expected = spec.calls is not None and (positive or spec.calls == 0)
            if calls_expected and self.chaos.calls(tag) != spec.calls:
                findings.append(
                    self._upstream_finding(
                        step_id,
                        spec,
                        None,
                        f"{spec.calls} upstream call(s)",
                        f"{self.chaos.calls(tag)} call(s)",
                    )
                )
            for kind in EventKind:
                wanted = getattr(spec, kind.value)
                if wanted is None or (not positive and wanted not in (0, False)):
                    continue
                seen = self.chaos.count(tag, kind)
                ok = seen >= 1 if wanted is True else seen == int(wanted)
                if not ok:
                    shown = "at least once" if wanted is True else f"{int(wanted)} time(s)"
                    findings.append(
                        self._upstream_finding(
                            step_id, spec, kind, f"upstream {kind.value} {shown}", f"{seen} time(s)"
                        )
                    )
        return findings

    def _upstream_finding(
        self,
        step_id: str,
        spec: UpstreamExpect,
        kind: EventKind | None,
        expected: str,
        actual: str,
    ) -> Finding:
        observation = self.context.observations.get(step_id)
        if refused_stream(self.scenario, step_id, observation, self.settings.profile):
            # No call, because the server does not stream: its design, not a race
            # (nor whatever convention the counts were written for).
            label = streaming_label(self.settings.profile, "unsupported")
            return Finding(step_id, expected, actual, kind=Kind.CONVENTION, label=label)
        if spec.convention:
            return Finding(step_id, expected, actual, kind=Kind.CONVENTION, label=spec.convention)
        if kind is None and passed_through(
            self.scenario, step_id, observation, self.chaos.calls(self.tag(step_id))
        ):
            # It made no second call because it handed the failure to the agent.
            return Finding(
                step_id,
                expected,
                actual,
                kind=Kind.CONVENTION,
                label=passed_through_label(self.settings.profile),
            )
        if kind is None and abort_answered(
            self.scenario, step_id, observation, self.chaos.calls(self.tag(step_id))
        ):
            # One call: the abort went to the agent as a 200, and was kept.
            if self.settings.profile.aborted_completions == "commit":
                label = abort_label(self.settings.profile)
                return Finding(step_id, expected, actual, kind=Kind.CONVENTION, label=label)
            return Finding(step_id, expected, actual, label=ABORT_AS_SUCCESS)
        step = self.scenario.step(step_id)
        implicit = observation is not None and implicit_creation_excuse(
            step_id,
            observation,
            self.context,
            self.settings.profile,
            step.expect.status_matcher if step.expect else None,
        )
        if implicit:
            # Calls made for a chat that created its session on first use.
            return Finding(step_id, expected, actual, kind=Kind.CONVENTION, label=implicit)
        if kind is None and declared_rollback(step_id, self.context, self.settings.profile):
            # Accepted by the declared policy, so the engine was called for it.
            return Finding(
                step_id, expected, actual, kind=Kind.CONVENTION, label=ROLLED_BACK_DECLARED
            )
        label = self.scenario.property_of(step_id)
        if kind is EventKind.CANCELLED and self._answered_as_expected(step_id):
            # The caller was told its turn was stopped, yet the LLM work ran on.
            label = "LLM work leaked (upstream call not cancelled)"
        return Finding(step_id, expected, actual, label=label)

    def _answered_as_expected(self, step_id: str) -> bool:
        step = self.scenario.step(step_id)
        observation = self.context.observations.get(step_id)
        matcher = step.expect.status_matcher if step.expect else None
        return (
            observation is not None and matcher is not None and matcher.matches(observation.status)
        )

    async def _wind_down(self) -> None:
        for step in self.scenario.steps:
            if isinstance(step, ChatStep):
                self.chaos.release(self.tag(step.id))
        for background in self._background.values():
            await background.done.wait()

    async def _read_final_trajectories(self, *, ended_only: bool = False) -> None:
        profile = self.settings.profile
        ended = {
            self.context.session_of_step.get(step_id)
            for step_id, observation in self.context.observations.items()
            if observation.op == "delete" and (observation.status or 0) // 100 == 2
        }
        for name, session_id in self.context.sessions.items():
            if session_id in self.context.final_trajectories:
                continue  # exported already (a read once cannot be made twice)
            if ended_only and session_id not in ended:
                continue
            if profile.read.once and session_id not in ended:
                # An export waits for the end: end what the scenario left open.
                await self.lifecycle.end(f"end-{name}", session_id)
            # Through the profile: a records-style server keeps no "messages".
            observation, state = await self.lifecycle.read(f"final-{name}", session_id)
            readable = (
                state.record_count is not None
                if profile.trajectory.log
                else isinstance(state.messages, list)
            )
            ok = observation.status == 200 and readable
            self.context.final_trajectories[session_id] = state if ok else None
            if not ok and observation.succeeded:
                self.context.unreadable_finals[session_id] = observation

    def _own_events(self) -> list[StepEvent]:
        # Through the upstream's index by tag: after a long chaos run its
        # event list is far too long to scan once per scenario run.
        events = [e for s in self.scenario.steps for e in self.chaos.events(self.tag(s.id))]
        return sorted(events, key=lambda e: e.at)


def _positive_targets(spec: UpstreamExpect) -> list[tuple[EventKind, int]]:
    targets: list[tuple[EventKind, int]] = []
    for kind in EventKind:
        wanted = getattr(spec, kind.value)
        if wanted is True:
            targets.append((kind, 1))
        elif isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > 0:
            targets.append((kind, wanted))
    return targets


def _padded_chat_body(size: int) -> bytes:
    head = b'{"model": "sessctl-chaos", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail
