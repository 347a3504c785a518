"""Events become mergeable sufficient statistics.

Each observation lands in a *cell* — (stage, arm, cohort, segment, time window, cluster) — as
count, sum and sum of squares per signal, plus a log-bucketed histogram for latencies. Cells from
many processes merge by addition, so the store grows with time windows, segments and clusters,
never with users or requests.

The *cluster* is the unit's hash bucket (``analysis.unit_buckets`` of them, from the unit's
assignment hash). Every unit lies wholly in one cluster, so per-cluster sums are what the
unit-level (cluster-robust) variance needs, and they stay additive across windows and replicas.
Only the signals guardrails compare, and ``units``, are kept per cluster; other counts
(requests, predictions by class) and histograms are kept per cell without one (``-1``):
quantiles and drift need no unit-level variance. Units are clustered so that the traffic-split
check can see how much more than once restarts and replicas count a unit.

Signals are named by what they measure: ``requests`` (count), ``error_rate`` (0/1),
``latency_ms`` (value), ``latency_ms>250`` (0/1, one per latency guardrail threshold),
``accuracy`` (0/1 per label), ``disagreement`` (0/1 per shadow pair), ``units`` (one per unit
first seen in the stage, for the sample-ratio check), and so on.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from safeshift.plan import Plan

HIST_MIN = 0.01
"""Histogram floor (milliseconds); smaller values share bucket 0."""
HIST_GROWTH = 1.05
"""Ratio between consecutive bucket bounds: quantiles are within 2.5% of the truth."""
_LOG_GROWTH = math.log(HIST_GROWTH)

NONE = "(none)"
OTHER = "(other)"

SCORE_BINS = 10
"""Prediction scores in [0, 1] are counted in this many equal bins (``score_bin:k``); other
outputs by class (``class:VALUE``). Both feed the prediction-drift comparison."""
MAX_CLASSES = 20

NO_CLUSTER = -1
"""The cluster of telemetry analysed request by request: histograms, and telemetry written
before unit clusters existed."""
_MIX = 0x9E3779B1  # Knuth's multiplicative hash: the top bits mix all of the input


def unit_cluster(unit_hash: int, clusters: int) -> int:
    """The cluster in ``[0, clusters)`` of the unit whose assignment hash is ``unit_hash``: the
    same for every request and label of that unit. A request without a hashed unit (anonymous,
    or targeted by a rule) is its own independent observation and gets a random cluster."""
    if unit_hash < 0:
        return random.randrange(clusters)
    return (((unit_hash * _MIX) & 0xFFFFFFFF) * clusters) >> 32


class UnitCounter:
    """Tells whether a hashed unit is seen for the first time in a stage, in fixed memory.

    A bitmap of 2^25 bits (4 MiB) per stage, indexed by a multiplicative mix of the unit's
    32-bit hash. Two units that share a bit count once; a unit's bit does not depend on its
    arm, so that undercount is the same on every arm and the counted split keeps its expected
    share. Counts are per process: a restart or another replica counts a unit again on its
    arm, which the split check measures and divides out (``stats.srm.count_dispersion``).
    Only the two most recent stages are kept."""

    LOG2_BITS = 25
    BITS = 1 << LOG2_BITS

    def __init__(self) -> None:
        self._maps: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    def first(self, stage: int, unit_hash: int) -> bool:
        if unit_hash < 0:
            return False
        index = ((unit_hash * _MIX) & 0xFFFFFFFF) >> (32 - self.LOG2_BITS)  # the top bits
        byte, bit = index >> 3, 1 << (index & 7)
        with self._lock:
            bits = self._maps.get(stage)
            if bits is None:
                if len(self._maps) >= 2:
                    del self._maps[min(self._maps)]
                bits = self._maps[stage] = bytearray(self.BITS // 8)
            if bits[byte] & bit:
                return False
            bits[byte] |= bit
            return True


def prediction_signals(outputs: list[Any] | None, scores: list[float] | None) -> dict[str, float]:
    """Counts of one answer's predictions by score bin, or by class for non-numeric outputs."""
    out: dict[str, float] = {}
    if scores:
        for score in scores:
            if 0.0 <= score <= 1.0:
                key = f"score_bin:{min(int(score * SCORE_BINS), SCORE_BINS - 1)}"
                out[key] = out.get(key, 0.0) + 1.0
        return out
    for value in outputs or ():
        if isinstance(value, bool | int | str):
            key = f"class:{str(value)[:32]}"
            out[key] = out.get(key, 0.0) + 1.0
    return out if len(out) <= MAX_CLASSES else {}


