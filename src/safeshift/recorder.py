"""What a served request leaves behind: telemetry counts and the record late feedback joins to.

One :class:`Recorder` per rollout and process. The serving steps (:mod:`safeshift.serving`) call
it for every model call, whichever front end carries the request — library mode, the gateway or
the simulator — so the counts cannot differ between them. Telemetry is summed in memory cells
(:class:`~safeshift.telemetry.Aggregator`); request records wait in a bounded
:class:`RecordBuffer`; :meth:`Recorder.flush` writes both to the store, and keeps what the
store refused for the next flush.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from safeshift.assign import BASELINE, Assignment, Reason
from safeshift.clock import Clock
from safeshift.feedback import same_answer
from safeshift.models import ModelResult
from safeshift.plan import Plan
from safeshift.state import RequestRecord
from safeshift.store import Store
from safeshift.telemetry import Aggregator, CellKey, UnitCounter, prediction_signals, unit_cluster

MAX_BUFFERED_RECORDS = 200_000
"""Request records kept in memory while the store cannot take them (about 100 MB); beyond it
the oldest are dropped, counted in :attr:`RecordBuffer.dropped`: serving never stops."""

REQUEST_FAULT = "request_fault"
"""The telemetry signal of requests that failed through their own fault (one per request)."""


class RecordBuffer:
    """Request records not yet in the store, oldest first. Thread-safe."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.dropped = 0  # records lost to a long store outage
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def take(self) -> list[RequestRecord]:
        """Every buffered record; the buffer is empty after."""
        with self._lock:
            records, self._records = self._records, []
        return records

    def restore(self, records: list[RequestRecord]) -> None:
        """Put back records the store did not take, ahead of newer ones; beyond the limit the
        oldest go first (their label window closes first)."""
        limit = MAX_BUFFERED_RECORDS if self.limit is None else self.limit
        with self._lock:
            self._records[:0] = records
            excess = len(self._records) - limit
            if excess > 0:
                del self._records[:excess]
                self.dropped += excess

    def __len__(self) -> int:
        return len(self._records)


