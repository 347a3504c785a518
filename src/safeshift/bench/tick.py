"""``safeshift bench tick``: what the controller tick's analysis costs against the stage's cells.

A tick reads the stage's totals (``store.telemetry_totals``), builds a :class:`Summary` and runs
:func:`analyse`. The indexed ``Summary`` reads every cell once per tick, however many guardrails
and segment values are judged; the algorithm it replaced rescanned every cell on every lookup
(:class:`RescanSummary`, kept here to run side by side with it). Both must give identical
analyses, which the benchmark checks at every size.

The telemetry is synthetic but shaped like a real stage's: a plan with two guardrails and three
segment attributes (country 50 values, device 8, plan 10), a canary at 50 %, units hashed into
64 clusters. Each attribute's values take Zipf-like shares (``1 / rank^1.1``), independently, so
a few segment combinations carry most units and many carry a handful; a combination's units on
an arm land in the clusters their hashes pick, so a small combination fills only a few clusters.
The number of units is chosen to give about 1k, 10k and 100k cells (a cell is one (arm, cohort,
segment, cluster) key, with the per-combination histogram cells of cluster -1 included).
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.console import Console
from rich.table import Table

from safeshift.analysis import StageAnalysis, analyse
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.plan import Plan
from safeshift.store import SQLStore, sqlite_url
from safeshift.telemetry import (
    NO_CLUSTER,
    Moments,
    Pooled,
    Summary,
    TelemetryRow,
    hist_bucket,
    segment_dict,
)

ROLLOUT = "bench-tick"
SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (1_000, 10_000)
CLUSTERS = 64
ZIPF = 1.1
OLD_BUDGET = 60.0
"""Seconds the previous algorithm may take at one size; beyond that it is extrapolated."""
SEED = 2026

COUNTRIES = ("US", "IN", "BR", "GB", "DE", "FR", "JP", "MX", "ID", "CA", "IT", "ES", "KR", "TR",
             "AU", "PL", "NL", "PH", "VN", "AR", "CO", "SA", "TH", "EG", "NG", "ZA", "SE", "BE",
             "CH", "AT", "PK", "MY", "CL", "PE", "IL", "DK", "NO", "FI", "IE", "PT", "CZ", "RO",
             "GR", "HU", "NZ", "SG", "AE", "UA", "KE", "TW")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "country": COUNTRIES,
    "device": ("android", "ios", "web", "ipad", "desktop", "tv", "watch", "car"),
    "plan": ("free", "basic", "pro", "family", "student", "team", "trial", "business",
             "enterprise", "partner"),
}
REQUESTS_PER_UNIT = 20.0  # beyond the first, Poisson: a stage of a few hours
ERROR_RATE = 0.01
HARM = ("country", "BR", 0.03)  # the candidate fails 3 pt more often in Brazil: a segment harm
LATENCY_MEDIAN, LATENCY_SIGMA = 120.0, 0.5  # log-normal, milliseconds
LATENCY_CUT = 250.0

CellKey = tuple[str, str, str, int]
T = TypeVar("T")


def bench_plan() -> Plan:
    return Plan.from_dict({
        "rollout": ROLLOUT, "endpoint": "bench",
        "baseline": {"version": "v1", "model": "fake:a"},
        "candidate": {"version": "v2", "model": "fake:b"},
        "change": {"summary": "benchmark"},
        "unit": "user_id", "segments": list(ATTRIBUTES),
        "stages": [{"name": "canary", "traffic": "50%", "min_samples": 1000}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.002},
                       {"metric": "latency_ms", "above": LATENCY_CUT, "tolerance": 0.01}],
        "analysis": {"unit_buckets": CLUSTERS},
    })


# -- the previous algorithm, and instruments ------------------------------------------------


@dataclass(slots=True)
class RescanSummary(Summary):
    """The summary before the index: every read scans every cell (``Summary.total`` before
    issue 8), here returning the per-cluster sums that today's ``analyse`` reads.
    ``scans`` counts the full passes over the cells."""

    scans: int = 0

    def pooled(self, arm: str, signal: str, *, cohort: str = "hash",
               where: tuple[str, str] | None = None) -> Pooled:
        self.scans += 1
        out = Pooled()
        for (a, c, seg, cluster), signals in self.cells.items():
            if a != arm or c != cohort:
                continue
            if where is not None and segment_dict(seg).get(where[0]) != where[1]:
                continue
            m = signals.get(signal)
            if m is not None:
                out.add(cluster, m)
        return out

    def total(self, arm: str, signal: str, *, cohort: str = "hash",
              where: tuple[str, str] | None = None) -> Moments:
        return self.pooled(arm, signal, cohort=cohort, where=where).moments

    def counts(self, arm: str, prefix: str, *, cohort: str = "hash") -> dict[str, float]:
        self.scans += 1
        out: dict[str, float] = {}
        for (a, c, _, _), signals in self.cells.items():
            if a != arm or c != cohort:
                continue
            for signal, m in signals.items():
                if signal.startswith(prefix):
                    key = signal[len(prefix):]
                    out[key] = out.get(key, 0.0) + m.n
        return out

    def arms(self) -> set[str]:
        self.scans += 1
        return {arm for (arm, _, _, _) in self.cells}

    def segment_values(self) -> dict[str, set[str]]:
        self.scans += 1
        values: dict[str, set[str]] = {}
        for (_, _, seg, _) in self.cells:
            for attr, value in segment_dict(seg).items():
                values.setdefault(attr, set()).add(value)
        return values


@dataclass(slots=True)
class LookupSummary(Summary):
    """Today's summary, counting the reads ``analyse`` makes (each one a full scan before)."""

    lookups: int = 0

    def pooled(self, arm: str, signal: str, *, cohort: str = "hash",
               where: tuple[str, str] | None = None) -> Pooled:
        self.lookups += 1
        return Summary.pooled(self, arm, signal, cohort=cohort, where=where)

    def counts(self, arm: str, prefix: str, *, cohort: str = "hash") -> dict[str, float]:
        self.lookups += 1
        return Summary.counts(self, arm, prefix, cohort=cohort)

    def arms(self) -> set[str]:
        self.lookups += 1
        return Summary.arms(self)

    def segment_values(self) -> dict[str, set[str]]:
        self.lookups += 1
        return Summary.segment_values(self)