@dataclass(slots=True)
class Moments:
    """Count, sum and sum of squares: enough for means, proportions and their variances."""

    n: float = 0.0
    s: float = 0.0
    ss: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1.0
        self.s += value
        self.ss += value * value

    def merge(self, other: Moments) -> None:
        self.n += other.n
        self.s += other.s
        self.ss += other.ss

    @property
    def mean(self) -> float:
        return self.s / self.n if self.n else math.nan


def hist_bucket(value: float) -> int:
    if value <= HIST_MIN:
        return 0
    return max(1, math.ceil(math.log(value / HIST_MIN) / _LOG_GROWTH))


def hist_upper(bucket: int) -> float:
    """Upper bound of a bucket (milliseconds)."""
    return HIST_MIN * HIST_GROWTH**bucket


@dataclass(slots=True)
class Histogram:
    """Sparse log-bucketed counts; merge by addition."""

    counts: dict[int, int] = field(default_factory=dict)

    def add(self, value: float) -> None:
        b = hist_bucket(value)
        self.counts[b] = self.counts.get(b, 0) + 1

    def merge(self, other: Histogram | Mapping[int, int]) -> None:
        items = other.counts.items() if isinstance(other, Histogram) else other.items()
        for b, c in items:
            self.counts[int(b)] = self.counts.get(int(b), 0) + int(c)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float:
        """Approximate ``q``-quantile: the geometric middle of the bucket that holds it."""
        total = self.total
        if total == 0:
            return math.nan
        rank = q * total
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return HIST_MIN if b == 0 else hist_upper(b) / math.sqrt(HIST_GROWTH)
        return hist_upper(max(self.counts))

    def share_above(self, threshold: float) -> float:
        total = self.total
        if total == 0:
            return math.nan
        cut = hist_bucket(threshold)
        return sum(c for b, c in self.counts.items() if b > cut) / total


@dataclass(slots=True)
class Cell:
    """Everything observed for one (stage, arm, cohort, segment, window)."""

    metrics: dict[str, Moments] = field(default_factory=dict)
    hists: dict[str, Histogram] = field(default_factory=dict)

    def moments(self, signal: str) -> Moments:
        m = self.metrics.get(signal)
        if m is None:
            m = self.metrics[signal] = Moments()
        return m

    def merge(self, other: Cell) -> None:
        for k, m in other.metrics.items():
            self.moments(k).merge(m)
        for k, h in other.hists.items():
            self.hists.setdefault(k, Histogram()).merge(h)


class CellKey(NamedTuple):
    """Where an observation counts: stage, arm, cohort, segment, time window and cluster.

    A named tuple rather than a frozen dataclass: every request builds two or three keys and
    looks them up in the aggregator's dictionary, and a tuple is built, hashed and compared in
    C — several microseconds a request less than the generated ``__init__``, ``__hash__`` and
    ``__eq__`` of a frozen dataclass. Fields and immutability are the same."""

    stage: int
    arm: str
    cohort: str  # "hash" for hashed units, "targeted" for targeting rules, "other"
    segment: str  # canonical "country=BR|plan=pro"
    window: int  # start of the time window, seconds since the epoch
    cluster: int = NO_CLUSTER  # the unit's hash bucket, or -1 (see the module's docstring)


@dataclass(frozen=True, slots=True)
class TelemetryRow:
    """One signal of one cell, as stored."""

    rollout: str
    stage: int
    arm: str
    cohort: str
    segment: str
    window: int
    signal: str
    n: float
    s: float
    ss: float
    hist: dict[int, int] | None = None
    cluster: int = NO_CLUSTER


def segment_dict(segment: str) -> dict[str, str]:
    if not segment:
        return {}
    return dict(part.split("=", 1) for part in segment.split("|"))