class Recorder:
    """Counts model calls into telemetry cells and keeps their request records."""

    def __init__(self, plan: Plan, clock: Clock) -> None:
        self.plan = plan
        self.clock = clock
        self.aggregator = Aggregator(plan)
        self.buffer = RecordBuffer()
        self._units = UnitCounter()
        self._report_signal = any(g.metric == "report_rate" for g in plan.guardrails)
        self._buckets = plan.analysis.unit_buckets
        self._label_window = plan.serving.label_window
        self._flushing = threading.Lock()

    def cell(self, a: Assignment, arm: str, context: Mapping[str, Any] | None) -> CellKey:
        """The telemetry cell a call of ``arm`` for assignment ``a`` counts in, now."""
        segment = self.aggregator.keyer.key(context)
        cluster = unit_cluster(a.unit_hash, self._buckets)
        return self.aggregator.key(a.stage_index, arm, str(a.reason), segment, self.clock.now(),
                                   cluster)

    def record(self, a: Assignment, result: ModelResult, *, context: Mapping[str, Any] | None = None,
               request_id: str | None = None, arm: str | None = None, keep: bool = True) -> None:
        """Count one model call on ``arm`` (default: the assigned arm, or the candidate variant
        that served) and keep the compact request record that late feedback joins to."""
        arm = arm or a.telemetry_arm
        key = self.cell(a, arm, context)
        values = {"requests": 1.0, "error_rate": 0.0 if result.ok else 1.0}
        if not result.not_called:  # a refused call has no latency to count
            values["latency_ms"] = result.latency_ms
        if self._units.first(a.stage_index, a.unit_hash):
            values["units"] = 1.0
        if self._report_signal:
            values["report_rate"] = 0.0
        self.aggregator.observe(key, values, hist=True)
        if result.ok:
            self._observe_predictions(key, result)
        if keep and request_id is not None and a.reason is not Reason.NO_CONSENT:
            # without consent, nothing is kept that labels or reports could join to
            self._keep(request_id, a, key, {arm: result.outputs} if result.ok else {})

    def record_request_fault(self, a: Assignment, *,
                             context: Mapping[str, Any] | None = None) -> None:
        """Count a request that failed through its own fault — inputs the baseline rejects, or
        rejected before any model ran — on its arm as ``request_fault``: not a request of the
        comparison, never an ``error_rate`` failure of either model (docs/decisions.md)."""
        values = {REQUEST_FAULT: 1.0}
        if self._units.first(a.stage_index, a.unit_hash):  # units follow assignment, so that
            values["units"] = 1.0  # the sample-ratio check sees every unit the split sent
        self.aggregator.observe(self.cell(a, a.telemetry_arm, context), values)

    def record_shadow(self, a: Assignment, variant: str, baseline: ModelResult,
                      candidate: ModelResult, *, context: Mapping[str, Any] | None,
                      request_id: str | None) -> None:
        """Count a mirrored call of candidate ``variant`` and compare it pairwise with the
        baseline's answer to the same inputs."""
        key = self.cell(a, variant, context)
        values: dict[str, float] = {"requests": 1.0, "error_rate": 0.0 if candidate.ok else 1.0}
        if not candidate.not_called:
            values["latency_ms"] = candidate.latency_ms
        self.aggregator.observe(key, values, hist=True)
        if candidate.ok:
            self._observe_predictions(key, candidate)
        if candidate.ok and baseline.ok and candidate.outputs and baseline.outputs:
            for i, (c, b) in enumerate(zip(candidate.outputs, baseline.outputs, strict=False)):
                pair: dict[str, float] = {"disagreement": 0.0 if same_answer(c, b) else 1.0}
                if candidate.scores and baseline.scores:
                    pair["score_diff"] = abs(candidate.scores[i] - baseline.scores[i])
                self.aggregator.observe(key, pair)
        if request_id is not None:
            outputs: dict[str, Any] = {}
            if baseline.ok:
                outputs[BASELINE] = baseline.outputs
            if candidate.ok:
                outputs[variant] = candidate.outputs
            self._keep(request_id, a, key, outputs)

    def record_shadow_dropped(self, a: Assignment, baseline: ModelResult, *,
                              context: Mapping[str, Any] | None, request_id: str | None) -> None:
        """Count a mirror copy that was dropped because the shadow queue was full."""
        key = self.cell(a, BASELINE, context)
        self.aggregator.observe(key, {"shadow_dropped": 1.0})
        if request_id is not None:
            self._keep(request_id, a, key, {BASELINE: baseline.outputs} if baseline.ok else {})

    def _observe_predictions(self, key: CellKey, result: ModelResult) -> None:
        counts = prediction_signals(result.outputs, result.scores)
        if counts:
            self.aggregator.add_counts(key, counts)

    def _keep(self, request_id: str, a: Assignment, key: CellKey, outputs: dict[str, Any]) -> None:
        now = self.clock.now()
        self.buffer.add(RequestRecord(request_id, self.plan.rollout, a.stage_index,
                                      a.telemetry_arm, key.cohort, key.segment, now,
                                      now + self._label_window, outputs, key.cluster,
                                      a.unit_hash))

    def flush(self, store: Store) -> int:
        """Write buffered telemetry and request records to ``store``; returns rows written.
        On a store error what was not written is kept for the next flush (telemetry is bounded
        by its cells, request records by :data:`MAX_BUFFERED_RECORDS`) and the error raised.
        Flushes run one at a time: a flush that returns has seen everything buffered before it
        written, also what a concurrent flush (the background task) had taken."""
        with self._flushing:
            return self._flush(store)

    def _flush(self, store: Store) -> int:
        rows = self.aggregator.drain()
        records = self.buffer.take()
        written = 0
        try:
            if rows:
                store.add_telemetry(rows)
                written, rows = written + len(rows), []
            if records:
                store.put_requests(records)
                written, records = written + len(records), []
        except Exception:
            self.aggregator.restore(rows)
            self.buffer.restore(records)
            raise
        return written
