"""The in-process face of a rollout: assign, predict, record, feedback, tick, status.

A :class:`Rollout` is what a service embeds (no HTTP hop) and what the gateway and the CLI
build on. It keeps the current traffic split cached, refreshed from the store within
``serving.refresh`` so that a decision taken by any controller reaches every process quickly.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshift import ops
from safeshift._units import format_duration
from safeshift.analysis import StageAnalysis
from safeshift.assign import BASELINE, Assigner, Assignment, Split
from safeshift.clock import Clock, SystemClock
from safeshift.controller import Controller, split_for
from safeshift.errors import RejectedInputError, RolloutError, UnknownRequestError
from safeshift.models import ModelBackend, ModelResult, load_model
from safeshift.models.base import validate_result
from safeshift.ops import Status
from safeshift.plan import BUILTIN_METRICS, OUTCOME_LIMIT, Plan
from safeshift.serving import INPUTS, REQUEST_FAULT, Serving, failed, run_sync
from safeshift.state import Action, Decision, FeedbackItem, Phase, RequestRecord, RolloutState
from safeshift.store import Store, open_store
from safeshift.telemetry import (
    Aggregator,
    Cell,
    CellKey,
    Moments,
    UnitCounter,
    prediction_signals,
    rows_from_cells,
    unit_cluster,
)

MAX_BUFFERED_RECORDS = 200_000
"""Request records kept in memory while the store cannot take them (about 100 MB); beyond it
the oldest are dropped, counted in ``Rollout.records_dropped``: serving never stops."""

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


REPORT_UNIT_PREFIX = "unit:"
"""Feedback keys of the form ``unit:<hash>`` record that a unit reported in a stage."""


@dataclass(slots=True)
class FeedbackResult:
    id: str
    accepted: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    # signals another client labelled first with a different value: recorded and counted
    # (``conflicts:<signal>`` in the stage's telemetry), the first label still stands
    conflict: list[str] = field(default_factory=list)


def _fingerprint(value: Any) -> float:
    """A label as one exactly representable float, to tell two labels apart."""
    text = json.dumps(value, sort_keys=True, default=str)
    return float(int(hashlib.sha256(text.encode()).hexdigest()[:13], 16))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def label_mismatch(rec: RequestRecord, label: Any) -> str | None:
    """Why ``label`` cannot be scored row by row against the answers ``rec`` kept, or None.

    A request of several rows needs a list of as many labels; one row takes a value (or a
    one-element list). Unknown row counts (no answer was kept) accept anything."""
    if label is None:
        return None
    rows = {len(outputs) for outputs in rec.outputs.values() if isinstance(outputs, list)}
    if len(rows) != 1:
        return None
    n = rows.pop()
    given = len(label) if isinstance(label, list) else None
    if given is None and n > 1:
        return f"request {rec.id!r} had {n} rows: send a list of {n} labels, one per row"
    if given is not None and given != n:
        return (f"request {rec.id!r} had {n} row{'s' if n != 1 else ''} but {given} labels came; "
                f"send one label per row")
    return None


# -- feedback values -----------------------------------------------------------------------

def outcome_range(metric: str,
                  ranges: Mapping[str, tuple[float, float]] | None = None) -> tuple[float, float]:
    """The values an outcome ``metric`` may take: [0, 1] for a built-in rate (e.g. ``accuracy``
    sent as an outcome), the ``range`` a guardrail declares for it (``ranges``, from
    :meth:`Plan.outcome_ranges`), else ±:data:`OUTCOME_LIMIT`."""
    info = BUILTIN_METRICS.get(metric)
    if info is not None and info.rate:
        return 0.0, 1.0
    if ranges is not None and metric in ranges:
        return ranges[metric]
    return -OUTCOME_LIMIT, OUTCOME_LIMIT


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    if isinstance(value, int):  # a Python int may not even convert to a float
        return abs(value) <= sys.float_info.max
    return math.isfinite(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}…{text[-8:]}"


def _label_values(label: Any) -> Iterator[tuple[str, Any]]:
    """(field, value) for every scalar of a label: ``label``, or ``label[i]`` (nested lists
    too), without recursion."""
    stack: list[tuple[str, Any]] = [("label", label)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, list | tuple):
            stack.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(value)]))
        else:
            yield where, value


def check_feedback_values(label: Any, outcome: Any, *, label_limit: float | None = None,
                          ranges: Mapping[str, tuple[float, float]] | None = None,
                          ) -> tuple[str, str] | None:
    """The first label or outcome value that cannot be counted, as (field, what is wrong and
    what to do), or None. Fields are relative to the item: ``label``, ``label[2]``,
    ``outcome.revenue``. Labels must be finite (within ±``label_limit`` when it is given);
    outcomes finite numbers within :func:`outcome_range` (given the plan's ``ranges``)."""
    if outcome is not None:
        if not isinstance(outcome, Mapping):
            return "outcome", "'outcome' must be an object of metric: number"
        for metric, value in outcome.items():
            where = f"outcome.{metric}"
            if not _real(value):
                return where, f"outcome values must be numbers, not {_shown(value)}"
            low, high = outcome_range(str(metric), ranges)
            if not _finite(value):
                return where, (f"{_shown(value)} is not a finite number: send a number within "
                               f"[{low:g}, {high:g}], the range of {metric!r}")
            if not low <= value <= high:
                if ranges is not None and metric in ranges:
                    why = "the plan's guardrail declares this range"
                elif high == 1.0:
                    why = "a rate is a share between 0 and 1"
                else:
                    why = "larger values would swamp the guardrails' sums; send it in a larger unit"
                return where, (f"{_shown(value)} is outside [{low:g}, {high:g}], the range of "
                               f"{metric!r}: send a number in that range ({why})")
    if label is not None:
        for where, value in _label_values(label):
            if not _real(value):
                continue
            if not _finite(value):
                return where, (f"{_shown(value)} is not a finite label: send the true answer "
                               "(a finite number, a string or a boolean)")
            if label_limit is not None and not abs(value) <= label_limit:
                return where, (f"{_shown(value)} is outside [{-label_limit:g}, {label_limit:g}]: "
                               "numeric labels are scored as abs_error, whose sums a larger "
                               "value would swamp; send it in a larger unit")
    return None


# -- request ids -----------------------------------------------------------------------------


class RequestIdTakenError(RolloutError):
    """A request id that an earlier request already has (feedback joins on it)."""


class RecentRequestIds:
    """Request ids recently given to requests in this process, each held until its record's
    label window ends; at most ``size`` (the oldest forgotten first, when the store has long
    had their records). Thread-safe."""

    def __init__(self, size: int = MAX_BUFFERED_RECORDS) -> None:
        self.size = size
        self._until: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, request_id: str, until: float, now: float) -> bool:
        """Hold ``request_id`` until ``until``; False (and nothing changes) when it is held."""
        with self._lock:
            held = self._until.get(request_id)
            if held is not None and held > now:
                return False
            self._until[request_id] = until
            self._until.move_to_end(request_id)
            if len(self._until) > self.size:
                self._until.popitem(last=False)
            return True

    def hold(self, request_id: str, until: float) -> None:
        """Hold ``request_id`` until ``until`` (e.g. the expiry of a record found in the store)."""
        with self._lock:
            self._until[request_id] = until

    def release(self, request_id: str) -> None:
        """Forget a claim whose request left no record (its inputs were refused)."""
        with self._lock:
            self._until.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._until)


