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
from typing import Any, Protocol

import httpx
import numpy as np

from safeshift import ops
from safeshift._units import BASIS_POINTS
from safeshift.assign import BASELINE
from safeshift.errors import PlanError, SafeshiftError
from safeshift.models import ModelBackend, ModelResult, load_model
from safeshift.models.base import Rows, SyncBackend
from safeshift.plan import DRILL_MARK, Plan, Source
from safeshift.rollout import Rollout
from safeshift.state import Action
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


class FaultInjector(SyncBackend):
    """A model backend wrapper that passes calls through until a fault is switched on. It is
    a synchronous backend, so a gateway runs it in the candidate's thread pool under its
    timeout, as it would a scikit-learn model (a hang then ties up a thread, not the loop)."""

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


def fault_setup(copy: Plan, fault: str) -> tuple[float, str | None, str | None]:
    """How ``fault`` is drilled on the drill copy: the latency fault's delay (seconds), the
    segment attribute the wrong-segment fault hits, or why the fault cannot be drilled."""
    timeout = copy.variant("candidate").timeout or copy.serving.candidate_timeout
    if fault == "latency":
        found, why = _latency_delay(copy, timeout)
        return (0.0, None, why) if found is None else (found, None, None)
    if fault == "wrong-segment":
        if not copy.segments:
            return 0.0, None, "the plan has no segments: a fault in one segment cannot be placed"
        if not _label_guardrail(copy):
            return 0.0, None, ("the plan has no accuracy guardrail fed by labels (source: "
                               "feedback): wrong answers would not be seen")
        return 0.0, copy.segments[0], None
    return 0.0, None, None


FAULTED_VALUE = "drill-1"
"""The value of the faulted segment attribute in the drill's traffic (wrong-segment)."""


def drill_context(plan: Plan, user: int) -> dict[str, str]:
    """The drill traffic's context for ``user``: three values per segment attribute."""
    return {attr: f"drill-{(user // (k + 1)) % 3}" for k, attr in enumerate(plan.segments)}


def marked(rows: Sequence[Any], segment: str | None,
           context: Mapping[str, Any] | None) -> list[Any]:
    """``rows``, marked for the injector when they belong to the faulted segment."""
    if segment is None or (context or {}).get(segment) != FAULTED_VALUE:
        return list(rows)
    return [Marked(r) if isinstance(r, dict) else r for r in rows]


@dataclass(slots=True)
class Answer:
    """What one drill request got (a user-visible error raises instead)."""

    arm: str
    id: str
    fallback: bool


@dataclass(slots=True)
class Finished:
    """The drill copy at the end: its rollback (if any), the breaker, the audit log."""

    rolled_back_at: float | None = None
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    breaker_opened: bool = False
    audit_ok: bool = False
    audit: str = ""


class Target(Protocol):
    """Where a drill runs: in this process (:class:`LocalTarget`) or on a running gateway
    (:class:`RemoteTarget`). The driving loop is the same."""

    name: str

    def predict(self, row: dict[str, Any], unit: str, context: dict[str, str]) -> Answer: ...

    def feedback(self, items: list[dict[str, Any]]) -> None: ...

    def inject(self) -> float: ...

    def step(self) -> bool: ...

    def finish(self) -> Finished: ...


def finished(store: Store, name: str, *, breaker_opened: bool) -> Finished:
    """The drill copy ``name``'s rollback and audit log, read from ``store``."""
    back = [d for d in store.decisions(name)
            if d.action is Action.ROLLBACK and d.actor == "controller"]
    audit = ops.verify_audit(store, name)
    events = ops.audit_events(store, name)
    marked_ok = bool(events) and all(e.detail.get("drill") is True for e in events)
    out = Finished(breaker_opened=breaker_opened, audit_ok=audit.ok and marked_ok,
                   audit=audit.message if marked_ok else "audit events are not marked as a drill")
    if back:
        out.rolled_back_at, out.reason, out.evidence = back[0].at, back[0].reason, back[0].evidence
    return out