class SegmentKeyer:
    """Canonical segment key from a request context, with a cap on distinct values. Values of
    ``personal`` attributes are replaced by their pseudonym (:mod:`safeshift.pseudonym`) here,
    before they reach a cell, a record or a log."""

    def __init__(self, attributes: Iterable[str], max_values: int = 50, *,
                 personal: Iterable[str] = ()) -> None:
        self.attributes = list(attributes)
        self.max_values = max_values
        self._seen: dict[str, set[str]] = {a: set() for a in self.attributes}
        self.personal = frozenset(personal) & set(self.attributes)
        self._pseudonyms: Any = None
        if self.personal:
            from safeshift.pseudonym import pseudonymizer

            self._pseudonyms = pseudonymizer()

    def key(self, context: Mapping[str, Any] | None) -> str:
        if not self.attributes:
            return ""
        parts = []
        for attr in self.attributes:
            raw = None if context is None else context.get(attr)
            if raw is None or raw == "":
                value = NONE
            else:
                if attr in self.personal:
                    value = self._pseudonyms.pseudonym(attr, str(raw))
                else:
                    value = str(raw)[:64].replace("|", "/").replace("=", ":")
                seen = self._seen[attr]
                if value not in seen:
                    if len(seen) >= self.max_values:
                        value = OTHER
                    else:
                        seen.add(value)
            parts.append(f"{attr}={value}")
        return "|".join(parts)