def request_id_taken(request_id: str, source: str | None = None) -> str:
    """The message for a request id that is taken (``source`` says where it came from)."""
    origin = f" ({source})" if source else ""
    return (f"request id {request_id!r}{origin} is already taken by an earlier request; feedback "
            "joins on the id, so each request needs its own: send a fresh id (e.g. a UUID)")


class Rollout:
    """One rollout of a plan against a store. Build it with :meth:`from_plan`."""

    def __init__(self, plan: Plan, store: Store, *, clock: Clock | None = None,
                 models: Mapping[str, ModelBackend] | None = None) -> None:
        self.plan = plan
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.controller = Controller(plan, store, self.clock)
        self.aggregator = Aggregator(plan)
        state = store.get_state(plan.rollout)
        self._assigner = Assigner(plan, seed=str(state.extra.get("salt_seed", "")))
        self._models: dict[str, ModelBackend] = dict(models or {})
        self._records: list[RequestRecord] = []
        self.records_dropped = 0  # request records lost to a long store outage
        self._records_lock = threading.Lock()
        self._split_lock = threading.Lock()
        self._split: Split = split_for(plan, state)
        self._split_at = time.monotonic()
        self._refresh = plan.serving.refresh
        self._purged_at = 0.0
        self._units = UnitCounter()
        self._report_signal = any(g.metric == "report_rate" for g in plan.guardrails)
        self._abs_error = any(g.metric == "abs_error" for g in plan.guardrails)
        self._outcome_ranges = plan.outcome_ranges()
        self._shadow: _ShadowWorker | None = None
        self.serving = Serving(self)  # the serving steps and the candidates' protection
        self.request_ids = RecentRequestIds()  # the ids check_request_id claimed

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
            m = self._models[arm] = load_model(self.plan.variant(arm).model, self.plan.base_dir)
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

    def _cell(self, a: Assignment, arm: str, context: Mapping[str, Any] | None) -> CellKey:
        segment = self.aggregator.keyer.key(context)
        cluster = unit_cluster(a.unit_hash, self.plan.analysis.unit_buckets)
        return self.aggregator.key(a.stage_index, arm, str(a.reason), segment, self.clock.now(),
                                   cluster)

    def record(self, a: Assignment, result: ModelResult, *, context: Mapping[str, Any] | None = None,
               request_id: str | None = None, arm: str | None = None, keep: bool = True) -> None:
        """Count one model call on ``arm`` (default: the assigned arm, or the candidate variant
        that served) and keep the compact request record that late feedback joins to."""
        arm = arm or a.telemetry_arm
        key = self._cell(a, arm, context)
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
        if keep and request_id is not None:
            outputs = {arm: result.outputs} if result.ok else {}
            self._keep(request_id, a, key, outputs)

    def record_request_fault(self, a: Assignment, *, context: Mapping[str, Any] | None = None) -> None:
        """Count a request that failed through its own fault — inputs the baseline rejects, or
        rejected before any model ran — on its arm as ``request_fault``: not a request of the
        comparison, never an ``error_rate`` failure of either model (docs/decisions.md)."""
        self.aggregator.observe(self._cell(a, a.telemetry_arm, context), {REQUEST_FAULT: 1.0})

    def record_shadow(self, a: Assignment, baseline: ModelResult, candidate: ModelResult, *,
                      context: Mapping[str, Any] | None, request_id: str | None) -> None:
        """Count a mirrored candidate call and compare it pairwise with the baseline's answer."""
        key = self._cell(a, self.shadow_variant, context)
        values: dict[str, float] = {"requests": 1.0, "error_rate": 0.0 if candidate.ok else 1.0}
        if not candidate.not_called:
            values["latency_ms"] = candidate.latency_ms
        self.aggregator.observe(key, values, hist=True)
        if candidate.ok:
            self._observe_predictions(key, candidate)
        if candidate.ok and baseline.ok and candidate.outputs and baseline.outputs:
            for i, (c, b) in enumerate(zip(candidate.outputs, baseline.outputs, strict=False)):
                pair: dict[str, float] = {"disagreement": 0.0 if _same(c, b) else 1.0}
                if candidate.scores and baseline.scores:
                    pair["score_diff"] = abs(candidate.scores[i] - baseline.scores[i])
                self.aggregator.observe(key, pair)
        if request_id is not None:
            outputs: dict[str, Any] = {}
            if baseline.ok:
                outputs[BASELINE] = baseline.outputs
            if candidate.ok:
                outputs[self.shadow_variant] = candidate.outputs
            self._keep(request_id, a, key, outputs)

    def _observe_predictions(self, key: CellKey, result: ModelResult) -> None:
        counts = prediction_signals(result.outputs, result.scores)
        if counts:
            self.aggregator.add_counts(key, counts)

    def record_shadow_dropped(self, a: Assignment, baseline: ModelResult, *,
                              context: Mapping[str, Any] | None, request_id: str | None) -> None:
        """Count a mirror copy that was dropped because the shadow queue was full."""
        key = self._cell(a, BASELINE, context)
        self.aggregator.observe(key, {"shadow_dropped": 1.0})
        if request_id is not None:
            self._keep(request_id, a, key, {BASELINE: baseline.outputs} if baseline.ok else {})

    def _keep(self, request_id: str, a: Assignment, key: CellKey, outputs: dict[str, Any]) -> None:
        now = self.clock.now()
        rec = RequestRecord(request_id, self.plan.rollout, a.stage_index, a.telemetry_arm, key.cohort,
                            key.segment, now, now + self.plan.serving.label_window, outputs,
                            key.cluster, a.unit_hash)
        with self._records_lock:
            self._records.append(rec)

    def _shadow_worker(self) -> _ShadowWorker:
        if self._shadow is None:
            self._shadow = _ShadowWorker(self)
        return self._shadow

    # -- request ids ----------------------------------------------------------------------

    def check_request_id(self, request_id: str) -> None:
        """Claim a caller's id for a new request: :class:`RequestIdTakenError` when a request
        here already had it (within its label window) or the store holds a record with it.
        Call it before serving; :meth:`RecentRequestIds.release` it when nothing was recorded."""
        now = self.clock.now()
        if not self.request_ids.claim(request_id, now + self.plan.serving.label_window, now):
            raise RequestIdTakenError(request_id_taken(request_id))
        rec = self.store.get_request(request_id)
        if rec is not None:
            self.request_ids.hold(request_id, rec.expires_at)
            raise RequestIdTakenError(request_id_taken(request_id))

    # -- feedback -------------------------------------------------------------------------

    def feedback_problem(self, label: Any, outcome: Any) -> tuple[str, str] | None:
        """:func:`check_feedback_values` as this rollout counts feedback: numeric labels are
        bounded too when a guardrail scores them as ``abs_error``."""
        return check_feedback_values(label, outcome,
                                     label_limit=OUTCOME_LIMIT if self._abs_error else None,
                                     ranges=self._outcome_ranges)

    def _find(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        """The live request records for ``request_ids``; :class:`UnknownRequestError` names
        the first id that has none (never served here, or past its label window)."""
        found = self.store.get_requests(request_ids)
        if len(found) < len(set(request_ids)):
            if self._shadow is not None:
                self._shadow.drain()
            self.flush()
            found = self.store.get_requests(request_ids)
        now = self.clock.now()
        for rid in request_ids:
            rec = found.get(rid)
            if rec is None or rec.rollout != self.plan.rollout:
                raise UnknownRequestError(
                    f"no request {rid!r} in rollout {self.plan.rollout!r}: it was never served, "
                    "or its label window has passed; send the id that predict returned")
            if rec.expires_at <= now:
                raise UnknownRequestError(
                    f"request {rid!r} is past its label window "
                    f"({format_duration(self.plan.serving.label_window)}); feedback is no longer "
                    "joined")
        return found

    def _feedback_items(self, rec: RequestRecord, label: Any,
                        outcome: Mapping[str, float] | None) -> list[FeedbackItem]:
        now = self.clock.now()
        window = int(rec.created_at // self.aggregator.window * self.aggregator.window)
        signals: dict[str, dict[str, list[float]]] = {}
        if label is not None:
            labels = label if isinstance(label, list) else [label]
            for arm, outputs in rec.outputs.items():
                for out, lab in zip(outputs or [], labels, strict=False):
                    signals.setdefault("accuracy", {}).setdefault(arm, []).append(
                        1.0 if _same(out, lab) else 0.0)
                    if self._abs_error and _number(out) and _number(lab):
                        signals.setdefault("abs_error", {}).setdefault(arm, []).append(
                            abs(float(out) - float(lab)))
        sent: dict[str, float] = {}  # what the client said, per signal (conflicts compare it)
        if label is not None:
            sent["accuracy"] = sent["abs_error"] = _fingerprint(label)
        for metric, value in (outcome or {}).items():
            signals.setdefault(metric, {}).setdefault(rec.arm, []).append(float(value))
            sent[metric] = float(value)
        items = []
        for signal, per_arm in signals.items():
            cells: dict[CellKey, Cell] = {}
            for arm, values in per_arm.items():
                cell = cells.setdefault(
                    CellKey(rec.stage, arm, rec.cohort, rec.segment, window, rec.cluster), Cell())
                for v in values:
                    cell.moments(signal).add(v)
            # shadow: both models answered this input, so the label scores a pair (candidate
            # minus baseline), a far more precise comparison than two independent means
            others = [arm for arm in per_arm if arm != BASELINE]
            base = per_arm.get(BASELINE)
            if base is not None and len(others) == 1 and len(per_arm[others[0]]) == len(base):
                key = CellKey(rec.stage, others[0], rec.cohort, rec.segment, window, rec.cluster)
                for c, b in zip(per_arm[others[0]], base, strict=True):
                    cells[key].moments(f"{signal}:paired").add(c - b)
            items.append(FeedbackItem(rec.id, signal, sent[signal], now,
                                      list(rows_from_cells(self.plan.rollout, cells))))
        return items

    def feedback(self, request_id: str, *, label: Any = None,
                 outcome: Mapping[str, float] | None = None) -> FeedbackResult:
        """Join a label (scored against each arm's stored answer) or outcome metrics to the
        request that ``request_id`` names. Repeats are ignored per (request, metric)."""
        return self.feedback_many([{"id": request_id, "label": label, "outcome": outcome}])[0]

    def feedback_many(self, items: Sequence[Mapping[str, Any]], *,
                      source: str = "") -> list[FeedbackResult]:
        """Several feedbacks (``{"id", "label"?, "outcome"?}``) in one transaction. Every item is
        checked first: one unknown id or empty item rejects the whole batch, nothing stored.

        ``source`` names the client that sends them (the gateway passes the token's id). The
        first label of a request counts; a client's repeat is a duplicate; another client's
        later label is recorded too — never dropped as "a duplicate" of someone else's — and,
        when it differs, counted as a conflict (``conflicts:<signal>``, shown by status)."""
        for i, item in enumerate(items):
            if item.get("label") is None and not item.get("outcome"):
                raise ValueError(f"item {i}: give a label or an outcome")
            bad = self.feedback_problem(item.get("label"), item.get("outcome"))
            if bad:
                raise ValueError(f"item {i}: {bad[0]}: {bad[1]}")
        records = self._find([str(item["id"]) for item in items])
        for i, item in enumerate(items):
            problem = label_mismatch(records[str(item["id"])], item.get("label"))
            if problem:
                raise ValueError(f"item {i}: {problem}")
        plan: list[tuple[str, list[FeedbackItem]]] = []
        for item in items:
            rid = str(item["id"])
            plan.append((rid, self._feedback_items(records[rid], item.get("label"),
                                                   item.get("outcome"))))
        flat = [fi for _, fis in plan for fi in fis]
        # the client's own copy (first writer within the client) beside the request's first
        own = [FeedbackItem(fi.request_id, f"{fi.signal}#{source}", fi.value, fi.at, [])
               for fi in flat] if source else []
        written = self.store.add_feedback([*flat, *own])
        first, mine = written[:len(flat)], written[len(flat):] or [True] * len(flat)
        later = [(fi.request_id, fi.signal) for fi, f, m in zip(flat, first, mine, strict=True)
                 if m and not f]
        earlier = self.store.feedback_values(later) if later else {}
        conflicts: dict[CellKey, Cell] = {}
        results = []
        step = iter(zip(first, mine, strict=True))
        for rid, fis in plan:
            result = FeedbackResult(rid)
            for fi in fis:
                is_first, is_mine = next(step)
                if is_first:
                    result.accepted.append(fi.signal)
                elif is_mine and earlier.get((rid, fi.signal), fi.value) != fi.value:
                    result.conflict.append(fi.signal)
                    rec = records[rid]
                    window = int(rec.created_at // self.aggregator.window
                                 * self.aggregator.window)
                    cell = conflicts.setdefault(CellKey(rec.stage, rec.arm, rec.cohort,
                                                        rec.segment, window, rec.cluster), Cell())
                    cell.moments(f"conflicts:{fi.signal}").add(1.0)
                else:
                    result.duplicate.append(fi.signal)
            results.append(result)
        if conflicts:
            self.store.add_telemetry(list(rows_from_cells(self.plan.rollout, conflicts)))
        return results

    def report(self, request_id: str, kind: str, text: str = "") -> bool:
        """Count a user's issue report against the arm that served ``request_id``: once per
        unit and stage (once per request for anonymous requests), so that one user — or one
        client sending reports on its own requests — counts once however often it reports.
        Returns False for a repeat."""
        rec = self._find([request_id])[request_id]
        window = int(rec.created_at // self.aggregator.window * self.aggregator.window)
        cell = Cell()
        cell.metrics["report_rate"] = Moments(0.0, 1.0, 1.0)  # a numerator without a request
        cell.metrics[f"reports:{kind[:32]}"] = Moments(1.0, 1.0, 1.0)
        rows = rows_from_cells(self.plan.rollout,
                               {CellKey(rec.stage, rec.arm, rec.cohort, rec.segment, window,
                                        rec.cluster): cell})
        now = self.clock.now()
        if rec.unit_hash < 0:
            return self.store.add_feedback([FeedbackItem(request_id, "report_rate", 1.0, now,
                                                         list(rows))])[0]
        # the request's own key (its repeat is a duplicate) and the unit's, which counts
        unit_key = FeedbackItem(f"{REPORT_UNIT_PREFIX}{rec.unit_hash}",
                                f"report@{self.plan.rollout}/{rec.stage}", 1.0, now, list(rows))
        own, unit = self.store.add_feedback([
            FeedbackItem(request_id, "report_rate", 1.0, now, []), unit_key])
        return own and unit

    # -- persistence and control ----------------------------------------------------------

    @property
    def unflushed_records(self) -> int:
        """Request records kept in memory, not yet in the store."""
        return len(self._records)

    def flush(self) -> int:
        """Write buffered telemetry and request records to the store; returns rows written."""
        rows = self.aggregator.drain()
        with self._records_lock:
            records, self._records = self._records, []
        written = 0
        try:
            if rows:
                self.store.add_telemetry(rows)
                written, rows = written + len(rows), []
            if records:
                self.store.put_requests(records)
                written, records = written + len(records), []
        except Exception:
            # keep what was not written for the next flush rather than lose it; telemetry is
            # bounded by its cells, request records by MAX_BUFFERED_RECORDS (oldest go first:
            # their label window closes first)
            self.aggregator.restore(rows)
            with self._records_lock:
                self._records[:0] = records
                excess = len(self._records) - MAX_BUFFERED_RECORDS
                if excess > 0:
                    del self._records[:excess]
                    self.records_dropped += excess
            raise
        return written

    def tick(self) -> Decision | None:
        """Flush, then let the controller evaluate and commit at most one decision."""
        if self._shadow is not None:
            self._shadow.drain()
        self.flush()
        decision = self.controller.tick()
        self.refresh()  # also after quiet updates such as a bandit re-allocation
        now = self.clock.now()
        if now - self._purged_at >= PURGE_EVERY:
            self.store.purge_expired(now)  # request records past their label window
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
            self.rollout.record_shadow_dropped(a, base, context=context, request_id=rid)

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