class LocalTarget:
    """The drill copy in this process: the plan's real models, the candidate wrapped in a
    :class:`FaultInjector`, served by :meth:`Rollout.predict` and decided by its ticks."""

    def __init__(self, copy: Plan, fault: str, store: Store, *, seed: int) -> None:
        self.name = copy.rollout
        self.store = store
        self.delay, self.segment, _ = fault_setup(copy, fault)
        self.fault = fault
        baseline = load_model(copy.baseline.model, copy.base_dir)
        self.injector = FaultInjector(load_model(copy.candidate.model, copy.base_dir))
        self.rollout = Rollout.from_plan(copy, store=store, models={
            BASELINE: baseline, "candidate": self.injector}, salt_seed=f"drill-{seed}")

    def predict(self, row: dict[str, Any], unit: str, context: dict[str, str]) -> Answer:
        rows = marked([row], self.segment, context)
        p = self.rollout.predict(rows[0], unit=unit, context=context)
        return Answer(p.arm, p.id, p.fallback is not None)

    def feedback(self, items: list[dict[str, Any]]) -> None:
        self.rollout.flush()
        with contextlib.suppress(SafeshiftError):  # past its window: nothing to join
            self.rollout.feedback_many(items, source="drill")

    def inject(self) -> float:
        self.injector.inject(self.fault, delay=self.delay)
        return time.time()

    def step(self) -> bool:
        decision = self.rollout.tick()
        return decision is not None and decision.action is Action.ROLLBACK

    def finish(self) -> Finished:
        self.injector.release()
        opened = self.rollout.serving.guards["candidate"].breaker.opened > 0
        self.rollout.close()
        return finished(self.store, self.name, breaker_opened=opened)


class DrillServerError(SafeshiftError):
    """The gateway refused or failed a drill request (exit 1; its message says why)."""


def _answer(r: httpx.Response, what: str) -> Any:
    if r.status_code >= 400:
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text
        raise DrillServerError(f"{what}: HTTP {r.status_code}: {str(message)[:500]}")
    return r.json()


class RemoteTarget:
    """A drill copy on a running gateway (:mod:`safeshift.gateway.drills`): made, served,
    faulted and ended through its admin routes, decided by the gateway's own controller task.
    Times are the caller's: the server's decision time is shifted by the difference between
    the two clocks at the moment the fault went on."""

    def __init__(self, client: httpx.Client, plan: Plan, fault: str, *, seed: int) -> None:
        self.client = client
        doc = _answer(client.post("/v1/drills", json={
            "endpoint": plan.endpoint, "plan": plan.hash, "fault": fault, "seed": seed}),
            f"starting a {fault} drill")
        self.name: str = doc["rollout"]
        self._offset = 0.0  # the caller's clock minus the server's

    def predict(self, row: dict[str, Any], unit: str, context: dict[str, str]) -> Answer:
        r = self.client.post(f"/v1/drills/{self.name}/predict",
                             json={"unit": unit, "inputs": row, "context": context})
        if r.status_code != 200:
            raise DrillServerError(f"HTTP {r.status_code}")  # a user would see it
        doc = r.json()
        return Answer(doc["arm"], doc["id"], bool(doc["fallback"]))

    def feedback(self, items: list[dict[str, Any]]) -> None:
        for k in range(0, len(items), 1000):
            _answer(self.client.post(f"/v1/drills/{self.name}/feedback",
                                     json=items[k:k + 1000]), "sending the drill's labels")

    def inject(self) -> float:
        doc = _answer(self.client.post(f"/v1/drills/{self.name}/fault"), "injecting the fault")
        now = time.time()
        self._offset = now - float(doc["injected_at"])
        return now

    def step(self) -> bool:
        doc = _answer(self.client.get(f"/v1/rollouts/{self.name}"), "reading the drill's status")
        return bool(doc.get("phase") == "rolled_back")

    def finish(self) -> Finished:
        ended = _answer(self.client.delete(f"/v1/drills/{self.name}"), "ending the drill")
        history = _answer(self.client.get(f"/v1/rollouts/{self.name}/history"),
                          "reading the drill's decisions")
        audit = _answer(self.client.get(f"/v1/rollouts/{self.name}/audit"),
                        "reading the drill's audit log")
        events = audit.get("events") or []
        marked_ok = bool(events) and all((e.get("detail") or {}).get("drill") is True
                                         for e in events)
        out = Finished(breaker_opened=bool(ended.get("breaker_opened")),
                       audit_ok=bool(audit.get("verified")) and marked_ok,
                       audit=str(audit.get("message")) if marked_ok
                       else "audit events are not marked as a drill")
        back = [d for d in history if d["action"] == "rollback" and d["actor"] == "controller"]
        if back:
            out.rolled_back_at = float(back[0]["at"]) + self._offset
            out.reason, out.evidence = back[0]["reason"], back[0].get("evidence") or {}
        return out


class _Driver:
    """Traffic from ``workers`` threads through the target, labels sent as feedback."""

    def __init__(self, target: Target, plan: Plan, rows: Sequence[dict[str, float]],
                 truths: Sequence[Any], rng: np.random.Generator, labels: bool) -> None:
        self.target = target
        self.plan = plan
        self.rows = rows
        self.truths = truths
        self.labels = labels
        self.seeds = rng.integers(0, 2**31, size=64).tolist()
        self.lock = threading.Lock()
        self.pending: list[dict[str, Any]] = []
        self.requests = self.candidate = self.fallbacks = self.errors = 0
        self.last_candidate = 0.0
        self.stop = threading.Event()

    def work(self, worker: int) -> None:
        rng = np.random.default_rng(self.seeds[worker % len(self.seeds)])
        while not self.stop.is_set():
            user = int(rng.integers(0, 5000))
            i = int(rng.integers(0, len(self.rows)))
            try:
                p = self.target.predict(dict(self.rows[i]), f"drill-user-{user}",
                                        drill_context(self.plan, user))
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
            self.target.feedback(due)


