"""The asynchronous prediction path of one endpoint, on top of :class:`~safeshift.Rollout`.

What a request gets and what is counted is decided by the serving steps shared with library
mode (:class:`safeshift.serving.Serving`: the circuit breaker, the fallback to the baseline,
whose fault a failure is); this module only calls the models, asynchronously. The baseline is
called inline: in-process models are short and CPU-bound, and a thread hop would cost more
than the call. The candidate is protected by a per-call timeout and — for a synchronous model
whose ``apredict`` would run inline — its own small thread pool
(:class:`~safeshift.serving.CandidatePool`), so that a hanging candidate cannot hold the event
loop past a few milliseconds (see :meth:`Endpoint._in_thread`), let alone its timeout, nor
starve the candidate's other calls. In shadow stages the baseline answers and a copy goes to
the :class:`~safeshift.gateway.shadow.ShadowQueue`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from safeshift.assign import BASELINE, CANDIDATE, Assignment, Reason, Split
from safeshift.breaker import CircuitBreaker
from safeshift.gateway._http import HTTPError
from safeshift.gateway.metrics import EndpointMetrics
from safeshift.gateway.shadow import ShadowItem, ShadowQueue
from safeshift.models import ModelBackend, ModelResult, SyncBackend, call_with_timeout
from safeshift.models.base import validate_result
from safeshift.rollout import Rollout
from safeshift.serving import (
    BREAKER_OPEN,
    INPUTS,
    Guard,
    Serving,
    failed,
    fallback_reason,
    is_input_error,
    run_async,
)

__all__ = ["BREAKER_OPEN", "Candidate", "Endpoint", "Served", "baseline_failure",
           "fallback_reason"]

GRACE_MIN = 0.0005
GRACE_MAX = 0.005
"""Bounds, in seconds, of the loop's blocking wait for a threaded candidate (see
:meth:`Endpoint._in_thread`)."""


@dataclass(slots=True)
class Served:
    """What the user gets."""

    id: str
    outputs: list[Any]
    scores: list[float] | None
    version: str
    arm: str  # the arm whose model answered
    stage: str
    fallback: str | None = None  # why the candidate's answer was replaced, if it was


def cached_split(rollout: Rollout) -> Split:
    """The split the rollout last read, without re-reading the store.

    ``Rollout.split()``/``assign()`` re-read the store inline when the cache is older than
    ``serving.refresh``; on the event loop that is SQL on the request path, and with the store
    down every request would wait for it and fail. The gateway refreshes in a worker thread
    instead (see :mod:`safeshift.gateway.runtime`) and reads the cache here."""
    return rollout.cached_split


def blocks_event_loop(model: ModelBackend) -> bool:
    """True for a synchronous backend whose ``apredict`` just runs ``predict`` inline."""
    return isinstance(model, SyncBackend) and type(model).apredict is SyncBackend.apredict


@dataclass(slots=True)
class Candidate:
    """One candidate model (the candidate, or a challenger in an experiment stage) and its
    protection (breaker, timeout, thread pool: the shared :class:`~safeshift.serving.Guard`)."""

    name: str
    model: ModelBackend
    threaded: bool
    guard: Guard

    @property
    def breaker(self) -> CircuitBreaker:
        return self.guard.breaker

    @property
    def timeout(self) -> float:
        return self.guard.timeout


class Endpoint:
    """One endpoint: its rollout, its models and the candidates' protection."""

    def __init__(self, rollout: Rollout, metrics: EndpointMetrics, *, threads: int,
                 shadow_workers: int) -> None:
        plan = rollout.plan
        self.name = plan.endpoint
        self.rollout = rollout
        self.metrics = metrics
        self.baseline = rollout.model(BASELINE)
        self.baseline_version = plan.baseline.version
        self.baseline_timeout = plan.baseline.timeout
        self.unit_key = plan.unit
        # context attributes targeting rules read: a client asserts them only with the right
        self.targeting_keys = frozenset(
            [*plan.targeting.always_candidate, *plan.targeting.never_candidate]) - {plan.unit}
        # one set of serving steps and protection per rollout, whoever calls it
        rollout.serving.close()
        self.serving = rollout.serving = Serving(rollout, threads=threads)
        self.candidates: dict[str, Candidate] = {}
        for name, guard in self.serving.guards.items():
            model = rollout.model(name)
            guard.breaker.on_change = metrics.breaker_watcher(name)
            metrics.hung(name, guard.pool.hung_calls)
            self.candidates[name] = Candidate(name, model, blocks_event_loop(model), guard)
        self.shadow = ShadowQueue(rollout, self._shadow_copy, maxsize=plan.serving.shadow_queue,
                                  workers=shadow_workers, on_result=self._shadow_outcome)
        metrics.shadow_depth(lambda: float(self.shadow.depth))
        metrics.records(lambda: float(rollout.unflushed_records),
                        lambda: float(rollout.records_dropped))
        self._model_seconds = metrics.model_duration
        # the Open Inference Protocol datatype of the "output" tensor: declared by the
        # baseline's backend where it knows (scikit-learn), else learned from the first answer
        declared = getattr(self.baseline, "output_datatype", None)
        self.output_datatype: str | None = declared if isinstance(declared, str) else None

    @property
    def candidate(self) -> Candidate:
        return self.candidates[CANDIDATE]

    def models(self) -> list[ModelBackend]:
        return [self.baseline, *(c.model for c in self.candidates.values())]

    def close(self) -> None:
        """Stop the candidates' threads (hung calls finish in the background)."""
        self.serving.close()

    def _shadow_outcome(self, outcome: str) -> None:
        self.metrics.shadow[outcome].inc()

    def assign(self, unit: str | None, context: Mapping[str, Any] | None) -> Assignment:
        """``Rollout.assign`` on the cached split, never touching the store: the gateway's
        refresh task keeps the split current, and a slow or unreachable store must not stall
        or fail requests (they keep the last split seen)."""
        return self.rollout.assign(unit, context, refresh=False)

    # -- model calls ---------------------------------------------------------------------

    async def call_baseline(self, rows: list[Any]) -> ModelResult:
        start = time.perf_counter()
        try:
            if self.baseline_timeout is None:
                result = await self.baseline.apredict(rows)
            else:
                result = await call_with_timeout(self.baseline, rows, self.baseline_timeout)
        except Exception as exc:  # a backend that breaks the protocol by raising
            result = failed(exc, start)
        result = validate_result(result, len(rows))
        self._model_seconds[BASELINE].observe(result.latency_ms / 1000.0)
        return result

    async def call_candidate(self, rows: list[Any], variant: str = CANDIDATE) -> ModelResult:
        """One call of a candidate variant under its timeout: its answer, or a failed result;
        never raises, never exceeds the timeout by more than scheduling delay (plus, when its
        threads are all busy, the wait for one). The breaker is the serving steps' business."""
        cand = self.candidates[variant]
        start = time.perf_counter()
        try:
            if cand.threaded:
                result = await self._in_thread(cand, rows)
            else:
                result = await call_with_timeout(cand.model, rows, cand.timeout)
        except Exception as exc:
            result = failed(exc, start)
        result = validate_result(result, len(rows))
        if not result.not_called:
            self._model_seconds[variant].observe(result.latency_ms / 1000.0)
        return result

    async def _call(self, arm: str, rows: list[Any]) -> ModelResult:
        if arm == BASELINE:
            return await self.call_baseline(rows)
        return await self.call_candidate(rows, arm)

    async def _in_thread(self, cand: Candidate, rows: list[Any]) -> ModelResult:
        """A synchronous candidate in its pool's worker thread, awaited for at most its timeout.

        The loop first *waits* for the thread for a short grace (a few times the candidate's
        usual latency, at most ``GRACE_MAX``): a healthy call ends within it, runs without
        competing with the loop for the GIL (so its measured latency is as fair as the inline
        baseline's) and costs no extra loop iteration. A slow or hung call blocks the loop
        for the grace only, then is awaited asynchronously until the timeout."""
        guard = cand.guard
        call = guard.pool.submit(cand.model.predict, rows)
        if call is None:
            return guard.pool.refusal()
        grace = min(guard.timeout, max(GRACE_MIN, min(GRACE_MAX, 4.0 * guard.typical)))
        try:
            result = call.future.result(timeout=grace)
        except FutureTimeout:
            result = await guard.pool.run_async(call, guard.timeout)
        if result.ok:
            guard.typical = 0.8 * guard.typical + 0.2 * result.latency_ms / 1000.0
        return result

    async def _shadow_copy(self, item: ShadowItem) -> ModelResult:
        """A shadow copy through the shared serving steps (protected, then counted)."""
        return await run_async(
            self.serving.shadow(item.assignment, item.rows, item.baseline, context=item.context,
                                request_id=item.request_id),
            lambda arm: self._call(arm, item.rows))

    # -- the request path ----------------------------------------------------------------

    async def predict(self, rows: list[Any], *, unit: str | None,
                      context: Mapping[str, Any] | None, request_id: str,
                      protocol: str, pin_baseline: bool = False,
                      asserts: frozenset[str] | None = None) -> Served:
        """Serve one request; raises :class:`HTTPError` only when the baseline cannot answer:
        422 for inputs it rejects (a request fault), 502 for any other failure.
        ``pin_baseline``: the client asked for the baseline's version (the Open Inference
        Protocol's versioned route), so the baseline answers and the request is counted
        outside the comparison (the ``excluded`` cohort, no unit hash).
        ``asserts``: the targeting attributes the client may assert (None: all); the others
        still name segments, but targeting rules do not see them, so nobody opts in (or out)
        by sending ``{"plan": "internal"}``."""
        start = time.perf_counter()
        if unit is None and context:
            raw = context.get(self.unit_key)
            unit = None if raw is None else str(raw)
        targeting = context
        if asserts is not None and context and self.targeting_keys:
            targeting = {k: v for k, v in context.items()
                         if k not in self.targeting_keys or k in asserts}
        a = self.assign(unit, targeting)
        if pin_baseline:
            a = Assignment(BASELINE, self.baseline_version, a.stage, a.stage_index, False,
                           Reason.EXCLUDED)
        answer = await run_async(
            self.serving.serve(a, rows, context=context, request_id=request_id),
            lambda arm: self._call(arm, rows))
        if answer.failure is not None:
            if answer.failure == INPUTS:
                self.metrics.request_fault(a.telemetry_arm)
            raise baseline_failure(answer.result)
        if answer.fallback is not None:
            self.metrics.fallbacks[answer.fallback].inc()
        if answer.shadow:
            self.shadow.submit(ShadowItem(a, rows, answer.result, context, request_id))
        self.metrics.served(a.telemetry_arm, protocol, time.perf_counter() - start)
        return Served(request_id, answer.outputs, answer.result.scores, answer.version,
                      answer.arm, a.stage, answer.fallback)


def baseline_failure(result: ModelResult) -> HTTPError:
    """The baseline could not answer: the inputs' fault (422: the model raised ValueError,
    KeyError, TypeError or IndexError — e.g. a missing feature) or the model's (502)."""
    error = result.error or "no outputs"
    if is_input_error(result):
        return HTTPError(422, f"the model rejected the inputs: {error}", field="inputs")
    return HTTPError(502, f"the model could not answer: {error}")
