"""Synthetic traffic on a virtual clock, through the real rollout code path.

A :class:`Scenario` describes users (a segment mix), each arm's behaviour (error rate, latency
distribution, accuracy), labels that arrive late, and optionally a fault confined to one
segment. :func:`simulate` drives a :class:`~safeshift.rollout.Rollout` with it — assignment,
telemetry, feedback joins, controller ticks and decisions are all the production code — and
tells the story stage by stage.

The demo reuses the same engine with real scikit-learn models in place of the synthetic
responder (see :class:`Responder`).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.markup import escape

from safeshift.assign import BASELINE, Assignment
from safeshift.clock import VirtualClock
from safeshift.errors import RolloutError, SafeshiftError, UnknownRolloutError
from safeshift.models import FakeModel, ModelResult
from safeshift.plan import Plan
from safeshift.progress import rollout_now, virtual_time_progress
from safeshift.rollout import Rollout
from safeshift.serving import run_sync
from safeshift.state import Decision, Phase
from safeshift.store import MemoryStore, Store, open_store


@dataclass(frozen=True, slots=True)
class ArmBehaviour:
    """How one model behaves on synthetic traffic."""

    error_rate: float = 0.01
    latency_ms: float = 60.0  # median
    latency_sigma: float = 0.5  # log-normal shape
    accuracy: float = 0.90


@dataclass(frozen=True, slots=True)
class Fault:
    """The candidate misbehaves only where ``attribute == value``."""

    attribute: str
    value: str
    error_rate: float | None = None
    accuracy: float | None = None
    latency_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class UserDifferences:
    """How users differ, on both arms alike: the traffic every real rollout sees, where requests
    of one user are correlated and a test that treats them as independent is too confident.

    Each user gets a request weight (log-normal with ``activity_sigma``: some users send far
    more requests), an error factor (Beta around 1 with ``error_concentration``, lower is more
    spread; a ``flaky_share`` of users fail ``flaky_factor`` times as often) and an accuracy
    offset (Beta around the arm's accuracy with ``accuracy_concentration``)."""

    activity_sigma: float = 1.5
    error_concentration: float = 2.0
    flaky_share: float = 0.02
    flaky_factor: float = 20.0
    accuracy_concentration: float = 8.0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    baseline: ArmBehaviour = ArmBehaviour()
    candidate: ArmBehaviour = ArmBehaviour()
    fault: Fault | None = None
    users: UserDifferences | None = None  # None: every user alike, requests independent
    challengers: tuple[ArmBehaviour, ...] = ()  # in the order of the plan's challengers
    rate: float | None = None  # requests per second, when the scenario is about traffic
    label_delay: float = 300.0  # seconds until a label arrives
    label_share: float = 0.5  # share of requests that ever get a label
    mix: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: {
        "country": {"US": 0.4, "IN": 0.2, "BR": 0.1, "GB": 0.1, "DE": 0.1, "JP": 0.1},
        "plan": {"free": 0.6, "pro": 0.38, "internal": 0.02},
    })


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("good", "the candidate is as good as the baseline, a little more accurate",
             candidate=ArmBehaviour(accuracy=0.92)),
    Scenario("identical", "A/A: the candidate is the baseline"),
    Scenario("errors", "the candidate fails on 3% of requests instead of 1%",
             candidate=ArmBehaviour(error_rate=0.03)),
    Scenario("slow", "the candidate is 4x slower (p50 240 ms)",
             candidate=ArmBehaviour(latency_ms=240.0)),
    Scenario("less-accurate", "the candidate is 6 points less accurate, seen only in late labels",
             candidate=ArmBehaviour(accuracy=0.84)),
    Scenario("segment-fault", "the candidate fails on 20% of requests from Brazil only",
             fault=Fault("country", "BR", error_rate=0.2)),
    Scenario("low-traffic", "a good candidate at a trickle of traffic (0.2 requests/s): "
             "stages hold, they never fail", candidate=ArmBehaviour(accuracy=0.91), rate=0.2),
    Scenario("identical-users-differ", "A/A on realistic users: a few fail far more often, "
             "some send far more requests", users=UserDifferences()),
    Scenario("errors-users-differ", "the candidate fails twice as often, on users who differ",
             candidate=ArmBehaviour(error_rate=0.02), users=UserDifferences()),
    Scenario("bandit", "for plans with challengers: the first challenger is 5 points more "
             "accurate, the second fails 5% of requests",
             challengers=(ArmBehaviour(accuracy=0.95), ArmBehaviour(error_rate=0.05))),
)}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}") from None


@dataclass(slots=True)
class Request:
    """One synthetic request in flight."""

    id: str
    unit: str
    context: dict[str, str]
    assignment: Assignment
    row: Any
    label: Any
    u: float = 0.5  # common random number: both arms are right or wrong on the same inputs
    user: int = -1  # the population's index of the user, for their propensities