def drive(target: Target, copy: Plan, fault: str, *, rows: Sequence[dict[str, float]],
          truths: Sequence[Any], seed: int, warmup: float, bound: float,
          tick_every: float = 0.25, workers: int = 4) -> FaultReport:
    """Drill one fault on ``target``: healthy traffic for ``warmup`` seconds, the fault, then
    traffic until the copy is rolled back (or ``bound`` seconds pass)."""
    report = FaultReport(fault, rollout=target.name)
    driver = _Driver(target, copy, rows, truths, np.random.default_rng(seed),
                     labels=_label_guardrail(copy))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="safeshift-drill")
    futures = [pool.submit(driver.work, w) for w in range(workers)]
    injected: float | None = None
    outcome = Finished()
    try:
        start = time.time()
        while True:
            time.sleep(tick_every)
            if injected is None and time.time() - start >= warmup:
                injected = target.inject()
                with driver.lock:
                    driver.last_candidate = 0.0
            driver.feedback()
            if target.step() or (injected is not None and time.time() - injected >= bound):
                break
        # keep driving a moment: the last candidate answer is measured after the decision too
        time.sleep(max(0.5, 2 * tick_every))
    finally:
        driver.stop.set()
        for f in futures:
            f.result()
        pool.shutdown()
        driver.feedback()
        outcome = target.finish()
    report.breaker_opened = outcome.breaker_opened
    report.requests = driver.requests
    report.candidate_answers = driver.candidate
    report.fallbacks = driver.fallbacks
    report.user_errors = driver.errors
    report.audit_ok, report.audit = outcome.audit_ok, outcome.audit
    back = outcome.rolled_back_at
    if back is not None and (injected is None or back < injected):
        report.early = outcome.reason
    elif back is not None and injected is not None:
        report.rolled_back = True
        report.decision_s = back - injected
        report.reason = outcome.reason
        report.caught_by = _caught_by(outcome.evidence, report.breaker_opened)
    if injected is not None:
        last = driver.last_candidate
        report.last_candidate_s = (last - injected) if last else 0.0
    return report


def drill_fault(plan: Plan, fault: str, store: Store, *, rows: Sequence[dict[str, float]],
                truths: Sequence[Any], seed: int, warmup: float, bound: float,
                tick_every: float = 0.25, workers: int = 4) -> FaultReport:
    """Drill one fault on a fresh copy of ``plan`` in ``store``, in this process."""
    name = drill_name(plan.rollout, fault, time.time())
    copy, _ = drill_plan(plan, name)
    _, _, skipped = fault_setup(copy, fault)
    if skipped is not None:
        return FaultReport(fault, rollout=name, skipped=skipped)
    return drive(LocalTarget(copy, fault, store, seed=seed), copy, fault, rows=rows,
                 truths=truths, seed=seed, warmup=warmup, bound=bound, tick_every=tick_every,
                 workers=workers)


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
              on_fault: Callable[[FaultReport], None] | None = None,
              against: str | None = None, token: str | None = None) -> DrillReport:
    """Drill each of ``faults`` on its own copy of ``plan`` (see the module's docstring): in
    this process, or with ``against`` on the gateway at that URL (``token``: an admin's)."""
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
    if against is not None:
        return _run_remote(plan, faults, against, token, stage=stage, rows=rows, truths=truths,
                           seed=seed, warmup=warmup, bound=bound, on_fault=on_fault)
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


def _run_remote(plan: Plan, faults: Sequence[str], url: str, token: str | None, *, stage: str,
                rows: Sequence[dict[str, float]], truths: Sequence[Any], seed: int,
                warmup: float, bound: float,
                on_fault: Callable[[FaultReport], None] | None) -> DrillReport:
    traffic = next(s.traffic for s in plan.stages if s.name == stage) / BASIS_POINTS
    report = DrillReport(plan.rollout, f"{url} (the gateway's store)", stage, traffic)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0) as client:
        for k, fault in enumerate(faults):
            copy, _ = drill_plan(plan, drill_name(plan.rollout, fault, time.time()))
            _, _, skipped = fault_setup(copy, fault)
            if skipped is not None:
                r = FaultReport(fault, skipped=skipped)
            else:
                target = RemoteTarget(client, plan, fault, seed=seed + k)
                r = drive(target, copy, fault, rows=rows, truths=truths, seed=seed + k,
                          warmup=warmup, bound=bound)
            report.faults.append(r)
            if on_fault is not None:
                on_fault(r)
    return report
