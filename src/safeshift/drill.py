"""Rollback drills: rehearse the rollback path of a rollout on a sandboxed copy of it.

A rollback nobody has seen work is a hope. :func:`run_drill` takes a plan, loads its real
models, wraps the candidate in a :class:`FaultInjector` and registers a *drill copy* of the
rollout — its own name (``NAME~drill-<when>-<fault>``, a name no plan file can take), in its
own store (a temporary SQLite file unless one is given), so nothing touches the real rollout's
assignment or records. The copy starts directly in the plan's widest partial-traffic stage,
without its approvals (a drill rehearses the rollback, not the sign-offs), held there (a long
``min_duration``) so it can only end by rollback. Guardrails that judge no such stage (shadow
only) are left out.

Then, per fault, on the real wall clock and through the real serving path
(:meth:`Rollout.predict`: breaker, timeouts, fallback, telemetry; :meth:`Rollout.tick`: the
controller), it drives traffic for a few seconds healthy, injects the fault at a recorded
instant and keeps driving until the controller rolls the copy back (or a bound passes), and
measures: fault → rollback decision, fault → the last answer a user got from the candidate,
and user-visible errors (requests that got no answer: must be 0, the baseline answers for a
failing candidate). The rollout's decisions carry ``drill: true`` in their audit events.

Faults: ``errors`` (every candidate call fails), ``latency`` (candidate calls slower than the
plan's latency guardrail's threshold, within the timeout), ``wrong-segment`` (wrong answers
for one value of the plan's first segment, caught by a label-fed guardrail: the driver sends
the true label of each request as feedback), ``hang`` (candidate calls never return: the
timeout and the pool's hung-call handling answer with the baseline). A fault the plan cannot
catch — no latency guardrail, no segment, no label guardrail — is skipped with the reason.

Inputs: the drill needs rows the plan's models read and their true labels. It takes them from
scikit-learn's breast-cancer data when the baseline model names its features among that data's
(the example plans' models); otherwise it says so (exit 2).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from safeshift import ops
from safeshift._units import BASIS_POINTS
from safeshift.assign import BASELINE
from safeshift.errors import PlanError, SafeshiftError
from safeshift.models import ModelBackend, ModelResult, load_model
from safeshift.models.base import Rows
from safeshift.plan import DRILL_MARK, Plan, Source
from safeshift.rollout import Rollout
from safeshift.state import Action, Phase
from safeshift.store import Store, open_store

DRILL_WINDOW = 1.0
"""Seconds per telemetry window in a drill copy (the plan's own is typically 60 s)."""
FAULTS = ("errors", "latency", "wrong-segment", "hang")
HOLD = 86400.0
"""The drill stage's min_duration: it never advances or promotes during a drill."""


class DrillInputError(PlanError):
    """The plan cannot be drilled as asked (exit 2)."""


class Marked(dict[str, Any]):
    """A row of the faulted segment: the injector recognises it (models read it as a dict)."""


class FaultInjector:
    """A model backend wrapper that passes calls through until a fault is switched on."""

    def __init__(self, inner: ModelBackend) -> None:
        self.inner = inner
        self.name = f"drill({inner.name})"
        self.fault: str | None = None
        self.delay = 0.0  # seconds, for latency
        self._release = threading.Event()  # ends hung calls when the drill is over

    def inject(self, fault: str, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.fault = fault

    def release(self) -> None:
        self.fault = None
        self._release.set()

    def predict(self, rows: Rows) -> ModelResult:
        fault = self.fault
        start = time.perf_counter()
        if fault == "errors":
            return ModelResult(error="RuntimeError: drill fault (errors)", latency_ms=0.0)
        if fault == "hang":
            self._release.wait(60.0)
            return ModelResult(error="RuntimeError: drill fault (hang)",
                               latency_ms=(time.perf_counter() - start) * 1000)
        if fault == "latency":
            time.sleep(self.delay)
        result = self.inner.predict(rows)
        if fault == "wrong-segment" and result.ok and result.outputs is not None:
            result.outputs = [_wrong(o) if isinstance(r, Marked) else o
                              for r, o in zip(rows, result.outputs, strict=False)]
        if fault == "latency":
            result.latency_ms = (time.perf_counter() - start) * 1000
        return result

    async def apredict(self, rows: Rows) -> ModelResult:
        return self.predict(rows)

    def close(self) -> None:
        self.release()
        self.inner.close()


def _wrong(output: Any) -> Any:
    """Another answer than ``output``."""
    if isinstance(output, bool):
        return not output
    if isinstance(output, int) and output in (0, 1):
        return 1 - output
    if isinstance(output, int | float):
        return -output - 1
    return f"not {output}"


@dataclass(slots=True)
class FaultReport:
    """What one fault's drill showed."""

    fault: str
    rollout: str = ""
    skipped: str | None = None  # why the fault could not be drilled
    rolled_back: bool = False
    decision_s: float | None = None  # fault -> rollback decision
    last_candidate_s: float | None = None  # fault -> last candidate answer a user got
    user_errors: int = 0
    requests: int = 0
    candidate_answers: int = 0
    fallbacks: int = 0
    caught_by: str = ""
    reason: str = ""
    breaker_opened: bool = False
    early: str | None = None  # a decision before the fault (the drill then failed)
    audit_ok: bool = False
    audit: str = ""

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.rolled_back and self.user_errors == 0
                                            and self.early is None and self.audit_ok)

    def to_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "rollout": self.rollout, "skipped": self.skipped,
                "rolled_back": self.rolled_back,
                "fault_to_decision_s": _round(self.decision_s),
                "fault_to_last_candidate_answer_s": _round(self.last_candidate_s),
                "user_visible_errors": self.user_errors, "requests": self.requests,
                "candidate_answers": self.candidate_answers, "fallbacks": self.fallbacks,
                "caught_by": self.caught_by, "reason": self.reason,
                "breaker_opened": self.breaker_opened, "decision_before_fault": self.early,
                "audit_intact": self.audit_ok, "audit": self.audit, "ok": self.ok}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