class Responder(Protocol):
    """Answers a batch of requests for one arm: one ModelResult per request."""

    def __call__(self, arm: str, requests: Sequence[Request]) -> list[ModelResult]: ...


class SyntheticResponder:
    """Draws errors, latencies and correctness from the scenario."""

    def __init__(self, scenario: Scenario, rng: np.random.Generator,
                 challengers: Sequence[str] = (), population: Population | None = None) -> None:
        self.scenario = scenario
        self.rng = rng
        self.population = population
        # challengers the scenario does not describe behave like the candidate
        self.variants = dict(zip(challengers, scenario.challengers, strict=False))

    def _behaviour(self, arm: str, context: Mapping[str, str],
                   user: int = -1) -> tuple[float, float, float, float]:
        candidate = self.variants.get(arm, self.scenario.candidate)
        b = self.scenario.baseline if arm == BASELINE else candidate
        err, acc, lat, sigma = b.error_rate, b.accuracy, b.latency_ms, b.latency_sigma
        if self.population is not None and user >= 0 and self.population.error_factor is not None:
            err = min(1.0, err * float(self.population.error_factor[user]))
            acc = min(1.0, max(0.0, acc + float(self.population.accuracy_offset[user])))
        f = self.scenario.fault
        if arm != BASELINE and f is not None and context.get(f.attribute) == f.value:
            err = f.error_rate if f.error_rate is not None else err
            acc = f.accuracy if f.accuracy is not None else acc
            lat *= f.latency_factor
        return err, acc, lat, sigma

    def __call__(self, arm: str, requests: Sequence[Request]) -> list[ModelResult]:
        out = []
        u = self.rng.random(len(requests))
        z = self.rng.standard_normal(len(requests))
        for i, r in enumerate(requests):
            err, acc, lat, sigma = self._behaviour(arm, r.context, r.user)
            latency = float(lat * math.exp(sigma * z[i]))
            if u[i] < err:
                out.append(ModelResult(error="RuntimeError: simulated fault", latency_ms=latency))
            else:
                output = r.label if r.u < acc else 1 - int(r.label)
                out.append(ModelResult(outputs=[output], latency_ms=latency))
        return out


