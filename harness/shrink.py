"""Shrinking a failing chaos run to a minimal YAML scenario that replays it.

1. **From history to a case.** The failing session's operations, up to the
   end of the failing window, become scenario steps, each run in the
   background. The order the history shows is forced at three kinds of point:
   a request is sent; a held upstream call is released (where the history
   shows it answered); the client hangs up (where it gave up). After every
   point the scenario settles, so the server has taken in everything before
   the next point. Every chat's upstream call is held (after any scripted
   faults), so no answer outruns its place; calls the history never saw
   answered are released at the end, one by one.

2. **What the scenario expects.** The reference server is the contract's
   executable specification, so each candidate is first replayed on it
   (in-process, where settling is exact), and what it answered becomes the
   expectations: every step's status; for the upstream, no call for a turn
   it refused and a cancelled, unanswered call for a turn it preempted. The
   scenario defaults (durable, no 2xx after DELETE) stay on.

3. **Delta debugging.** A candidate still fails if, with those expectations,
   its replay on the target is a FAIL. ddmin removes operations (a chat whose
   base was removed builds on that base's base instead; a retry of a removed
   chat becomes a plain chat), then each chat is simplified where the
   failure survives: a plain answer instead of a hold, no scripted faults, no
   hang-up. The result is replayed a few more times on both servers, and the
   report says how often it failed on the target and passed on the reference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import trio
import yaml

from refserver.rules import comparable

from .chaos_upstream import ChaosUpstream
from .client import TargetClient
from .ddmin import ddmin
from .history import Operation
from .linearizability import Finding
from .loader import parse_scenario
from .results import RunResult, Verdict
from .runner import RunSettings, ScenarioRun
from .scenario import Scenario

PointAction = Literal["start", "release", "cancel"]
_ACTION_ORDER = {"start": 0, "release": 1, "cancel": 2}

PROPERTY_OF_FINDING = {
    "linearizability": "answers that no order of the operations explains",
    "durability": "phantom commit",
    "success-after-delete": "no success after DELETE",
    "llm-leak": "LLM work leaked for a deleted session",
}
RETRY_CONVENTION = "an exact retry replays the stored answer"


# -- the case: operations and the points that order them ------------------------------


@dataclass(frozen=True)
class CaseOp:
    name: str
    op: str
    """chat, get or delete."""
    after: str | None = None
    """chat: builds on this chat's request and answer; None: a first turn."""
    retry: str | None = None
    """chat: sends exactly this chat's messages again."""
    faults: tuple[Any, ...] = ()
    """chat: upstream behaviours played before the last one (503, abort)."""
    final: Any = "hold"
    """chat: the last, repeating upstream behaviour (hold, respond, reset, garbage)."""

    @property
    def script(self) -> Any:
        behaviours = [*self.faults, self.final]
        return behaviours[0] if len(behaviours) == 1 else behaviours


@dataclass(frozen=True)
class Point:
    action: PointAction
    op: str


@dataclass(frozen=True)
class Case:
    ops: tuple[CaseOp, ...]
    points: tuple[Point, ...]

    def op(self, name: str) -> CaseOp:
        return next(o for o in self.ops if o.name == name)

    def without(self, names: Collection[str]) -> Case:
        """The case minus these operations; what was built on them is rebased."""
        removed = set(names)
        by_name = {o.name: o for o in self.ops}

        def base(name: str | None) -> str | None:
            # A removed chat's place is taken by whatever it built on itself.
            while name is not None and name in removed:
                gone = by_name[name]
                name = by_name[gone.retry].after if gone.retry is not None else gone.after
            return name

        kept: list[CaseOp] = []
        for o in self.ops:
            if o.name in removed:
                continue
            if o.retry is not None and o.retry in removed:
                o = replace(o, retry=None, after=base(by_name[o.retry].after))
            elif o.after is not None:
                o = replace(o, after=base(o.after))
            kept.append(o)
        return Case(tuple(kept), tuple(p for p in self.points if p.op not in removed))

    def with_op(self, op: CaseOp, *, drop: Collection[PointAction] = ()) -> Case:
        ops = tuple(op if o.name == op.name else o for o in self.ops)
        points = tuple(p for p in self.points if not (p.op == op.name and p.action in drop))
        return Case(ops, points)

    def renamed(self) -> Case:
        """Steps named in the order they start: c1, d2, g3..."""
        starts = [p.op for p in self.points if p.action == "start"]
        names = {old: f"{self.op(old).op[0]}{index}" for index, old in enumerate(starts, 1)}

        def new(name: str | None) -> str | None:
            return None if name is None else names[name]

        ops = tuple(
            replace(o, name=names[o.name], after=new(o.after), retry=new(o.retry))
            for o in sorted(self.ops, key=lambda o: starts.index(o.name))
        )
        return Case(ops, tuple(Point(p.action, names[p.op]) for p in self.points))