@dataclass(slots=True)
class DrillReport:
    plan: str
    store: str
    stage: str
    traffic: float
    faults: list[FaultReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.faults) and any(f.skipped is None for f in self.faults)

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan, "store": self.store, "stage": self.stage,
                "traffic": self.traffic, "ok": self.ok,
                "faults": [f.to_json() for f in self.faults]}


# -- the sandboxed copy --------------------------------------------------------------------------


def drill_plan(plan: Plan, name: str) -> tuple[Plan, str]:
    """The drill copy of ``plan`` named ``name``: one stage (the widest partial-traffic one,
    ungated, held), the guardrails that judge it. Returns it and the stage's name."""
    partial = [s for s in plan.stages if s.traffic > 0 and not s.is_full and s.experiment is None]
    if not partial:
        raise DrillInputError("the plan has no stage where the candidate serves part of the "
                              "traffic (stages.*.traffic between 0 and 100%); a drill needs one")
    stage = max(partial, key=lambda s: s.traffic)
    held = stage.model_copy(update={"approval": "none", "reviews": [], "confirm": None,
                                    "min_duration": HOLD, "max_duration": None})
    data = plan.canonical()
    data["rollout"] = name
    data["stages"] = [held.model_dump(mode="json", exclude_none=True)]
    data["stages"][0].pop("reviews", None)
    # Prometheus never scrapes a drill's in-process gateway: its guardrails would hold on no data
    data["guardrails"] = [g.model_dump(mode="json", exclude_none=True)
                          for g in plan.guardrails if g.applies_to(held) and g.prometheus is None]
    data.pop("notifications", None)  # a drill pages nobody
    # telemetry reaches the controller per closed window: a drill measures the rollback path
    # in seconds, so its windows are short (in production add up to one plan window)
    data["serving"] = {**data.get("serving", {}), "telemetry_window": DRILL_WINDOW}
    copy = Plan.from_dict(data, base_dir=plan.base_dir, source=f"drill copy of {plan.rollout}")
    return copy, stage.name


def drill_name(rollout: str, fault: str, when: float) -> str:
    stamp = datetime.fromtimestamp(when, UTC).strftime("%Y%m%dt%H%M%S")
    return f"{rollout[:64 - len(DRILL_MARK) - 16 - len(fault) - 1]}{DRILL_MARK}{stamp}-{fault}"


# -- inputs -------------------------------------------------------------------------------------


def drill_inputs(model: ModelBackend) -> tuple[list[dict[str, float]], list[Any]]:
    """Rows the plan's models read and their true labels (see the module's docstring)."""
    features = getattr(model, "features", None)
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [re.sub(r"[^a-z0-9]+", "_", n.lower()).strip("_") for n in data.feature_names]
    if not features or not set(features) <= set(names):
        raise DrillInputError(
            f"the drill cannot make inputs for the baseline model {model.name!r}: it makes rows "
            "from scikit-learn's breast-cancer data for models that name their features among "
            "it (the example plans'); drill a plan whose models do")
    cols = [names.index(f) for f in features]
    rows = [{f: float(data.data[i, c]) for f, c in zip(features, cols, strict=True)}
            for i in range(len(data.data))]
    return rows, [int(y) for y in data.target]