class Population:
    """A fixed set of synthetic users, each with sticky segment attributes."""

    def __init__(self, mix: Mapping[str, Mapping[str, float]], size: int,
                 rng: np.random.Generator, users: UserDifferences | None = None,
                 base_accuracy: float = 0.9) -> None:
        self.size = size
        self.attrs: dict[str, tuple[list[str], np.ndarray]] = {}
        for attr, weights in mix.items():
            values = list(weights)
            p = np.array([weights[v] for v in values], dtype=float)
            self.attrs[attr] = (values, rng.choice(len(values), size=size, p=p / p.sum()))
        self.activity: np.ndarray | None = None
        self.error_factor: np.ndarray | None = None
        self.accuracy_offset: np.ndarray = np.zeros(size)
        if users is not None:
            weight = rng.lognormal(0.0, users.activity_sigma, size)
            self.activity = weight / weight.sum()
            m = 0.1  # the factor's Beta is drawn on [0, 1] with this mean, then scaled to mean 1
            factor = rng.beta(m * users.error_concentration, (1 - m) * users.error_concentration,
                              size) / m
            factor[rng.random(size) < users.flaky_share] = users.flaky_factor
            self.error_factor = factor
            c = users.accuracy_concentration
            self.accuracy_offset = rng.beta(base_accuracy * c, (1 - base_accuracy) * c,
                                            size) - base_accuracy

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The users who send the next ``n`` requests."""
        if self.activity is None:
            return rng.integers(0, self.size, size=n)
        return rng.choice(self.size, size=n, p=self.activity)

    def context(self, i: int) -> dict[str, str]:
        return {attr: values[int(idx[i])] for attr, (values, idx) in self.attrs.items()}


@dataclass(slots=True)
class Story:
    """What happened, for printing and for JSON."""

    rollout: str
    scenario: str
    outcome: Phase
    virtual_seconds: float
    wall_seconds: float
    requests: int
    candidate_requests: int
    fallbacks: int
    labels: int
    decisions: list[Decision]
    final_verdicts: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout": self.rollout, "scenario": self.scenario, "outcome": str(self.outcome),
            "virtual_seconds": self.virtual_seconds, "wall_seconds": round(self.wall_seconds, 3),
            "requests": self.requests, "candidate_requests": self.candidate_requests,
            "fallbacks": self.fallbacks, "labels": self.labels,
            "decisions": [d.to_json() for d in self.decisions],
            "final_verdicts": self.final_verdicts,
        }


def _when(start: float, now: float) -> str:
    seconds = int(now - start)
    return f"+{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def drive(
    rollout: Rollout,
    clock: VirtualClock,
    *,
    respond: Responder,
    rows: Callable[[np.random.Generator, int], tuple[list[Any], list[Any]]],
    population: Population,
    rng: np.random.Generator,
    rate: float,
    max_seconds: float,
    label_delay: float,
    label_share: float,
    step: float = 10.0,
    tick_every: float = 30.0,
    approve_after: float = 600.0,
    on_decision: Callable[[Decision, float], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> tuple[int, int, int, int]:
    """Run traffic until the rollout ends or ``max_seconds`` of virtual time pass.

    ``rows(rng, n)`` gives n input rows and their true labels. Returns (requests, candidate
    requests, fallbacks, labels delivered).
    """
    start = clock.now()
    labels: list[tuple[float, int, str, Any]] = []
    counter = requests_total = candidate_total = fallbacks = delivered = 0
    next_tick = start + tick_every
    awaiting_since: float | None = None
    while clock.now() - start < max_seconds:
        n = int(rng.poisson(rate * step))
        users = population.draw(rng, n)
        inputs, truths = rows(rng, n)
        uniforms = rng.random(n)
        batch: dict[str, list[Request]] = {BASELINE: []}
        shadowed: list[Request] = []
        for k in range(n):
            uid = int(users[k])
            ctx = population.context(uid)
            unit = f"user-{uid}"
            a = rollout.assign(unit, ctx)
            counter += 1
            req = Request(f"sim-{counter}", unit, ctx, a, inputs[k], truths[k], float(uniforms[k]),
                          uid)
            batch.setdefault(a.telemetry_arm, []).append(req)
            if a.shadow:
                shadowed.append(req)
        served, failed_over = serve_requests(rollout, batch, shadowed, respond)
        candidate_total += served
        fallbacks += failed_over
        requests_total += n
        now = clock.now()
        for req in (r for reqs in batch.values() for r in reqs):
            if rng.random() < label_share:
                arrives = now + float(rng.exponential(label_delay))
                heapq.heappush(labels, (arrives, counter, req.id, req.label))
                counter += 1
        clock.advance(step)
        now = clock.now()
        if labels and labels[0][0] <= now:
            rollout.flush()
            due: list[dict[str, Any]] = []
            while labels and labels[0][0] <= now:
                _, _, rid, label = heapq.heappop(labels)
                due.append({"id": rid, "label": label})
            try:
                rollout.feedback_many(due)
                delivered += len(due)
            except SafeshiftError:
                pass  # past its label window
        if now >= next_tick:
            next_tick += tick_every
            decision = rollout.tick()
            if decision is not None and on_decision is not None:
                on_decision(decision, now)
            state = rollout.state()
            if state.phase.terminal or state.phase is Phase.PAUSED:
                break  # nobody resumes a simulated rollout
            if state.phase is Phase.AWAITING_APPROVAL:
                awaiting_since = awaiting_since or now
                if now - awaiting_since >= approve_after:
                    d = rollout.approve(actor="simulated-operator",
                                        reason="reviewed the stage's evidence (safeshift status)")
                    awaiting_since = None
                    if on_decision is not None:
                        on_decision(d, now)
            if on_progress is not None:
                on_progress(now - start)
    rollout.flush()
    return requests_total, candidate_total, fallbacks, delivered


def serve_requests(rollout: Rollout, batch: Mapping[str, Sequence[Request]],
                   shadowed: Sequence[Request], respond: Responder) -> tuple[int, int]:
    """Serve simulated requests, grouped by the arm that serves them (``shadowed``: those whose
    copy goes to the candidate): each arm answers its batch at once (fast), then the serving
    steps take each request's answer in turn — the same steps, breaker and counting as library
    mode and the gateway (a test compares the three). Returns (candidate requests, fallbacks)."""
    serving = rollout.serving
    answers: dict[str, ModelResult] = {}
    for arm, reqs in batch.items():
        for req, res in zip(reqs, respond(arm, reqs) if reqs else [], strict=True):
            answers[req.id] = res
    mirrored = dict(zip((r.id for r in shadowed),
                        respond(rollout.shadow_variant, shadowed) if shadowed else [],
                        strict=True))
    candidates = fallbacks = 0
    for req in (r for reqs in batch.values() for r in reqs):
        a = req.assignment
        answer = run_sync(serving.serve(a, [req.row], context=req.context, request_id=req.id),
                          partial(_answer, respond, answers, req))
        if a.is_candidate:
            candidates += 1
            fallbacks += answer.arm == BASELINE
        if answer.shadow and answer.failure is None:
            run_sync(serving.shadow(a, [req.row], answer.result, context=req.context,
                                    request_id=req.id),
                     partial(_given, mirrored[req.id]))
    return candidates, fallbacks


def _answer(respond: Responder, answers: Mapping[str, ModelResult], req: Request,
            arm: str) -> ModelResult:
    """The answer of ``arm`` to ``req``: drawn with its arm's batch, or — the baseline answering
    for a failed candidate — on its own."""
    if arm == req.assignment.telemetry_arm:
        return answers[req.id]
    return respond(arm, [req])[0]


def _given(result: ModelResult, arm: str) -> ModelResult:
    return result


def _binary_rows(rng: np.random.Generator, n: int) -> tuple[list[Any], list[Any]]:
    truths = rng.integers(0, 2, size=n).tolist()
    return [{"x": 0.0}] * n, truths


def simulate(plan: Plan, scenario: Scenario, *, seed: int = 1, rate: float = 20.0,
             max_hours: float = 48.0, store: Store | str | None = None,
             console: Console | None = None, population: int = 50_000) -> Story:
    """Run ``plan`` against ``scenario`` on a virtual clock and tell what happened."""
    rng = np.random.default_rng(seed)
    clock = VirtualClock()
    if store is None:
        store = MemoryStore()
    elif isinstance(store, str):
        store = open_store(store)
    # synthetic traffic: the plan's models are not loaded; labels arrive within minutes, so
    # request records need not be kept for the plan's (days-long) label window
    window = min(plan.serving.label_window, max(3600.0, 20 * scenario.label_delay))
    # a simulated promotion moves no registry alias, the synthetic models answer no probe, and
    # no Prometheus measures them
    plan = plan.model_copy(update={
        "guardrails": [g for g in plan.guardrails if g.prometheus is None],
        "rollout": f"{plan.rollout}-sim-{scenario.name}-{seed}",
        "serving": plan.serving.model_copy(update={"label_window": window}),
        "registry": plan.registry and plan.registry.model_copy(update={"promote_alias": None}),
        "probes": [],
    })
    try:
        store.get_state(plan.rollout)
    except UnknownRolloutError:
        pass
    else:
        raise RolloutError(f"{plan.rollout!r} already ran in {store.url}; use another --seed "
                           "or another store")
    # the assignment seed follows the simulation's, so a run is the same on every machine
    rollout = Rollout.from_plan(plan, store=store, clock=clock,
                                models={v: FakeModel() for v in (BASELINE, *plan.variants)},
                                salt_seed=f"simulate-{seed}")
    pop = Population(scenario.mix, population, rng, scenario.users, scenario.baseline.accuracy)
    start = clock.now()
    wall = time.perf_counter()
    if console is not None:
        console.print(f"[bold]{plan.rollout}[/]: scenario {scenario.name!r} — "
                      f"{scenario.description}; {rate:g} requests/s, seed {seed}")

    def told(d: Decision, now: float) -> None:
        if console is not None:
            console.print(f"  {_when(start, now)}  [bold]{d.action}[/] → {d.phase}: "
                          f"{escape(d.reason)}", markup=True, highlight=False)

    max_seconds = max_hours * 3600
    with virtual_time_progress(console, max_seconds, partial(rollout_now, rollout)) as moved:
        n, nc, fb, labels = drive(
            rollout, clock,
            respond=SyntheticResponder(scenario, rng, [c.name for c in plan.challengers], pop),
            rows=_binary_rows,
            population=pop, rng=rng, rate=rate, max_seconds=max_seconds,
            label_delay=scenario.label_delay, label_share=scenario.label_share,
            on_decision=told, on_progress=moved)
    state = rollout.state()
    verdicts = []
    decisions = rollout.decisions()
    if decisions and decisions[-1].evidence:
        verdicts = [v for v in decisions[-1].evidence.get("verdicts", [])
                    if v.get("segment") is None or v.get("status") == "harm"]
    story = Story(plan.rollout, scenario.name, state.phase, clock.now() - start,
                  time.perf_counter() - wall, n, nc, fb, labels, decisions, verdicts)
    if console is not None:
        console.print(f"  outcome: [bold]{state.phase}[/] after {_when(start, clock.now())[1:]} "
                      f"of virtual time ({story.wall_seconds:.1f}s real); {n:,} requests, "
                      f"{nc:,} served by the candidate, {fb:,} candidate faults answered by the "
                      f"baseline, {labels:,} labels joined")
        if state.phase is not Phase.PROMOTED and state.phase is not Phase.ROLLED_BACK:
            stage = plan.stages[state.stage_index].name if state.stage_index >= 0 else "-"
            if state.phase is Phase.PAUSED:
                console.print(f"  paused in stage {stage!r}, waiting for a person: {state.reason}",
                              markup=False)
            else:
                console.print(f"  still {state.phase} in stage {stage!r} when the {max_hours:g} h "
                              f"of virtual time ran out (last decision: {state.reason})",
                              markup=False)
    rollout.close()
    return story