Arrival = Literal["sent", "upstream"]


def case_from_history(
    history: Sequence[Operation], finding: Finding, arrival: Arrival = "sent"
) -> Case:
    """The failing session's operations up to the end of the window, ordered as they ran.

    The client sees when it sent a request, not when the server took it in: two
    requests in flight at once may arrive in either order. ``arrival="sent"``
    replays them in the order they were sent; ``"upstream"`` sends a chat when
    the upstream first saw it, for when the history shows a chat overtaken.
    """
    window_end = max(_end(o) or o.invoke for o in finding.window)
    ops = sorted(
        (
            o
            for o in history
            if o.session == finding.session and o.op != "create" and o.invoke <= window_end
        ),
        key=lambda o: o.invoke,
    )
    sent_by: dict[tuple[Any, ...], str] = {}
    """Messages -> the first chat that sent them (later senders are exact retries)."""
    turn_of: dict[tuple[Any, ...], str] = {}
    """Request + answer -> the chat whose turn that is."""
    case_ops: list[CaseOp] = []
    timed: list[tuple[float, float, int, Point]] = []
    for o in ops:
        name = f"{o.op[0]}{o.id}"
        timed.append((_sent_at(o, arrival), o.invoke, 0, Point("start", name)))
        if o.unknown and o.gave_up is not None:
            timed.append((o.gave_up, o.invoke, 2, Point("cancel", name)))
        if o.op != "chat":
            case_ops.append(CaseOp(name, o.op))
            continue
        messages = o.messages or []
        sent = _key(messages)
        faults, final = _held(o.script or ["respond"])
        if sent in sent_by:
            case_ops.append(CaseOp(name, "chat", retry=sent_by[sent], faults=faults, final=final))
        else:
            sent_by[sent] = name
            after = turn_of.get(_key(messages[:-1])) if len(messages) > 1 else None
            case_ops.append(CaseOp(name, "chat", after=after, faults=faults, final=final))
            if o.answer_if_committed is not None:
                turn_of.setdefault(_key([*messages, o.answer_if_committed]), name)
        if final == "hold":
            timed.append((_answered_at(o), o.invoke, 1, Point("release", name)))
    timed.sort(key=lambda t: (t[0], t[1], t[2]))
    return Case(tuple(case_ops), tuple(point for *_, point in timed))


def _sent_at(op: Operation, arrival: Arrival) -> float:
    if arrival == "sent" or op.op != "chat":
        return op.invoke
    received = [e.at for e in op.upstream if e.kind == "received" and e.at >= op.invoke]
    return min(received, default=op.invoke)


def _key(messages: Sequence[dict[str, Any]]) -> tuple[Any, ...]:
    return tuple(comparable(m) for m in messages)


def _end(op: Operation) -> float | None:
    return op.complete if op.complete is not None else op.gave_up


def _held(script: Sequence[Any]) -> tuple[tuple[Any, ...], Any]:
    """A recorded script with its answering behaviour turned into a hold."""
    *faults, last = script
    answers = last in ("respond", "hold") or (isinstance(last, dict) and "delay" in last)
    return tuple(faults), "hold" if answers else last


def _answered_at(op: Operation) -> float:
    """When the upstream answered this chat's last call (inf: never, in the history)."""
    end = _end(op)
    answered = [
        e.at
        for e in op.upstream
        if e.kind == "answered" and e.at >= op.invoke and (end is None or e.at <= end)
    ]
    return max(answered, default=float("inf"))


# -- the case as a scenario --------------------------------------------------------------


@dataclass(frozen=True)
class Expectations:
    statuses: dict[str, int]
    upstream: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ScenarioText:
    """What goes around the steps of the written scenario."""

    name: str
    description: str
    safety_property: str
    header: tuple[str, ...] = ()
    """Comment lines at the top of the file."""


def render(case: Case, text: ScenarioText, expected: Expectations | None = None) -> str:
    steps: list[dict[str, Any]] = [{"create": "s"}]
    hung_up = {p.op for p in case.points if p.action == "cancel"}
    for point in case.points:
        if point.action == "start":
            steps.append(_start_step(case.op(point.op), expected))
        else:
            steps.append({point.action: point.op})
        steps.append({"settle": True})
    document: dict[str, Any] = {
        "name": text.name,
        "description": text.description,
        "property": text.safety_property,
        "why": (
            "Shrunk from a chaos run. Every request is sent, every held upstream call "
            "released and every hang-up done in the order the chaos run saw, with a settle "
            "after each. The expected answers are the reference server's under that same "
            "order: the contract's executable specification."
        ),
        "timeout": 30,
        "steps": steps,
    }
    upstream = {
        name: spec
        for name, spec in (expected.upstream if expected else {}).items()
        if name not in hung_up
    }
    if upstream:
        document["expect"] = {"upstream": upstream}
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
    header = "".join(f"# {line}\n" if line else "#\n" for line in text.header)
    return header + body