# -- one fault ----------------------------------------------------------------------------------


def _latency_delay(plan: Plan, timeout: float) -> tuple[float | None, str]:
    bounds = [g.above for g in plan.guardrails if g.metric == "latency_ms" and g.above is not None]
    if not bounds:
        return None, "the plan has no latency guardrail (metric latency_ms with above:)"
    above = min(bounds) / 1000.0
    if above >= timeout:
        return None, (f"the latency guardrail's threshold ({above * 1000:g} ms) is not below the "
                      f"candidate timeout ({timeout * 1000:g} ms): slow calls time out instead")
    return min(above * 1.5, (above + timeout) / 2), ""


def _label_guardrail(plan: Plan) -> bool:
    return any(g.metric == "accuracy" and g.info.source is Source.FEEDBACK for g in plan.guardrails)


class _Driver:
    """Traffic from ``workers`` threads through ``Rollout.predict``, labels as feedback."""

    def __init__(self, rollout: Rollout, rows: Sequence[dict[str, float]], truths: Sequence[Any],
                 segment: str | None, rng: np.random.Generator, labels: bool) -> None:
        self.rollout = rollout
        self.rows = rows
        self.truths = truths
        self.segment = segment
        self.labels = labels
        self.seeds = rng.integers(0, 2**31, size=64).tolist()
        self.lock = threading.Lock()
        self.pending: list[dict[str, Any]] = []
        self.requests = self.candidate = self.fallbacks = self.errors = 0
        self.last_candidate = 0.0
        self.fault_at: float | None = None
        self.stop = threading.Event()

    def context(self, user: int) -> dict[str, str]:
        ctx = {}
        for k, attr in enumerate(self.rollout.plan.segments):
            ctx[attr] = f"drill-{(user // (k + 1)) % 3}"
        return ctx

    def work(self, worker: int) -> None:
        rng = np.random.default_rng(self.seeds[worker % len(self.seeds)])
        while not self.stop.is_set():
            user = int(rng.integers(0, 5000))
            i = int(rng.integers(0, len(self.rows)))
            ctx = self.context(user)
            hit = self.segment is not None and ctx.get(self.segment) == "drill-1"
            row = Marked(self.rows[i]) if hit else dict(self.rows[i])
            try:
                p = self.rollout.predict(row, unit=f"drill-user-{user}", context=ctx)
            except Exception:  # anything a user would see as a failed request
                with self.lock:
                    self.requests += 1
                    self.errors += 1
                continue
            now = time.time()
            with self.lock:
                self.requests += 1
                if p.arm != BASELINE:
                    self.candidate += 1
                    self.last_candidate = max(self.last_candidate, now)
                elif p.fallback:
                    self.fallbacks += 1
                if self.labels:
                    self.pending.append({"id": p.id, "label": self.truths[i]})
            time.sleep(0.02)  # at most about 50 requests/s per worker

    def feedback(self) -> None:
        with self.lock:
            due, self.pending = self.pending, []
        if due:
            self.rollout.flush()
            with contextlib.suppress(SafeshiftError):  # past its window: nothing to join
                self.rollout.feedback_many(due, source="drill")