class CountingCells(dict[CellKey, dict[str, Moments]]):
    """A summary's cells that count every cell a read visits, whatever the algorithm."""

    visits = 0

    def __iter__(self) -> Iterator[CellKey]:
        for key in dict.__iter__(self):
            self.visits += 1
            yield key

    def keys(self) -> Iterator[CellKey]:  # type: ignore[override]
        return iter(self)

    def values(self) -> Iterator[dict[str, Moments]]:  # type: ignore[override]
        for _, value in self.items():
            yield value

    def items(self) -> Iterator[tuple[CellKey, dict[str, Moments]]]:  # type: ignore[override]
        for item in dict.items(self):
            self.visits += 1
            yield item


def tick(plan: Plan, rows: list[TelemetryRow], kind: type[Summary] = Summary) -> StageAnalysis:
    """The tick's analysis work on the rows the store returned."""
    return analyse(plan, 0, kind.from_rows(rows))


def cell_visits(plan: Plan, rows: list[TelemetryRow], kind: type[Summary] = Summary) -> int:
    """How many cells one tick reads, counted on the cells themselves."""
    summary = kind.from_rows(rows)
    counted = CountingCells(summary.cells)
    summary.cells = counted
    analyse(plan, 0, summary)
    return counted.visits


def instrumented(plan: Plan, rows: list[TelemetryRow]) -> tuple[int, int, int]:
    """One tick of today's summary: the reads ``analyse`` makes of it, the cells it visits and
    the segment values it saw."""
    summary = LookupSummary.from_rows(rows)
    assert isinstance(summary, LookupSummary)
    counted = CountingCells(summary.cells)
    summary.cells = counted
    analyse(plan, 0, summary)
    values = sum(len(v) for v in Summary.segment_values(summary).values())
    return summary.lookups, counted.visits, values


def same(a: StageAnalysis, b: StageAnalysis) -> bool:
    return json.dumps(a.to_json(), sort_keys=True) == json.dumps(b.to_json(), sort_keys=True)


