"""The in-process face of a rollout: assign, predict, record, feedback, tick, status.

A :class:`Rollout` is what a service embeds (no HTTP hop) and what the gateway and the CLI
build on: a thin facade over the parts it holds — the serving steps and the candidates'
protection (:class:`~safeshift.serving.Serving`), the recorder of telemetry and request records
(:class:`~safeshift.recorder.Recorder`), the feedback joiner
(:class:`~safeshift.feedback.FeedbackJoiner`) and the controller. It keeps the current traffic
split cached, refreshed from the store within ``serving.refresh`` so that a decision taken by
any controller reaches every process quickly.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeshift import ops
from safeshift.analysis import StageAnalysis
from safeshift.assign import BASELINE, Assigner, Assignment, Split
from safeshift.clock import Clock, SystemClock
from safeshift.controller import Controller, split_for
from safeshift.errors import RejectedInputError, RolloutError
from safeshift.experiment import current_variants
from safeshift.feedback import FeedbackJoiner, FeedbackResult, RecentRequestIds
from safeshift.models import ModelBackend, ModelResult, load_model
from safeshift.models.base import validate_result
from safeshift.ops import Status
from safeshift.plan import Plan, Retention
from safeshift.probes import COHORT as PROBE_COHORT
from safeshift.probes import ProbeRunner
from safeshift.promql import PromSampler
from safeshift.recorder import Recorder
from safeshift.serving import INPUTS, Serving, failed, run_sync
from safeshift.state import Action, Decision, Phase, RolloutState
from safeshift.store import Store, open_store

PURGE_EVERY = 300.0
"""Seconds between purges of expired request records (retention of per-request data)."""


@dataclass(slots=True)
class Prediction:
    """The answer to one predict call."""

    id: str
    outputs: list[Any]
    version: str
    arm: str
    stage: str
    fallback: bool = False  # the candidate failed and the baseline answered



class Rollout:
    """One rollout of a plan against a store. Build it with :meth:`from_plan`."""

    def __init__(self, plan: Plan, store: Store, *, clock: Clock | None = None,
                 models: Mapping[str, ModelBackend] | None = None) -> None:
        self.plan = plan
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.controller = Controller(plan, store, self.clock)
        self.recorder = Recorder(plan, self.clock)  # telemetry and request records
        self.joiner = FeedbackJoiner(plan, store, self.clock,
                                     window=self.recorder.aggregator.window, settle=self._settle)
        state = store.get_state(plan.rollout)
        self._assigner = Assigner(plan, seed=state.salt_seed)
        self._models: dict[str, ModelBackend] = dict(models or {})
        self._split_lock = threading.Lock()
        self._split: Split = split_for(plan, state)
        self._split_at = time.monotonic()
        self._refresh = plan.serving.refresh
        self._purged_at = 0.0
        self._shadow: _ShadowWorker | None = None
        self.serving = Serving(self)  # the serving steps and the candidates' protection
        self.probes = ProbeRunner(plan, self._call_candidate, self._observe_probe) \
            if plan.probes else None
        self.promql: PromSampler | None = None  # guardrails measured by Prometheus
        if any(g.prometheus is not None for g in plan.guardrails):
            self.promql = PromSampler(plan, self._observe_value)
            self.controller.blockers.append(self.promql.blocker)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_plan(cls, plan: Plan | str | Path, *, store: Store | str | Path | None = None,
                  clock: Clock | None = None, models: Mapping[str, ModelBackend] | None = None,
                  start: bool = True, salt_seed: str | None = None) -> Rollout:
        """Register the plan in the store (or find it there) and, with ``start``, begin the
        first stage. A rollout name already used by a different, unfinished plan is an error."""
        if not isinstance(plan, Plan):
            plan = Plan.load(plan)
        if store is None or isinstance(store, str | Path):
            store = open_store(store)
        plan = ops.pinned(store, plan)  # a registry alias: the version it pointed at, for good
        clock = clock or SystemClock()
        state = ops.register(store, plan, clock, salt_seed=salt_seed)
        rollout = cls(plan, store, clock=clock, models=models)
        if start and state.phase is Phase.PENDING:
            rollout.tick()
        return rollout

    # -- models -----------------------------------------------------------------------

    def model(self, arm: str) -> ModelBackend:
        """The backend for ``arm``, loaded on first use."""
        m = self._models.get(arm)
        if m is None:
            m = self._models[arm] = load_model(
                self.plan.variant(arm).model, self.plan.base_dir,
                registry_uri=self.plan.registry_uri)
        return m

    def load_models(self) -> None:
        """Load every model now (fail fast at start-up rather than on the first request)."""
        for arm in (BASELINE, *self.plan.variants):
            self.model(arm)

    def timeout(self, variant: str = "candidate") -> float:
        """Per-call timeout of a candidate variant: its own, else ``serving.candidate_timeout``."""
        return self.plan.variant(variant).timeout or self.plan.serving.candidate_timeout

    @property
    def candidate_timeout(self) -> float:
        return self.timeout()

    # -- the split ----------------------------------------------------------------------

    def split(self) -> Split:
        """The current split, re-read from the store at most every ``serving.refresh``."""
        if time.monotonic() - self._split_at > self._refresh:
            self.refresh()
        return self._split

    @property
    def cached_split(self) -> Split:
        """The split last read, without touching the store (for callers that refresh it
        off the request path themselves, like the gateway)."""
        return self._split

    def refresh(self) -> Split:
        state = self.store.get_state(self.plan.rollout)
        with self._split_lock:
            self._split = split_for(self.plan, state)
            self._split_at = time.monotonic()
        return self._split

    @property
    def shadow_variant(self) -> str:
        """The candidate variant that shadow copies go to."""
        return self._split.primary[0]

    def assign(self, unit: str | None, context: Mapping[str, Any] | None = None, *,
               refresh: bool = True) -> Assignment:
        """Which arm serves ``unit`` now. Pure given the split: sticky and monotone.
        ``refresh=False`` never reads the store (the caller keeps the split current)."""
        return self._assigner.assign(unit, context, self.split() if refresh else self._split)

    # -- serving ------------------------------------------------------------------------

    def predict(self, inputs: Any, *, unit: str | None = None,
                context: Mapping[str, Any] | None = None, request_id: str | None = None) -> Prediction:
        """Serve one request in-process: assign, call the arm's model (the baseline answers if
        the candidate fails), mirror to the candidate in shadow stages, record telemetry — the
        steps of :meth:`Serving.serve`, shared with the gateway. Inputs the baseline rejects
        raise :class:`RejectedInputError` (counted as a request fault, not a model error). A
        ``request_id`` an earlier request here (or in the store) has raises
        :class:`RequestIdTakenError`: feedback joins on it."""
        rows = inputs if isinstance(inputs, list) else [inputs]
        if request_id is not None:
            self.check_request_id(request_id)  # a caller's id names one request, or none
        a = self.assign(unit, context)
        rid = request_id or uuid.uuid4().hex
        answer = run_sync(self.serving.serve(a, rows, context=context, request_id=rid),
                          lambda arm: self._call(arm, rows))
        if answer.failure == INPUTS:
            if request_id is not None:
                self.request_ids.release(request_id)  # no record: the id may be used again
            raise RejectedInputError(f"the model rejected the inputs: {answer.result.error}")
        if answer.failure is not None:
            raise RolloutError(f"the baseline model failed: {answer.result.error}")
        if answer.shadow:
            self._shadow_worker().submit(a, rows, answer.result, context, rid)
        return Prediction(rid, answer.outputs, answer.version, answer.arm, a.stage,
                          fallback=answer.fallback is not None)

    def _call(self, arm: str, rows: list[Any]) -> ModelResult:
        """One model call for the serving steps: the baseline inline, a candidate protected."""
        if arm != BASELINE:
            return self._call_candidate(arm, rows)
        start = time.perf_counter()
        try:
            result = self.model(BASELINE).predict(rows)
        except Exception as exc:  # a backend that breaks the protocol by raising
            result = failed(exc, start)
        return validate_result(result, len(rows))

    def _call_candidate(self, variant: str, rows: list[Any]) -> ModelResult:
        """The candidate's answer within its timeout, from its own thread pool, where a hung
        call cannot make the calls behind it time out (:class:`~safeshift.serving.CandidatePool`);
        a late answer is a timeout result (the call finishes in the background, discarded)."""
        guard = self.serving.guards[variant]
        result = guard.pool.run(self.model(variant).predict, rows, guard.timeout)
        return validate_result(result, len(rows))

    def _scheduled(self) -> None:
        """What the process that decides (the lease holder) runs on a schedule after its tick
        while the guardrails run: the plan's probes that are due, sent to the running stage's
        candidates, and the Prometheus guardrails' reads (in the background); what they
        recorded is written at once."""
        state = self.state()
        if state.phase not in (Phase.RUNNING, Phase.AWAITING_APPROVAL, Phase.WATCHING) \
                or state.stage_index < 0:
            return
        variants, now = current_variants(self.plan, state), self.clock.now()
        recorded = 0
        if self.probes is not None:
            recorded += self.probes.run_due(state.stage_index, variants, now)
        if self.promql is not None:
            recorded += self.promql.run_due(state.stage_index, variants, now)
        if recorded:
            self.flush()

    def _observe_value(self, stage: int, arm: str, signal: str, value: float) -> None:
        agg = self.recorder.aggregator
        agg.observe(agg.key(stage, arm, "hash", "", self.clock.now()), {signal: value})

    def _observe_probe(self, stage: int, variant: str, signal: str, failed: float) -> None:
        agg = self.recorder.aggregator
        agg.observe(agg.key(stage, variant, PROBE_COHORT, "", self.clock.now()), {signal: failed})

    def _shadow_worker(self) -> _ShadowWorker:
        if self._shadow is None:
            self._shadow = _ShadowWorker(self)
        return self._shadow

    def _settle(self) -> None:
        """Write what this process still buffers, pending shadow copies included."""
        if self._shadow is not None:
            self._shadow.drain()
        self.flush()

    # -- feedback (the joiner's) ------------------------------------------------------------

    def check_request_id(self, request_id: str) -> None:
        """Claim a caller's id for a new request (:meth:`FeedbackJoiner.check_request_id`)."""
        self.joiner.check_request_id(request_id)

    @property
    def request_ids(self) -> RecentRequestIds:
        return self.joiner.request_ids

    def feedback(self, request_id: str, *, label: Any = None,
                 outcome: Mapping[str, float] | None = None) -> FeedbackResult:
        """Join a label (scored against each arm's stored answer) or outcome metrics to the
        request that ``request_id`` names. Repeats are ignored per (request, metric)."""
        return self.joiner.feedback_many([{"id": request_id, "label": label,
                                           "outcome": outcome}])[0]

    def feedback_many(self, items: Sequence[Mapping[str, Any]], *,
                      source: str = "") -> list[FeedbackResult]:
        """Several feedbacks in one transaction (:meth:`FeedbackJoiner.feedback_many`)."""
        return self.joiner.feedback_many(items, source=source)

    def report(self, request_id: str, kind: str, text: str = "") -> bool:
        """Count a user's issue report (:meth:`FeedbackJoiner.report`); False for a repeat."""
        return self.joiner.report(request_id, kind, text)

    # -- persistence and control ----------------------------------------------------------

    @property
    def unflushed_records(self) -> int:
        """Request records kept in memory, not yet in the store."""
        return len(self.recorder.buffer)

    @property
    def records_dropped(self) -> int:
        """Request records lost to a long store outage."""
        return self.recorder.buffer.dropped

    def flush(self) -> int:
        """Write buffered telemetry and request records to the store; returns rows written."""
        return self.recorder.flush(self.store)

    def tick(self) -> Decision | None:
        """Flush, then let the controller evaluate and commit at most one decision."""
        if self._shadow is not None:
            self._shadow.drain()
        self.flush()
        decision = self.controller.tick()
        if (self.probes is not None or self.promql is not None) and self.controller.held:
            self._scheduled()
        self.refresh()  # also after quiet updates such as a bandit re-allocation
        now = self.clock.now()
        if now - self._purged_at >= PURGE_EVERY:
            self.store.purge_expired(now)  # request records past their label window
            if self.plan.retention != Retention():
                from safeshift.ops import purge

                purge(self.store, self.clock, rollout=self.plan.rollout)  # the plan's retention
            self._purged_at = now
        return decision

    def act(self, action: Action, *, actor: str, reason: str = "") -> Decision:
        decision = self.controller.act(action, actor=actor, reason=reason)
        self.refresh()
        return decision

    def approve(self, *, actor: str, reason: str = "") -> Decision:
        return self.act(Action.APPROVE, actor=actor, reason=reason)

    def pause(self, *, actor: str, reason: str = "") -> Decision:
        return self.act(Action.PAUSE, actor=actor, reason=reason)

    def resume(self, *, actor: str, reason: str = "") -> Decision:
        return self.act(Action.RESUME, actor=actor, reason=reason)

    def rollback(self, *, actor: str, reason: str = "") -> Decision:
        return self.act(Action.ROLLBACK, actor=actor, reason=reason)

    def promote(self, *, actor: str, reason: str = "") -> Decision:
        return self.act(Action.PROMOTE, actor=actor, reason=reason)

    def state(self) -> RolloutState:
        return self.store.get_state(self.plan.rollout)

    def decisions(self) -> list[Decision]:
        return self.store.decisions(self.plan.rollout)

    def analysis(self) -> StageAnalysis | None:
        """The current stage's analysis, as the controller's next tick would see it."""
        return ops.stage_analysis(self.plan, self.store, self.state())

    def status(self) -> Status:
        """The rollout at a glance (:func:`safeshift.ops.status`)."""
        return ops.status(self.store, self.plan, self.clock)

    def close(self) -> None:
        if self._shadow is not None:
            self._shadow.stop()
        if self.promql is not None:
            self.promql.close()
        self.serving.close()
        self.flush()
        for m in self._models.values():
            m.close()


class _ShadowWorker:
    """Library-mode shadow calls on one background thread with a bounded queue; when full,
    copies are dropped and counted (``shadow_dropped``), never blocking the caller."""

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout
        self.queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(rollout.plan.serving.shadow_queue)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="safeshift-shadow", daemon=True)
        self._thread.start()

    def submit(self, a: Assignment, rows: list[Any], base: ModelResult,
               context: Mapping[str, Any] | None, rid: str) -> None:
        try:
            self.queue.put_nowait((a, rows, base, context, rid))
        except queue.Full:
            self.dropped += 1
            self.rollout.recorder.record_shadow_dropped(a, base, context=context, request_id=rid)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._copy(*item)
            finally:
                self.queue.task_done()

    def _copy(self, a: Assignment, rows: list[Any], base: ModelResult,
              context: Mapping[str, Any] | None, rid: str) -> None:
        """The candidate's answer to one copy, under the same protection as a live call."""
        rollout = self.rollout
        run_sync(rollout.serving.shadow(a, rows, base, context=context, request_id=rid),
                 lambda arm: rollout._call(arm, rows))

    def drain(self) -> None:
        self.queue.join()

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=5)