def drill_fault(plan: Plan, fault: str, store: Store, *, rows: Sequence[dict[str, float]],
                truths: Sequence[Any], seed: int, warmup: float, bound: float,
                tick_every: float = 0.25, workers: int = 4) -> FaultReport:
    """Drill one fault on a fresh copy of ``plan`` in ``store``."""
    name = drill_name(plan.rollout, fault, time.time())
    copy, _ = drill_plan(plan, name)
    report = FaultReport(fault, rollout=name)
    timeout = copy.variant("candidate").timeout or copy.serving.candidate_timeout
    delay = 0.0
    segment = None
    if fault == "latency":
        found, why = _latency_delay(copy, timeout)
        if found is None:
            report.skipped = why
            return report
        delay = found
    if fault == "wrong-segment":
        if not copy.segments:
            report.skipped = "the plan has no segments: a fault in one segment cannot be placed"
            return report
        if not _label_guardrail(copy):
            report.skipped = ("the plan has no accuracy guardrail fed by labels (source: "
                              "feedback): wrong answers would not be seen")
            return report
        segment = copy.segments[0]
    baseline = load_model(copy.baseline.model, copy.base_dir)
    injector = FaultInjector(load_model(copy.candidate.model, copy.base_dir))
    rollout = Rollout.from_plan(copy, store=store, models={BASELINE: baseline,
                                                           "candidate": injector},
                                salt_seed=f"drill-{seed}")
    driver = _Driver(rollout, rows, truths, segment, np.random.default_rng(seed),
                     labels=_label_guardrail(copy))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="safeshift-drill")
    futures = [pool.submit(driver.work, w) for w in range(workers)]
    try:
        start = time.time()
        injected: float | None = None
        while True:
            time.sleep(tick_every)
            now = time.time()
            if injected is None and now - start >= warmup:
                injector.inject(fault, delay=delay)
                injected = driver.fault_at = time.time()
                with driver.lock:
                    driver.last_candidate = 0.0
            driver.feedback()
            decision = rollout.tick()
            if decision is not None and decision.action is Action.ROLLBACK:
                if injected is None:
                    report.early = decision.reason
                break
            if injected is not None and time.time() - injected >= bound:
                break
        # keep driving a moment: the last candidate answer is measured after the decision too
        time.sleep(max(0.5, 2 * tick_every))
    finally:
        driver.stop.set()
        injector.release()
        for f in futures:
            f.result()
        pool.shutdown()
        driver.feedback()
        guard = rollout.serving.guards["candidate"]
        report.breaker_opened = guard.breaker.opened > 0
        rollout.close()
    state = store.get_state(name)
    decisions = store.decisions(name)
    back = [d for d in decisions if d.action is Action.ROLLBACK]
    report.requests = driver.requests
    report.candidate_answers = driver.candidate
    report.fallbacks = driver.fallbacks
    report.user_errors = driver.errors
    report.rolled_back = state.phase is Phase.ROLLED_BACK and injected is not None
    if back and injected is not None:
        report.decision_s = back[0].at - injected
        report.reason = back[0].reason
        report.caught_by = _caught_by(back[0].evidence, report.breaker_opened)
    if injected is not None:
        last = driver.last_candidate
        report.last_candidate_s = (last - injected) if last else 0.0
    audit = ops.verify_audit(store, name)
    events = ops.audit_events(store, name)
    marked = bool(events) and all(e.detail.get("drill") is True for e in events)
    report.audit_ok = audit.ok and marked
    report.audit = audit.message if marked else "audit events are not marked as a drill"
    return report


def _caught_by(evidence: Mapping[str, Any], breaker: bool) -> str:
    harms = [v for v in evidence.get("verdicts", []) if v.get("status") == "harm"]
    names = []
    for v in harms:
        where = v.get("segment")
        label = str(v.get("guardrail") or v.get("metric") or "?")
        names.append(f"{label} ({where})" if where else label)
    text = "guardrail " + ", ".join(dict.fromkeys(names)) if names else "the controller"
    return text + ("; circuit breaker opened first" if breaker else "")


def run_drill(plan: Plan, faults: Sequence[str] = FAULTS, *, store: str | None = None,
              seed: int = 1, warmup: float = 2.0, bound: float = 30.0,
              on_fault: Callable[[FaultReport], None] | None = None) -> DrillReport:
    """Drill each of ``faults`` on its own copy of ``plan`` (see the module's docstring)."""
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise DrillInputError(f"unknown fault {unknown[0]!r}; use one of {', '.join(FAULTS)} "
                              "or all")
    _, stage = drill_plan(plan, "x" + DRILL_MARK + "check")
    baseline = load_model(plan.baseline.model, plan.base_dir)
    try:
        rows, truths = drill_inputs(baseline)
    finally:
        baseline.close()
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="safeshift-drill-")
        store = f"sqlite:///{Path(tmp.name) / 'drill.db'}"
    opened = open_store(store)
    traffic = next(s.traffic for s in plan.stages if s.name == stage) / BASIS_POINTS
    report = DrillReport(plan.rollout, store if tmp is None else f"{store} (temporary)", stage,
                         traffic)
    try:
        for k, fault in enumerate(faults):
            r = drill_fault(plan, fault, opened, rows=rows, truths=truths, seed=seed + k,
                            warmup=warmup, bound=bound)
            report.faults.append(r)
            if on_fault is not None:
                on_fault(r)
    finally:
        opened.close()
        if tmp is not None:
            tmp.cleanup()
    return report