# -- synthetic telemetry ---------------------------------------------------------------------


def _shares(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** ZIPF
    return np.asarray(w / w.sum())


def combinations() -> tuple[list[str], np.ndarray]:
    """Every segment combination, canonically keyed, with its share of the units."""
    segments = [""]
    shares = np.ones(1)
    for attr, values in ATTRIBUTES.items():
        segments = [f"{s}|{attr}={v}" if s else f"{attr}={v}" for s in segments for v in values]
        shares = np.outer(shares, _shares(len(values))).ravel()
    return segments, shares


def expected_cells(units: float, shares: np.ndarray) -> float:
    """Expected cells when ``units`` units split evenly between the arms."""
    lam = units * shares / 2
    per_arm = CLUSTERS * -np.expm1(-lam / CLUSTERS) + -np.expm1(-lam)  # clusters + histogram
    return float(2 * per_arm.sum())


def units_for(cells: int, shares: np.ndarray) -> float:
    lo, hi = 1.0, 1e13
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if expected_cells(mid, shares) < cells else (lo, mid)
    return hi


def _latency_hist() -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(0)
    sample = LATENCY_MEDIAN * np.exp(LATENCY_SIGMA * rng.standard_normal(50_000))
    buckets: dict[int, int] = {}
    for v in sample:
        b = hist_bucket(float(v))
        buckets[b] = buckets.get(b, 0) + 1
    keys = sorted(buckets)
    p = np.array([buckets[k] for k in keys], dtype=float)
    return keys, p / p.sum()


@dataclass(slots=True)
class Telemetry:
    rows: list[TelemetryRow]
    cells: int
    units: int
    requests: int


def telemetry(target_cells: int, seed: int = SEED) -> Telemetry:
    """Rows as ``store.telemetry_totals`` returns them (window 0) for about ``target_cells``."""
    rng = np.random.default_rng(seed)
    segments, shares = combinations()
    lam = units_for(target_cells, shares) * shares / 2
    mean = LATENCY_MEDIAN * math.exp(LATENCY_SIGMA ** 2 / 2)
    var = (math.exp(LATENCY_SIGMA ** 2) - 1) * mean ** 2
    slow = 0.5 * math.erfc(math.log(LATENCY_CUT / LATENCY_MEDIAN) / LATENCY_SIGMA / math.sqrt(2))
    hist_keys, hist_p = _latency_hist()
    uniform = np.full(CLUSTERS, 1.0 / CLUSTERS)
    harm_attr, harm_value, harm = HARM
    rows: list[TelemetryRow] = []
    cells = units_total = requests_total = 0
    for arm in (BASELINE, CANDIDATE):
        per_combination = rng.poisson(lam)
        for i in np.flatnonzero(per_combination):
            seg = segments[i]
            p_error = ERROR_RATE
            if arm == CANDIDATE and segment_dict(seg).get(harm_attr) == harm_value:
                p_error += harm
            per_cluster = rng.multinomial(per_combination[i], uniform)
            clusters = np.flatnonzero(per_cluster)
            units = per_cluster[clusters]
            req = units + rng.poisson(units * REQUESTS_PER_UNIT)
            # units differ: each cluster's error propensity varies around the arm's rate
            errors = rng.binomial(req, rng.beta(20 * p_error, 20 * (1 - p_error), len(req)))
            slows = rng.binomial(req, slow)
            lat = np.maximum(req * mean + np.sqrt(req * var) * rng.standard_normal(len(req)), 1.0)
            lat_ss = req * (var + mean ** 2) * np.exp(0.1 * rng.standard_normal(len(req)))
            for g, u, n, e, sl, s, ss in zip(clusters.tolist(), units.astype(float).tolist(),
                                             req.astype(float).tolist(),
                                             errors.astype(float).tolist(),
                                             slows.astype(float).tolist(), lat.tolist(),
                                             lat_ss.tolist(), strict=True):
                n_f = n
                rows += [
                    TelemetryRow(ROLLOUT, 0, arm, "hash", seg, 0, "requests", n_f, n_f, n_f, None, g),
                    TelemetryRow(ROLLOUT, 0, arm, "hash", seg, 0, "error_rate", n_f, e, e, None, g),
                    TelemetryRow(ROLLOUT, 0, arm, "hash", seg, 0, "latency_ms", n_f, s, ss, None, g),
                    TelemetryRow(ROLLOUT, 0, arm, "hash", seg, 0, f"latency_ms>{LATENCY_CUT:g}",
                                 n_f, sl, sl, None, g),
                    TelemetryRow(ROLLOUT, 0, arm, "hash", seg, 0, "units", u, u, u, None, g),
                ]
            # histograms are kept without the cluster (telemetry's module docstring)
            total = int(req.sum())
            counts = rng.multinomial(total, hist_p)
            hist = {hist_keys[j]: int(c) for j, c in enumerate(counts.tolist()) if c}
            rows.append(TelemetryRow(ROLLOUT, 0, arm, "hash", seg, 0, "latency_ms", 0.0, 0.0, 0.0,
                                     hist, NO_CLUSTER))
            cells += len(clusters) + 1
            units_total += int(units.sum())
            requests_total += total
    return Telemetry(rows, cells, units_total, requests_total)


# -- timing ----------------------------------------------------------------------------------


def _median(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Median CPU seconds of this process over ``repeat`` calls, and the last call's result.
    CPU time, not wall time: on a shared machine the wall clock mostly measures the others."""
    times = []
    result: T
    for _ in range(repeat):
        gc.collect()
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def _repeats(cells: int, quick: bool) -> tuple[int, int, int]:
    """Repetitions of the new tick, the old one and the store read."""
    if cells <= 2_000:
        return (15, 3, 3) if quick else (15, 5, 5)
    if cells <= 20_000:
        return (3, 1, 2) if quick else (7, 3, 3)
    return 3, 1, 3


def store_read(rows: list[TelemetryRow], repeat: int) -> tuple[float, int]:
    """Median CPU seconds of ``telemetry_totals`` on a SQLite store holding ``rows`` (SQLite runs
    in this process), and how many rows it returned."""
    with tempfile.TemporaryDirectory(prefix="safeshift-bench-tick-") as tmp:
        store = SQLStore(sqlite_url(Path(tmp) / "bench.db"))
        try:
            for i in range(0, len(rows), 50_000):
                store.add_telemetry(rows[i:i + 50_000])
            seconds, read = _median(lambda: store.telemetry_totals(ROLLOUT, 0), repeat)
        finally:
            store.close()
    return seconds, len(read)


@dataclass(slots=True)
class SizeResult:
    target: int
    cells: int
    rows: int
    units: int
    requests: int
    values: int  # segment values judged
    verdicts: dict[str, int]
    lookups: int  # reads analyse makes of the summary
    new_s: float
    new_reads: int  # cells read per tick, counted
    old_s: float | None
    old_reads: int | None
    old_measured: bool  # False: old_s extrapolated
    identical: bool | None  # None: the old algorithm was not run
    store_s: float
    store_rows: int

    @property
    def speedup(self) -> float | None:
        return self.old_s / self.new_s if self.old_s is not None else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup"] = self.speedup
        return out


def run_size(plan: Plan, target: int, *, old: bool | None = None,
             per_read: float | None = None, quick: bool = False, store: bool = True,
             repeats: tuple[int, int, int] | None = None) -> SizeResult:
    """One size: the new tick, the previous algorithm (``old=None``: when its estimate from
    ``per_read``, seconds per cell read, fits :data:`OLD_BUDGET`; else extrapolated) and the
    store read, each repeated ``repeats`` times (new, old, store; default by size)."""
    data = telemetry(target)
    rows = data.rows
    reps, old_reps, store_reps = repeats or _repeats(data.cells, quick)
    new_s, analysis = _median(lambda: tick(plan, rows), reps)
    n_lookups, new_reads, values = instrumented(plan, rows)
    old_reads = data.cells * n_lookups
    estimate = per_read * old_reads if per_read is not None else None
    run_old = old if old is not None else estimate is None or estimate <= OLD_BUDGET
    old_s: float | None = estimate
    identical: bool | None = None
    if run_old:
        if estimate:
            old_reps = max(1, min(old_reps, int(OLD_BUDGET / estimate)))
        old_s, old_analysis = _median(lambda: tick(plan, rows, RescanSummary), old_reps)
        identical = same(analysis, old_analysis)
    store_s, store_rows = store_read(rows, store_reps) if store else (math.nan, 0)
    statuses: dict[str, int] = {}
    for v in analysis.verdicts:
        statuses[str(v.status)] = statuses.get(str(v.status), 0) + 1
    return SizeResult(target, data.cells, len(rows), data.units, data.requests, values, statuses,
                      n_lookups, new_s, new_reads, old_s, old_reads if old_s is not None else None,
                      run_old, identical, store_s, store_rows)


def calibration() -> float:
    """CPU seconds of a 10⁶-step pure-Python loop here, to scale the figures to another machine
    (about 30-50 ms on an idle modern core)."""

    def loop() -> int:
        x = 0
        for i in range(1_000_000):
            x += i
        return x

    return _median(loop, 3)[0]


def _ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1e3:,.1f}" if seconds < 10 else f"{seconds * 1e3:,.0f}"


def main(*, quick: bool, json_path: Path | None, console: Console,
         sizes: tuple[int, ...] | None = None,
         repeats: tuple[int, int, int] | None = None) -> dict[str, Any]:
    plan = bench_plan()
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    loop = calibration()
    results: list[SizeResult] = []
    per_read: float | None = None
    started = time.perf_counter()
    for i, target in enumerate(sizes):
        console.print(f"  ... size {i + 1}/{len(sizes)}: about {target:,} cells "
                      f"({time.perf_counter() - started:.0f} s so far)", markup=False,
                      highlight=False)
        r = run_size(plan, target, per_read=per_read, quick=quick, repeats=repeats)
        if r.old_measured and r.old_s is not None and r.old_reads:
            per_read = r.old_s / r.old_reads
        results.append(r)
    table = Table(title="controller tick: Summary.from_rows + analyse, median ms "
                        "(2 guardrails; country 50, device 8, plan 10; 64 clusters)")
    for name in ("cells", "rows", "values judged", "lookups", "new ms", "old ms", "speed-up",
                 "store read ms", "cell reads new / old"):
        table.add_column(name, justify="right")
    for r in results:
        old = _ms(r.old_s) + ("" if r.old_measured else " (est.)")
        speedup = f"{r.speedup:,.0f}×" if r.speedup is not None else "-"
        reads = f"{r.new_reads / r.cells:.0f} / {r.old_reads / r.cells:.0f}" if r.old_reads else "-"
        table.add_row(f"{r.cells:,}", f"{r.rows:,}", str(r.values), str(r.lookups), _ms(r.new_s),
                      old, speedup, _ms(r.store_s), reads)
    console.print(table)
    console.print("CPU time of this process (a shared machine's wall clock mostly measures the "
                  f"others); here a 10⁶-step Python loop takes {loop * 1e3:,.0f} ms. cell reads: "
                  "per cell per tick, counted on the cells. old = the summary before the index, "
                  "which scanned every cell for every lookup; store read = telemetry_totals on "
                  "SQLite holding exactly these rows (one window).", markup=False)
    for r in results:
        if not r.old_measured:
            console.print(f"{r.cells:,} cells: the old algorithm would take about "
                          f"{r.old_s or math.nan:,.0f} s (over the {OLD_BUDGET:.0f} s budget), "
                          "extrapolated from the largest measured size's time per cell read; "
                          "not run, so its verdicts are not compared there.", markup=False)
    verdicts = ", ".join(f"{n} {s}" for s, n in sorted(results[-1].verdicts.items()))
    console.print(f"verdicts at {results[-1].cells:,} cells: {verdicts}", markup=False)
    out = {"sizes": [r.to_json() for r in results], "old_budget_s": OLD_BUDGET,
           "calibration_loop_s": loop,
           "clusters": CLUSTERS, "attributes": {k: len(v) for k, v in ATTRIBUTES.items()}}
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=2))
    differ = [r.cells for r in results if r.identical is False]
    if differ:
        console.print(f"[red]the two algorithms' analyses differ at {differ} cells[/red]")
        raise SystemExit(1)
    console.print("both algorithms gave identical analyses wherever both ran.", markup=False)
    return out
