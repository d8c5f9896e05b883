"""What a run observed and concluded: frozen records, no I/O, no rendering."""

from __future__ import annotations

import enum
import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from wire.anthropic import message_to_chat


class Verdict(enum.Enum):
    PASS = "pass"
    NON_STRICT = "non-strict"
    """Only conventions differ from docs/contract.md (201 vs 200, 409 vs 400...); safe."""
    UNTESTED = "untested"
    """The race was never placed: a setup step was answered otherwise than the
    scenario needs, or a wait that places the race never filled. The scenario's
    property was not tested; ``RunResult.untested`` quotes why."""
    FAIL = "fail"
    """A safety property broke, or the server faulted (no answer, malformed HTTP)."""
    ERROR = "error"
    """sessctl could not run: an unreachable target, or a bug of its own."""

    @staticmethod
    def worst(verdicts: list[Verdict]) -> Verdict:
        for verdict in (Verdict.ERROR, Verdict.FAIL, Verdict.UNTESTED, Verdict.NON_STRICT):
            if verdict in verdicts:
                return verdict
        return Verdict.PASS


class Kind(enum.Enum):
    SAFETY = "safety"
    """Must hold on every server: no phantom commit, no auto-create, preemption..."""
    CONVENTION = "convention"
    """How the contract spells things: 201 vs 200, 409 vs 400, 410, the error shape."""
    FAULT = "server fault"
    """The server under test answered no HTTP at all while it was up: no answer
    within the request timeout, a reset connection, a malformed answer (a body
    shorter than its Content-Length, bad chunking). A FAIL of its own kind."""


KEPT_BODY_BYTES = 4096
"""Raw bodies up to this size are kept for the curl line; bigger ones only by size."""