def _start_step(op: CaseOp, expected: Expectations | None) -> dict[str, Any]:
    step: dict[str, Any] = {op.op: op.name, "background": True}
    if op.op == "chat":
        step["upstream"] = op.script
        if op.retry is not None:
            step["retry"] = op.retry
        elif op.after is not None:
            step["after"] = op.after
        else:
            step["messages"] = [{"role": "user", "content": f"turn {op.name}"}]
    if expected is not None and op.name in expected.statuses:
        step["expect"] = {"status": expected.statuses[op.name]}
    return step


def expectations_from(case: Case, reference: RunResult) -> Expectations | None:
    """What the reference server did under this order; None if it could not answer."""
    hung_up = {p.op for p in case.points if p.action == "cancel"}
    statuses: dict[str, int] = {}
    for op in case.ops:
        observation = reference.observations.get(op.name)
        if observation is None or (observation.status is None and op.name not in hung_up):
            return None
        if observation.status is not None:
            statuses[op.name] = observation.status
    retried = {o.retry for o in case.ops if o.retry is not None}
    upstream: dict[str, dict[str, Any]] = {}
    for op in case.ops:
        status = statuses.get(op.name)
        if op.op != "chat" or op.retry is not None or status is None:
            continue
        seen = {
            kind: sum(
                1 for e in reference.upstream_events if e["step"] == op.name and e["kind"] == kind
            )
            for kind in ("received", "answered", "cancelled")
        }
        spec: dict[str, Any] = {}
        if seen["received"] == 0 and status // 100 != 2:
            spec = {"calls": 0}  # a refused turn costs no LLM work
        elif status == 410 and seen["cancelled"] and not seen["answered"]:
            spec = {"cancelled": True, "answered": 0}  # a preempted turn's call is stopped
        if spec and op.name in retried:
            spec["convention"] = RETRY_CONVENTION  # a retry may regenerate on other servers
        if spec:
            upstream[op.name] = spec
    return Expectations(statuses, upstream)


# -- replaying ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Replayer:
    """Runs scenarios on the target and on the reference server, through one upstream."""

    upstream: ChaosUpstream
    target: TargetClient
    reference: TargetClient
    settings: RunSettings

    async def run(self, scenario: Scenario, *, on_reference: bool, index: int = 0) -> RunResult:
        client = self.reference if on_reference else self.target
        return await ScenarioRun(scenario, client, self.upstream, index, self.settings).run()


@dataclass(frozen=True)
class ShrinkSettings:
    max_tests: int = 400
    """Replays of candidates (each is one run on each server) before stopping."""
    time_budget: float = 60.0
    """Seconds before stopping with the smallest failing case found so far."""
    confirm_runs: int = 5
    """Replays of the result on each server, to show it is deterministic."""
    findings_tried: int = 3
    """Findings to start from, smallest session first, until one replays."""


@dataclass(frozen=True)
class ShrinkResult:
    name: str
    text: str
    """The scenario file, ready to write."""
    finding: Finding
    """The chaos finding it was shrunk from."""
    operations_before: int
    operations_after: int
    steps: int
    tests: int
    seconds: float
    exhausted: bool
    """The budget ran out: smaller than the history, but maybe not 1-minimal."""
    confirm_runs: int
    target_failures: int
    reference_passes: int


class _Oracle:
    """ "Does this case, as a scenario, still FAIL on the target?", memoised and budgeted."""

    def __init__(
        self,
        replayer: Replayer,
        text: ScenarioText,
        settings: ShrinkSettings,
        tests: int,
        started: float,
    ) -> None:
        self.replayer = replayer
        self.text = text
        self.settings = settings
        self.tests = tests
        """Counted across every finding tried, as the budget is."""
        self.deadline = started + settings.time_budget
        self.exhausted = False
        self._seen: dict[str, str | None] = {}

    async def scenario_for(self, case: Case, *, beyond_budget: bool = False) -> str | None:
        """The scenario text (with expectations) if the case still fails, else None."""
        plain = render(case, self.text)
        if plain in self._seen:
            return self._seen[plain]
        over = self.tests >= self.settings.max_tests or trio.current_time() > self.deadline
        if over and not beyond_budget:
            self.exhausted = True
            return None
        self.tests += 1
        found = await self._judge(case, plain)
        self._seen[plain] = found
        return found

    async def fails(self, case: Case) -> bool:
        return await self.scenario_for(case) is not None

    async def _judge(self, case: Case, plain: str) -> str | None:
        if not case.ops:
            return None
        reference = await self.replayer.run(
            parse_scenario(plain, "<shrink>"), on_reference=True, index=self.tests
        )
        if reference.verdict is not Verdict.PASS:
            return None  # the reference cannot run this order: no spec to judge by
        expected = expectations_from(case, reference)
        if expected is None:
            return None
        text = render(case, self.text, expected)
        target = await self.replayer.run(
            parse_scenario(text, "<shrink>"), on_reference=False, index=self.tests
        )
        return text if target.verdict is Verdict.FAIL else None