class Aggregator:
    """Thread-safe in-memory accumulation of cells until :meth:`drain`."""

    def __init__(self, plan: Plan) -> None:
        self.rollout = plan.rollout
        self.window = plan.serving.telemetry_window
        self.keyer = SegmentKeyer(plan.segments, plan.analysis.max_segment_values,
                                  personal=plan.personal)
        thresholds: dict[str, set[float]] = {}
        for g in plan.guardrails:
            if g.above is not None:
                thresholds.setdefault(g.metric, set()).add(g.above)
        self.thresholds = {k: sorted(v) for k, v in thresholds.items()}
        # each threshold with its signal's name, formatted once (not on every observation)
        self._cuts = {k: [(cut, f"{k}>{cut:g}") for cut in v] for k, v in self.thresholds.items()}
        # only what a guardrail compares needs per-cluster sums, and the units the split check
        # counts (to see how often restarts and replicas count a unit again); other counts
        # (requests, predictions by class) are kept once per cell, which keeps the store small
        self.clustered = frozenset(g.key for g in plan.guardrails) | {"units"}
        self._cells: dict[CellKey, Cell] = {}
        self._lock = threading.Lock()

    def key(self, stage: int, arm: str, cohort: str, segment: str, now: float,
            cluster: int = NO_CLUSTER) -> CellKey:
        w = int(now // self.window * self.window)
        return CellKey(stage, arm, cohort, segment, w, cluster)

    def _cell(self, key: CellKey) -> Cell:
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Cell()
        return cell

    def observe(self, key: CellKey, values: Mapping[str, float], *, hist: bool = False) -> None:
        """Add one observation of each signal in ``values`` to the cell ``key``: in its cluster
        for the signals guardrails compare, in the cell without a cluster for the others."""
        clustered = self.clustered
        cuts = self._cuts
        with self._lock:
            cell = self._cell(key)
            flat = cell if key.cluster == NO_CLUSTER else self._cell(_unclustered(key))
            for signal, value in values.items():
                (cell if signal in clustered else flat).moments(signal).add(value)
                for cut, name in cuts.get(signal, ()):
                    (cell if name in clustered else flat).moments(name).add(
                        1.0 if value > cut else 0.0)
                if hist and signal.endswith("_ms"):
                    h = flat.hists.get(signal)
                    if h is None:
                        h = flat.hists[signal] = Histogram()
                    h.add(value)

    def add_counts(self, key: CellKey, counts: Mapping[str, float]) -> None:
        """Add counts (n and sum both grow by the count: a 0/1 signal that was 1), in the cell
        without a cluster."""
        with self._lock:
            cell = self._cell(_unclustered(key) if key.cluster != NO_CLUSTER else key)
            for signal, count in counts.items():
                m = cell.moments(signal)
                m.n += count
                m.s += count
                m.ss += count

    def add_cell(self, key: CellKey, cell: Cell) -> None:
        with self._lock:
            existing = self._cells.get(key)
            if existing is None:
                self._cells[key] = cell
            else:
                existing.merge(cell)

    def restore(self, rows: Iterable[TelemetryRow]) -> None:
        """Put drained rows back (their write failed); they merge with newer observations."""
        for r in rows:
            cell = Cell()
            cell.metrics[r.signal] = Moments(r.n, r.s, r.ss)
            if r.hist:
                cell.hists[r.signal] = Histogram(dict(r.hist))
            self.add_cell(CellKey(r.stage, r.arm, r.cohort, r.segment, r.window, r.cluster), cell)

    def drain(self) -> list[TelemetryRow]:
        with self._lock:
            cells, self._cells = self._cells, {}
        return rows_from_cells(self.rollout, cells)

    def __len__(self) -> int:
        return len(self._cells)


def _unclustered(key: CellKey) -> CellKey:
    """``key`` without its cluster (what ``dataclasses.replace`` does, several times faster)."""
    return CellKey(key.stage, key.arm, key.cohort, key.segment, key.window)


def rows_from_cells(rollout: str, cells: Mapping[CellKey, Cell]) -> list[TelemetryRow]:
    rows = []
    for k, cell in cells.items():
        for signal in cell.metrics.keys() | cell.hists.keys():
            m = cell.metrics.get(signal) or Moments()  # a histogram alone: a clustered cell's
            h = cell.hists.get(signal)
            rows.append(TelemetryRow(rollout, k.stage, k.arm, k.cohort, k.segment, k.window,
                                     signal, m.n, m.s, m.ss, dict(h.counts) if h else None,
                                     k.cluster))
    return rows


@dataclass(slots=True)
class Pooled:
    """One signal on one arm and population (global, or one segment value) of a stage: its
    totals, and its sums per cluster (``cluster -> [n, s]``) where the telemetry is clustered.
    """

    n: float = 0.0
    s: float = 0.0
    ss: float = 0.0
    clusters: dict[int, list[float]] = field(default_factory=dict)

    def add(self, cluster: int, m: Moments) -> None:
        self.n += m.n
        self.s += m.s
        self.ss += m.ss
        if cluster != NO_CLUSTER:
            acc = self.clusters.get(cluster)
            if acc is None:
                self.clusters[cluster] = [m.n, m.s]
            else:
                acc[0] += m.n
                acc[1] += m.s

    @property
    def moments(self) -> Moments:
        return Moments(self.n, self.s, self.ss)

    @property
    def clustered(self) -> bool:
        return bool(self.clusters)


_EMPTY = Pooled()

_IndexKey = tuple[str, str, str, str, str]  # arm, cohort, signal, attribute ("" = all), value


@dataclass(slots=True)
class Summary:
    """Telemetry of one stage summed over windows:
    ``cells[(arm, cohort, segment, cluster)][signal]``.

    Every read goes through an index built once, on the first read, in one pass over the cells:
    each cell's signals are added to the global population and to each of its segment values.
    A tick's cost then grows linearly with the cells, not with cells × judged segment values.
    Fill ``cells`` before the first read (or build with :meth:`from_rows`)."""

    cells: dict[tuple[str, str, str, int], dict[str, Moments]] = field(default_factory=dict)
    hists: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (arm, signal)
    _index: dict[_IndexKey, Pooled] | None = field(default=None, repr=False, compare=False)
    _signals: dict[tuple[str, str], dict[str, float]] = field(
        default_factory=dict, repr=False, compare=False)
    _values: dict[str, set[str]] = field(default_factory=dict, repr=False, compare=False)
    _arms: set[str] = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def from_rows(cls, rows: Iterable[TelemetryRow]) -> Summary:
        out = cls()
        for r in rows:
            cell = out.cells.setdefault((r.arm, r.cohort, r.segment, r.cluster), {})
            m = cell.get(r.signal)
            if m is None:
                cell[r.signal] = Moments(r.n, r.s, r.ss)
            else:
                m.n += r.n
                m.s += r.s
                m.ss += r.ss
            if r.hist:
                out.hists.setdefault((r.arm, r.signal), Histogram()).merge(r.hist)
        return out

    def _build(self) -> dict[_IndexKey, Pooled]:
        index: dict[_IndexKey, Pooled] = {}
        self._signals, self._values = {}, {}
        self._arms = {arm for (arm, _, _, _) in self.cells}
        for (arm, cohort, seg, cluster), signals in self.cells.items():
            where = [("", "")]
            for attr, value in segment_dict(seg).items():
                where.append((attr, value))
                self._values.setdefault(attr, set()).add(value)
            counts = self._signals.setdefault((arm, cohort), {})
            for signal, m in signals.items():
                counts[signal] = counts.get(signal, 0.0) + m.n
                for attr, value in where:
                    key = (arm, cohort, signal, attr, value)
                    p = index.get(key)
                    if p is None:
                        p = index[key] = Pooled()
                    p.add(cluster, m)
        self._index = index
        return index

    def pooled(self, arm: str, signal: str, *, cohort: str = "hash",
               where: tuple[str, str] | None = None) -> Pooled:
        """``signal`` on ``arm`` in ``cohort``, for every segment or the value ``where =
        (attribute, value)``, with its per-cluster sums."""
        index = self._index if self._index is not None else self._build()
        attr, value = where if where is not None else ("", "")
        return index.get((arm, cohort, signal, attr, value), _EMPTY)

    def total(self, arm: str, signal: str, *, cohort: str = "hash",
              where: tuple[str, str] | None = None) -> Moments:
        """Sum of ``signal`` on ``arm`` in ``cohort``, optionally for the segment value
        ``where = (attribute, value)``."""
        return self.pooled(arm, signal, cohort=cohort, where=where).moments

    def counts(self, arm: str, prefix: str, *, cohort: str = "hash") -> dict[str, float]:
        """``{suffix: n}`` for every signal ``prefix + suffix`` on ``arm``."""
        if self._index is None:
            self._build()
        return {signal[len(prefix):]: n
                for signal, n in self._signals.get((arm, cohort), {}).items()
                if signal.startswith(prefix)}

    def arms(self) -> set[str]:
        if self._index is None:
            self._build()
        return set(self._arms)

    def segment_values(self) -> dict[str, set[str]]:
        if self._index is None:
            self._build()
        return {attr: set(values) for attr, values in self._values.items()}

    # -- the frozen form: what a decision was computed from -----------------------------------

    def to_json(self) -> dict[str, Any]:
        """The summary as the analysis reads it: every population of the index (arm, cohort,
        signal, segment value) with its totals and cluster sums, but not the cells they were
        added from. :meth:`from_json` gives a summary whose every read returns exactly the same
        numbers (floats survive JSON exactly), so a stored decision can be judged again; it
        grows with segment values × clusters, not with the cells' segment combinations."""
        index = self._index if self._index is not None else self._build()
        return {
            "format": 1,
            "arms": sorted(self._arms),
            "values": {attr: sorted(values) for attr, values in sorted(self._values.items())},
            "signals": [[arm, cohort, counts] for (arm, cohort), counts in self._signals.items()],
            # in the index's own order, clusters too: sums over them then add up in the same
            # order, to the last bit
            "pooled": [[*key, p.n, p.s, p.ss, [[c, *v] for c, v in p.clusters.items()]]
                       for key, p in index.items()],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Summary:
        """The summary :meth:`to_json` froze (reads only: it has no cells)."""
        if doc.get("format") != 1:
            raise ValueError(f"unknown summary format {doc.get('format')!r}")
        out = cls()
        out._arms = {str(a) for a in doc["arms"]}
        out._values = {str(a): {str(v) for v in vs} for a, vs in doc["values"].items()}
        out._signals = {(str(arm), str(cohort)): {str(k): float(n) for k, n in counts.items()}
                        for arm, cohort, counts in doc["signals"]}
        index: dict[_IndexKey, Pooled] = {}
        for arm, cohort, signal, attr, value, n, s, ss, clusters in doc["pooled"]:
            index[(arm, cohort, signal, attr, value)] = Pooled(
                float(n), float(s), float(ss), {int(c): [float(cn), float(cs)]
                                                for c, cn, cs in clusters})
        out._index = index
        return out