@dataclass(frozen=True)
class SentRequest:
    method: str
    url: str
    json_body: Any = None
    raw_body: bytes | None = None
    raw_size: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    """The headers the harness set (the ones that address a session among them),
    with secrets shown as the environment variable that holds them (``$NAME``)."""

    @staticmethod
    def of(
        method: str,
        url: str,
        json_body: Any,
        raw_body: bytes | None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> SentRequest:
        # A suite keeps every observation until it reports; holding on to a
        # 9 MiB oversized body per run would cost gigabytes over a --repeat run.
        kept = raw_body if raw_body is not None and len(raw_body) <= KEPT_BODY_BYTES else None
        return SentRequest(method, url, json_body, kept, len(raw_body or b""), headers)


class StreamEnd(enum.Enum):
    """How a streamed answer ended, as its client saw it."""

    DONE = "done"
    """``[DONE]`` arrived."""
    ERROR = "error"
    """An error event arrived (and no ``[DONE]``)."""
    CUT = "cut"
    """The stream stopped with neither: the connection closed, or no more came in time."""
    HUNG_UP = "hung up"
    """The harness hung up, as the scenario said (``hang_up_after``)."""
    NOT_STREAMED = "not streamed"
    """A 200 that was not an event stream (JSON where a stream was asked for)."""


@dataclass(frozen=True)
class StreamRecord:
    """What the client of a streamed chat received."""

    end: StreamEnd
    chunks: int
    """``chat.completion.chunk`` events received (not counting ``[DONE]`` or an error)."""
    finished: bool
    """A chunk with ``finish_reason`` arrived."""
    assembled: dict[str, Any] | None
    """The assistant message assembled from the chunks (None if none could be)."""
    error_type: str | None = None
    """The error event's ``error.type``."""
    first_chunk_at: float | None = None
    """trio.current_time() of the first chunk: a buffering server sends it late."""
    finish_reason: str | None = None
    """The ``finish_reason`` (``stop_reason`` on Anthropic's API) the stream carried."""
    after_error: tuple[str, ...] = ()
    """What arrived after an error event (``[DONE]``, a data event...): an error event
    ends a stream, and the client reads on to the end to see that nothing follows."""

    @property
    def mark(self) -> str:
        if self.end is StreamEnd.DONE:
            return "✓[DONE]"
        if self.end is StreamEnd.ERROR:
            return f"✗{self.error_type or 'error'}"
        if self.end is StreamEnd.HUNG_UP:
            return f"hung up after {self.chunks}"
        if self.end is StreamEnd.NOT_STREAMED:
            return "JSON"
        return f"✗cut after {self.chunks}"


@dataclass(frozen=True)
class Observation:
    """One HTTP step's outcome in one run."""

    step: str
    op: str
    request: SentRequest | None
    status: int | None
    """None when no HTTP answer came back; ``transport_error`` says why."""
    started: float
    ended: float
    body: Any = None
    transport_error: str | None = None
    cancelled_by_scenario: bool = False
    retried_after: str | None = None
    """Sent twice: the first attempt failed on a kept-alive connection the server
    had closed, before any byte of an answer; this says how."""
    stream: StreamRecord | None = None
    """For a chat sent with ``stream: true`` that was answered 2xx."""
    minted: bool = False
    """A create step on a server that creates sessions implicitly: the harness made
    the id up and sent nothing; the first request that names it creates it."""
    unreachable: bool = False
    """No connection could be made (refused, no route): the target is down, which
    sessctl cannot judge; any other missing answer is the server's fault."""
    sent: float | None = None
    """When its first bytes went out (None: they never did). Later than ``started``
    by the time it queued in the harness for a connection."""

    @property
    def succeeded(self) -> bool:
        """A 2xx that is a success: for a stream, one that did not end with an error
        event or a cut (a server may refuse a streamed turn inside a 200 stream)."""
        if self.status is None or self.status // 100 != 2:
            return False
        return self.stream is None or self.stream.end not in (StreamEnd.ERROR, StreamEnd.CUT)

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000

    @property
    def error_type(self) -> str | None:
        return error_type_of(self.body)

    @property
    def cell(self) -> str:
        """The status as the matrix shows it."""
        if self.cancelled_by_scenario:
            return "hung up"
        if self.minted:
            return "id made up"
        if self.status is None:
            return "no answer"
        if self.stream is not None:
            if self.stream.end is StreamEnd.HUNG_UP:
                return self.stream.mark
            return f"{self.status} {self.stream.mark}"
        return str(self.status)


@dataclass(frozen=True)
class Finding:
    """One expectation that did not hold, or a reason the run could not complete."""

    step: str | None
    expected: str
    actual: str
    reproduce: str | None = None
    """A curl line for the step, with the ids of this run."""
    kind: Kind = Kind.SAFETY
    label: str = ""
    """The property in a few words ("phantom commit"); the summary line lists these."""
    follows: str | None = None
    """The earlier unexpected observation this finding follows from (its step and
    what it saw), when there is one: the report shows it under that cause, and
    its label is not counted as a cause of its own."""
    seen_at: float | None = None
    """trio.current_time() when what it reports was observed (an answer, a wait
    that gave up, the final read); None when not known. Orders causes."""


@dataclass(frozen=True)
class RunResult:
    index: int
    verdict: Verdict
    observations: dict[str, Observation]
    failures: list[Finding] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)
    upstream_events: list[dict[str, Any]] = field(default_factory=list)
    untested: list[Finding] = field(default_factory=list)
    """Why the race was never placed (the step, and what the server answered);
    empty when it was. Such a run's scenario-specific expectations are not
    judged: only the invariants that hold on any server (every 200 committed,
    nothing succeeds after a DELETE, no commit after a stream error)."""