async def shrink(
    history: Sequence[Operation],
    findings: Sequence[Finding],
    replayer: Replayer,
    text_for: Callable[[Finding], ScenarioText],
    settings: ShrinkSettings | None = None,
) -> ShrinkResult | None:
    """The smallest scenario that still fails on the target, or None if none replays."""
    settings = settings or ShrinkSettings()
    started = trio.current_time()
    sizes = Counter(o.session for o in history)
    candidates = sorted(findings, key=lambda f: sizes[f.session])[: settings.findings_tried]
    oracle: _Oracle | None = None
    for finding in candidates:
        text = text_for(finding)
        tests_so_far = oracle.tests if oracle else 0
        oracle = _Oracle(replayer, text, settings, tests_so_far, started)
        case = await _first_that_fails(
            [case_from_history(history, finding, arrival) for arrival in ("sent", "upstream")],
            oracle,
        )
        if case is None:
            continue
        before = len(case.ops)
        case = await _minimise(case, oracle)
        # Renaming the steps (c1, d2, ...) changes no behaviour, but it is a new
        # scenario: judge it, and fall back on the case as found if it differs.
        written = await oracle.scenario_for(
            case.renamed(), beyond_budget=True
        ) or await oracle.scenario_for(case, beyond_budget=True)
        if written is None:
            continue
        scenario = parse_scenario(written, "<shrink>")
        failures, passes = await _confirm(scenario, replayer, settings.confirm_runs)
        return ShrinkResult(
            name=text.name,
            text=written,
            finding=finding,
            operations_before=before,
            operations_after=len(case.ops),
            steps=len(scenario.steps),
            tests=oracle.tests,
            seconds=trio.current_time() - started,
            exhausted=oracle.exhausted,
            confirm_runs=settings.confirm_runs,
            target_failures=failures,
            reference_passes=passes,
        )
    return None


async def _first_that_fails(cases: Sequence[Case], oracle: _Oracle) -> Case | None:
    for case in cases:
        if await oracle.fails(case):
            return case
    return None


async def _minimise(case: Case, oracle: _Oracle) -> Case:
    for _ in range(3):  # simplifying a chat can make more operations removable
        names = [o.name for o in case.ops]

        async def fails_with(kept: list[str], case: Case = case, names: list[str] = names) -> bool:
            return await oracle.fails(case.without(set(names) - set(kept)))

        kept = await ddmin(names, fails_with)
        case = case.without(set(names) - set(kept))
        simpler = await _simplify(case, oracle)
        if simpler == case:
            break
        case = simpler
    return case


async def _simplify(case: Case, oracle: _Oracle) -> Case:
    for name in [o.name for o in case.ops if o.op == "chat"]:
        for simpler in (_plain_answer, _no_faults, _no_hang_up):
            variant = simpler(case, case.op(name))
            if variant is not None and await oracle.fails(variant):
                case = variant
    return case


def _plain_answer(case: Case, op: CaseOp) -> Case | None:
    """The upstream answers at once: no hold, no release point."""
    if op.final != "hold":
        return None
    return case.with_op(replace(op, final="respond"), drop=["release"])


def _no_faults(case: Case, op: CaseOp) -> Case | None:
    return case.with_op(replace(op, faults=())) if op.faults else None


def _no_hang_up(case: Case, op: CaseOp) -> Case | None:
    if not any(p.op == op.name and p.action == "cancel" for p in case.points):
        return None
    return case.with_op(op, drop=["cancel"])


async def _confirm(scenario: Scenario, replayer: Replayer, runs: int) -> tuple[int, int]:
    failures = passes = 0
    for index in range(runs):
        target = await replayer.run(scenario, on_reference=False, index=index)
        failures += target.verdict is Verdict.FAIL
        reference = await replayer.run(scenario, on_reference=True, index=index)
        passes += reference.verdict is Verdict.PASS
    return failures, passes


__all__ = [
    "Case",
    "CaseOp",
    "Expectations",
    "Point",
    "Replayer",
    "ScenarioText",
    "ShrinkResult",
    "ShrinkSettings",
    "case_from_history",
    "expectations_from",
    "render",
    "shrink",
]
