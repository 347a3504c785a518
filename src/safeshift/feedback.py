"""Late feedback: labels, outcomes and user reports joined to the requests they are about.

A label arrives minutes or days after its request; it is joined, by request id, to the compact
record the request left (:class:`~safeshift.state.RequestRecord`, with each arm's answer), scored
against each arm's answer, and stored as telemetry of the cell the request counted in. One
:class:`FeedbackJoiner` per rollout and process; library mode (``Rollout.feedback``) and the
gateway (``/v1/feedback``) both call it. The values a client sends are checked here first
(:func:`check_feedback_values`), so the two front ends refuse the same things.

Request ids are claimed here too (:class:`RecentRequestIds`): feedback joins on the id, so a
caller's id must name one request.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safeshift._units import format_duration
from safeshift.assign import BASELINE
from safeshift.clock import Clock
from safeshift.errors import RolloutError, UnknownRequestError
from safeshift.plan import BUILTIN_METRICS, OUTCOME_LIMIT, Plan
from safeshift.state import FeedbackItem, ReportText, RequestRecord
from safeshift.store import Store
from safeshift.telemetry import Cell, CellKey, Moments, rows_from_cells

RECENT_IDS = 200_000
"""Request ids a process remembers having given out (the oldest forgotten first)."""

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


def same_answer(a: Any, b: Any) -> bool:
    """Two answers are the same (numbers within float rounding)."""
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

    def __init__(self, size: int = RECENT_IDS) -> None:
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



class FeedbackJoiner:
    """Joins feedback to the request records of one rollout in ``store``.

    ``settle`` writes what this process still buffers (request records, pending shadow copies)
    to the store; it is called when an id is not found, before the id is refused."""

    def __init__(self, plan: Plan, store: Store, clock: Clock, *, window: float,
                 settle: Callable[[], None]) -> None:
        self.plan = plan
        self.store = store
        self.clock = clock
        self.window = window  # telemetry window (s): feedback counts in its request's window
        self._settle = settle
        self._abs_error = any(g.metric == "abs_error" for g in plan.guardrails)
        self._outcome_ranges = plan.outcome_ranges()
        self.request_ids = RecentRequestIds()  # the ids check_request_id claimed

    def _window_of(self, rec: RequestRecord) -> int:
        return int(rec.created_at // self.window * self.window)

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

    def find(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        """The live request records for ``request_ids``; :class:`UnknownRequestError` names
        the first id that has none (never served here, or past its label window)."""
        found = self.store.get_requests(request_ids)
        if len(found) < len(set(request_ids)):
            self._settle()  # they may still wait in this process's buffers
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

    def items(self, rec: RequestRecord, label: Any,
                        outcome: Mapping[str, float] | None) -> list[FeedbackItem]:
        now = self.clock.now()
        window = self._window_of(rec)
        signals: dict[str, dict[str, list[float]]] = {}
        if label is not None:
            labels = label if isinstance(label, list) else [label]
            for arm, outputs in rec.outputs.items():
                for out, lab in zip(outputs or [], labels, strict=False):
                    signals.setdefault("accuracy", {}).setdefault(arm, []).append(
                        1.0 if same_answer(out, lab) else 0.0)
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
        records = self.find([str(item["id"]) for item in items])
        for i, item in enumerate(items):
            problem = label_mismatch(records[str(item["id"])], item.get("label"))
            if problem:
                raise ValueError(f"item {i}: {problem}")
        plan: list[tuple[str, list[FeedbackItem]]] = []
        for item in items:
            rid = str(item["id"])
            plan.append((rid, self.items(records[rid], item.get("label"),
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
                    window = self._window_of(rec)
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
        rec = self.find([request_id])[request_id]
        window = self._window_of(rec)
        cell = Cell()
        cell.metrics["report_rate"] = Moments(0.0, 1.0, 1.0)  # a numerator without a request
        cell.metrics[f"reports:{kind[:32]}"] = Moments(1.0, 1.0, 1.0)
        rows = rows_from_cells(self.plan.rollout,
                               {CellKey(rec.stage, rec.arm, rec.cohort, rec.segment, window,
                                        rec.cluster): cell})
        now = self.clock.now()
        if rec.unit_hash < 0:
            counted = self.store.add_feedback([FeedbackItem(request_id, "report_rate", 1.0, now,
                                                            list(rows))])[0]
            if counted:
                self._keep_text(rec, kind, text, now)
            return counted
        # the request's own key (its repeat is a duplicate) and the unit's, which counts
        unit_key = FeedbackItem(f"{REPORT_UNIT_PREFIX}{rec.unit_hash}",
                                f"report@{self.plan.rollout}/{rec.stage}", 1.0, now, list(rows))
        own, unit = self.store.add_feedback([
            FeedbackItem(request_id, "report_rate", 1.0, now, []), unit_key])
        counted = own and unit
        if counted:
            self._keep_text(rec, kind, text, now)
        return counted

    def _keep_text(self, rec: RequestRecord, kind: str, text: str, now: float) -> None:
        """The report's text, redacted, once per counted report (so once per unit and stage)."""
        if not text or not text.strip():
            return
        from safeshift.redact import redact

        clean, counts = redact(text)
        self.store.add_report_text(ReportText(self.plan.rollout, rec.stage, rec.arm,
                                              kind[:32], now, clean, dict(counts)))