@dataclass(frozen=True)
class StepSummary:
    step: str
    op: str
    expected: str | None
    cells: Counter[str]
    """Observed cell -> how many runs saw it."""
    expected_cells: frozenset[str]
    convention_cells: frozenset[str] = frozenset()
    """Unexpected, but on the expected side of success/refusal: NON-STRICT, not FAIL."""
    budget_ms: float | None = None
    """The step's ``within_ms``: a figure to compare against, judged only when asked."""
    latencies_ms: tuple[float, ...] = ()
    """The answered runs' latencies, for steps with a budget."""


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    description: str
    source: str
    target: str
    runs: list[RunResult]
    steps: list[StepSummary]

    @property
    def verdict(self) -> Verdict:
        return Verdict.worst([run.verdict for run in self.runs])

    @property
    def first_problem_run(self) -> RunResult | None:
        """The first run whose verdict is the scenario's (its worst)."""
        for run in self.runs:
            if run.verdict is self.verdict and run.verdict is not Verdict.PASS:
                return run
        return None

    @property
    def untested_because(self) -> Finding | None:
        """Why the race was never placed, for an UNTESTED scenario."""
        run = self.first_problem_run
        if self.verdict is not Verdict.UNTESTED or run is None or not run.untested:
            return None
        return run.untested[0]


@dataclass(frozen=True)
class SuiteResult:
    targets: list[str]
    scenarios: list[ScenarioResult]
    unreachable: dict[str, str] = field(default_factory=dict)
    """Target name -> why it could not be reached."""
    strict: bool = False
    """``--strict``: an UNTESTED scenario fails the run too."""
    interrupted: bool = False
    """Stopped early (Ctrl-C): only the runs that had finished are here."""

    def count(self, verdict: Verdict) -> int:
        return sum(1 for s in self.scenarios if s.verdict is verdict)

    def labels(self, kind: Kind) -> list[str]:
        """Distinct labels of the findings of this kind, in order of first appearance.

        Runs that ended in ERROR add none: what they saw is incomplete, and the
        summary must count only causes that were established."""
        found: dict[str, None] = {}
        for scenario in self.scenarios:
            for run in scenario.runs:
                if run.verdict is Verdict.ERROR:
                    continue
                for finding in run.failures:
                    if finding.kind is kind and finding.label and finding.follows is None:
                        found.setdefault(finding.label)
        return list(found)

    def untested(self) -> list[ScenarioResult]:
        return [s for s in self.scenarios if s.verdict is Verdict.UNTESTED]

    @property
    def exit_code(self) -> int:
        if self.unreachable:
            return 3
        failing = {Verdict.FAIL, Verdict.ERROR} | ({Verdict.UNTESTED} if self.strict else set())
        if any(s.verdict in failing for s in self.scenarios):
            return 1
        return 0


def error_type_of(body: Any) -> str | None:
    """``error.type`` of an error body (or error event), in either API's shape; a
    server on Anthropic's API that says the session's own type says it in
    ``sessctl_type``."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    kind = error.get("sessctl_type") or error.get("type")
    return str(kind) if kind is not None else None


def answer_of(observation: Observation | None) -> dict[str, Any] | None:
    """The assistant message of a chat's answer, in chat form (an Anthropic
    ``message`` is translated)."""
    if observation is None or not isinstance(observation.body, dict):
        return None
    if observation.body.get("type") == "message":
        return message_to_chat(observation.body)
    choices = observation.body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            return message
    return None


_TAG = re.compile(r"<[^>]*>")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _readable(raw: str) -> str:
    """A body as a line of a report: an HTML page (a web server that is not a
    session server, a proxy's error page) as its title and text, not its markup."""
    if not raw.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
        return raw
    title = _TITLE.search(raw)
    text = " ".join(html.unescape(_TAG.sub(" ", _TITLE.sub(" ", raw))).split())
    heading = " ".join(html.unescape(title.group(1)).split()) if title else ""
    return f"an HTML page: {heading}: {text}" if heading else f"an HTML page: {text}"


def describe(observation: Observation, limit: int = 200) -> str:
    """A status and the start of the body, as the target sent it."""
    if observation.status is None:
        return observation.transport_error or "no answer"
    body = observation.body
    if isinstance(body, dict) and set(body) == {"_raw"}:
        text = _readable(str(body["_raw"]))
    elif body is None:
        text = "(empty body)"
    else:
        text = json.dumps(body)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{observation.status} {text}"
