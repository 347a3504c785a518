"""Clustered traffic for ``safeshift bench decisions``: units, not requests, are independent.

A rollout assigns *units* (users) and measures *requests*. Each simulated rollout draws a fixed
population of :data:`UNITS` units once; every unit has a country (by the scenario's shares), an
arm (the candidate with the stage's traffic share), a cluster (its hash bucket, uniform in
``[0, unit_buckets)``), a request rate (lognormal, normalised so that the population sends
:data:`~safeshift.bench.decisions.RATE` requests/s), and propensities: an error rate and a
share of requests slower than 250 ms (each a Beta around 1 % plus a few units that fail
often), and, for the feedback plan, a share of wrong answers (Beta, mean 10 %) on the labelled
share of its requests. A harmful candidate multiplies each of its units' propensities (capped
at 1, the multiplier solved so that the mean rate moves by the scenario's factor).

Given the population, each (arm, country, cluster) cell's requests of every kind over a look
are independent Poisson counts (superposition and thinning of the units' Poisson processes),
so a look needs one Poisson draw per cell for the common kind (a request with no event; a
correct label) and, for the rare kinds (an error, a slow request, a wrong label), one Poisson
total per run over the whole horizon spread over the cells by their rates and over the looks
uniformly: exact, and independent of the number of units. A unit counts as seen (signal
``units``, the sample-ratio check) from its first request, an exponential time with its rate.
Runs still undecided by some method are compacted together as the others finish.

At a fixed look (``SE_LOOK``, every run simulated that long) the engine's standard error of
each global difference is compared with the Monte-Carlo one (``se_ratio``), and ``ceiling``
gives what the best single test at ``max_duration`` knowing the true standard error could do:
the physics of the traffic, against which the engine's promotion and rollback rates are read.

Every method sees the same traffic: ``safeshift`` the telemetry with clusters (the engine's
unit-level standard error), ``safeshift_requests`` the same telemetry without them (requests
as independent, what the release before unit clusters did), and the naive, threshold,
Mann-Whitney and oracle methods the per-arm totals, as in the unclustered scenarios.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import NDArray
from rich import box
from rich.console import Console
from rich.table import Table
from scipy import optimize, special

from safeshift.analysis import MIN_GLOBAL_SAMPLES, REQUESTS, analyse
from safeshift.analysis import UNITS as UNITS_SIGNAL
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.bench.decisions import (
    COUNTRIES,
    HARM,
    INCONCLUSIVE,
    KAYENTA_CONFIDENCE,
    KAYENTA_TOLERANCE,
    NO_DATA,
    PASS,
    PAUSED,
    PROMOTE,
    RATE,
    ROLLBACK,
    SEGMENT_ATTRIBUTE,
    STATUS_CODES,
    Array,
    EngineSpec,
    EngineVerdicts,
    Mask,
    Outcome,
    _bernoulli_llr,
    _compare_se,
    _fmt_n,
    _fmt_s,
    _Sprt,
    _srm_mismatch,
    bench_plan,
    figures,
    mann_whitney_p,
    segment_alpha,
)
from safeshift.plan import Plan
from safeshift.stats import fixed_horizon_samples_per_arm
from safeshift.telemetry import NO_CLUSTER, Moments, Summary

__all__ = [
    "CLUSTERED_METHODS",
    "CLUSTERED_SCENARIOS",
    "SMALL_COUNTRY",
    "ZIPF_COUNTRIES",
    "ClusteredScenario",
    "Propensity",
    "Traffic",
    "baseline_horizon",
    "ceiling",
    "check_clustered",
    "cluster_variance",
    "clustered_statuses",
    "must_show",
    "render",
    "rollback_causes",
    "run",
    "se_ratio",
    "simulate_clustered",
    "summary_from_clusters",
]

CLUSTERED_METHODS = ("safeshift", "safeshift_requests", "naive", "threshold", "mannwhitney",
                     "oracle")

UNITS = 20_000
"""Units in each simulated rollout's population (about 18 requests each over two hours)."""
RATE_SIGMA = 1.5
"""Sigma of the lognormal per-unit request rate: the top 1 % of units send about 20 % of the
requests."""
LABEL_SHARE = 0.3
"""Share of requests that get a label (feedback plan)."""
LOOK = 60.0
"""Seconds between controller looks in the clustered scenarios."""
SE_LOOK = 600.0
"""The fixed look (the stage's min_duration) at which every run's standard error is taken."""
CHUNK = 250
"""Runs simulated together (bounds memory: cells grow with runs × countries × clusters)."""

# 50 countries with Zipf shares (s = 1): the 11th, ES, has 2.0 % of the traffic
ZIPF_CODES = ("US", "IN", "BR", "DE", "GB", "FR", "JP", "MX", "CA", "AU", "ES", "IT", "KR",
              "NL", "TR", "ID", "PL", "SE", "AR", "CO", "ZA", "NG", "EG", "SA", "AE", "PH",
              "VN", "TH", "MY", "SG", "CH", "AT", "BE", "DK", "NO", "FI", "IE", "PT", "GR",
              "CZ", "RO", "HU", "IL", "CL", "PE", "NZ", "PK", "BD", "UA", "KE")
_HARMONIC = sum(1.0 / k for k in range(1, len(ZIPF_CODES) + 1))
ZIPF_COUNTRIES: tuple[tuple[str, float], ...] = tuple(
    (code, 1.0 / (k * _HARMONIC)) for k, code in enumerate(ZIPF_CODES, start=1))
SMALL_COUNTRY = "ES"


@dataclass(frozen=True, slots=True)
class Propensity:
    """Per-unit rate of an event: Beta with ``mean`` and ``concentration`` (a + b), except a
    ``heavy_share`` of units whose rate is uniform in ``heavy`` (clients that fail often); the
    overall mean is ``mean``."""

    mean: float
    concentration: float
    heavy_share: float = 0.0
    heavy: tuple[float, float] = (0.2, 0.5)

    @property
    def _beta(self) -> tuple[float, float]:
        lo, hi = self.heavy
        m = (self.mean - self.heavy_share * (lo + hi) / 2) / (1 - self.heavy_share)
        return m * self.concentration, (1 - m) * self.concentration

    def draw(self, rng: np.random.Generator, size: tuple[int, ...]) -> Array:
        a, b = self._beta
        p: Array = rng.beta(a, b, size)
        if self.heavy_share:
            heavy = rng.random(size) < self.heavy_share
            p[heavy] = rng.uniform(*self.heavy, int(heavy.sum()))
        return p

    def capped_mean(self, c: float) -> float:
        """E[min(c·p, 1)]."""
        a, b = self._beta
        t = min(1.0 / c, 1.0)
        beta = c * a / (a + b) * float(special.betainc(a + 1, b, t)) + 1 - float(
            special.betainc(a, b, t))
        lo, hi = self.heavy
        if t >= hi:
            heavy = c * (lo + hi) / 2
        elif t <= lo:
            heavy = 1.0
        else:
            heavy = (c * (t * t - lo * lo) / 2 + (hi - t)) / (hi - lo)
        return (1 - self.heavy_share) * beta + self.heavy_share * heavy

    def multiplier(self, factor: float) -> float:
        """The per-unit multiplier c with E[min(c·p, 1)] = factor × mean."""
        if factor == 1.0:
            return 1.0
        target = factor * self.mean
        return float(optimize.brentq(lambda c: self.capped_mean(c) - target, 1e-6, 1e6,
                                     xtol=1e-12))


@dataclass(frozen=True, slots=True)
class Traffic:
    """The population every clustered scenario draws from."""

    units: int = UNITS
    rate_sigma: float = RATE_SIGMA
    error: Propensity = Propensity(0.01, 20.0, 0.01)
    slow: Propensity = Propensity(0.01, 20.0, 0.01)
    wrong: Propensity = Propensity(0.10, 5.0)  # accuracy 0.9 per unit, Beta(4.5, 0.5)
    label_share: float = LABEL_SHARE

    def to_json(self) -> dict[str, Any]:
        def prop(p: Propensity) -> dict[str, Any]:
            return {"mean": p.mean, "concentration": p.concentration,
                    "heavy_share": p.heavy_share, "heavy": list(p.heavy)}

        return {"units": self.units, "rate_lognormal_sigma": self.rate_sigma,
                "error_rate": prop(self.error), "latency_ms>250": prop(self.slow),
                "wrong_answer": prop(self.wrong), "label_share": self.label_share}


@dataclass(frozen=True, slots=True)
class ClusteredScenario:
    """Candidate's mean rates relative to the baseline's: ``factors`` for (errors, slow
    requests, wrong answers) everywhere, ``segment_factors`` in ``segment`` only."""

    name: str
    title: str
    countries: tuple[tuple[str, float], ...] = COUNTRIES
    accuracy: bool = False  # the plan with an accuracy guardrail (feedback labels)
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
    segment: str | None = None
    segment_factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
    watch: str | None = None  # the segment value whose standard error is reported
    harmful: bool = False
    oracle_signal: int = 0  # 0 errors, 2 wrong answers (of labels)
    oracle_h1: float = 0.02  # the oracle's harmful event rate; H0 is the baseline's

    @property
    def watched(self) -> str | None:
        return self.watch or self.segment


CLUSTERED_SCENARIOS: tuple[ClusteredScenario, ...] = (
    ClusteredScenario("clustered_aa", "identical models, clustered traffic"),
    ClusteredScenario("clustered_harmful", "error rate 1% → 2% (every unit's ×2), clustered",
                      factors=(2.0, 1.0, 1.0), harmful=True),
    ClusteredScenario("clustered_segment_harm",
                      "BR (10%): error rate 1% → 5% (every BR unit's ×5, capped), clustered",
                      segment="BR", segment_factors=(5.0, 1.0, 1.0), harmful=True,
                      oracle_h1=0.05),
    ClusteredScenario("clustered_accuracy_aa",
                      "identical models, with an accuracy guardrail on per-unit labels",
                      accuracy=True, oracle_signal=2, oracle_h1=0.13),
    ClusteredScenario("clustered_accuracy_harmful",
                      "accuracy 90% → 87% (every unit's wrong answers ×1.3), clustered",
                      accuracy=True, factors=(1.0, 1.0, 1.3), harmful=True, oracle_signal=2,
                      oracle_h1=0.13),
    ClusteredScenario("many_segments_aa", "identical models, 50 countries (Zipf shares), clustered",
                      countries=ZIPF_COUNTRIES, watch=SMALL_COUNTRY),
    ClusteredScenario("small_segment_harm",
                      f"{SMALL_COUNTRY} (2.0% of 50 countries): error rate 1% → 10%, clustered",
                      countries=ZIPF_COUNTRIES, segment=SMALL_COUNTRY,
                      segment_factors=(10.0, 1.0, 1.0), harmful=True, oracle_h1=0.10),
)


# -- the population ---------------------------------------------------------------------------


@dataclass(slots=True)
class Population:
    """Per-cell expected counts per look, ``[run, arm, country, cluster, kind]``: ``common``
    (requests without an error or slowness; correct labels) and ``rare`` (error and slow,
    error only, slow only; wrong labels); and units first seen, ``seen[run, look, arm]``."""

    common: Array
    rare: Array
    seen: NDArray[np.int64]


def _population(rng: np.random.Generator, traffic: Traffic, scenario: ClusteredScenario,
                runs: int, share: float, clusters: int, looks: int) -> Population:
    countries = scenario.countries
    n_c = len(countries)
    cum_share = np.cumsum([s for _, s in countries])
    cum_share /= cum_share[-1]
    mult = [(traffic.error, traffic.slow, traffic.wrong)[i].multiplier(scenario.factors[i])
            for i in range(3)]
    seg = [c for c, _ in countries].index(scenario.segment) if scenario.segment else -1
    seg_mult = [(traffic.error, traffic.slow, traffic.wrong)[i].multiplier(
        scenario.segment_factors[i]) for i in range(3)]
    kinds_common = 2 if scenario.accuracy else 1
    kinds_rare = 4 if scenario.accuracy else 3
    cells = 2 * n_c * clusters
    common = np.zeros((runs, cells, kinds_common))
    rare = np.zeros((runs, cells, kinds_rare))
    seen = np.zeros((runs, looks + 2, 2), np.int64)
    step = 25
    for start in range(0, runs, step):
        r = min(step, runs - start)
        size = (r, traffic.units)
        country = np.minimum(np.searchsorted(cum_share, rng.random(size), side="right"),
                             n_c - 1)
        arm = (rng.random(size) < share).astype(np.int64)
        cluster = rng.integers(0, clusters, size)
        weight = rng.lognormal(0.0, traffic.rate_sigma, size)
        lam = RATE * LOOK * weight / weight.sum(axis=1, keepdims=True)  # requests per look
        props = [traffic.error.draw(rng, size), traffic.slow.draw(rng, size)]
        if scenario.accuracy:
            props.append(traffic.wrong.draw(rng, size))
        cand = arm == 1
        for i, p in enumerate(props):
            c = np.where(cand, mult[i], 1.0)
            if seg >= 0:
                c = np.where(cand & (country == seg), seg_mult[i], c)
            props[i] = np.minimum(c * p, 1.0)
        pe, pl = props[0], props[1]
        index = ((np.arange(r)[:, None] * 2 + arm) * n_c + country) * clusters + cluster
        flat = index.ravel()

        def cell_sums(w: Array, _r: int = r, _flat: NDArray[np.int64] = flat) -> Array:
            out = np.bincount(_flat, weights=w.ravel(), minlength=_r * cells)
            return np.asarray(out, dtype=np.float64).reshape(_r, cells)

        common[start:start + r, :, 0] = cell_sums(lam * (1 - pe) * (1 - pl))
        rare[start:start + r, :, 0] = cell_sums(lam * pe * pl)
        rare[start:start + r, :, 1] = cell_sums(lam * pe * (1 - pl))
        rare[start:start + r, :, 2] = cell_sums(lam * (1 - pe) * pl)
        if scenario.accuracy:
            pw = props[2]
            common[start:start + r, :, 1] = cell_sums(lam * traffic.label_share * (1 - pw))
            rare[start:start + r, :, 3] = cell_sums(lam * traffic.label_share * pw)
        # a unit is first seen at its first request (exponential with its rate), by look
        first = rng.exponential(1.0, size) / lam  # in looks
        look = np.minimum(np.ceil(first), looks + 1).astype(np.int64)
        idx = (np.arange(r)[:, None] * (looks + 2) + look) * 2 + arm
        seen[start:start + r] = np.bincount(idx.ravel(), minlength=r * (looks + 2) * 2).reshape(
            r, looks + 2, 2)
    shape = (runs, 2, n_c, clusters)
    return Population(common.reshape(*shape, kinds_common), rare.reshape(*shape, kinds_rare),
                      np.cumsum(seen, axis=1))


class _Rare:
    """The rare kinds of every cell over the whole horizon, drawn at once: per run a Poisson
    total over all cells and looks, each event in a cell by the cells' rates and in a look
    uniformly (equal in law to one Poisson count per cell and look). ``at(look, ids)`` gives the
    flat index ``[row, arm, country, cluster, kind]`` of the look's events for the runs
    ``ids`` (the rows of the compacted state)."""

    def __init__(self, rng: np.random.Generator, rates: Array, looks: int) -> None:
        runs = rates.shape[0]
        flat = rates.reshape(runs, -1)
        self.width = flat.shape[1]
        total = flat.sum(axis=1)
        cum = np.cumsum(flat, axis=1)
        counts = rng.poisson(total * looks)
        ends = np.cumsum(counts)
        within = np.empty(int(ends[-1]) if ends.size else 0, np.int64)
        start = 0
        for row, end in enumerate(ends.tolist()):  # one search per run
            if end > start:
                u = rng.random(end - start) * total[row]
                within[start:end] = np.minimum(np.searchsorted(cum[row], u, side="right"),
                                               self.width - 1)
            start = end
        run = np.repeat(np.arange(runs), counts)
        look = rng.integers(1, looks + 1, within.size)
        order = np.argsort(look, kind="stable")
        self.run, self.within = run[order], within[order]
        self.bounds = np.searchsorted(look[order], np.arange(1, looks + 2))
        self.runs = runs

    def at(self, look: int, ids: NDArray[np.intp]) -> NDArray[np.int64]:
        lo, hi = self.bounds[look - 1], self.bounds[look]
        row = np.full(self.runs, -1)
        row[ids] = np.arange(ids.size)
        r = row[self.run[lo:hi]]
        keep = r >= 0
        out: NDArray[np.int64] = r[keep] * self.width + self.within[lo:hi][keep]
        return out


# -- the engine on clustered telemetry, vectorised ---------------------------------------------


@dataclass(slots=True)
class Cells:
    """Cumulative counts ``cells[run, arm, segment, cluster]`` of one kind, with their sums over
    clusters (``by_segment[run, arm, segment]``) and over segments (``by_cluster[run, arm,
    cluster]``), kept up to date as counts are added."""

    cells: Array
    by_segment: Array
    by_cluster: Array

    @classmethod
    def of(cls, cells: Array) -> Cells:
        return cls(cells, cells.sum(axis=3), cells.sum(axis=2))

    def take(self, rows: NDArray[np.intp]) -> Cells:
        return Cells(self.cells[rows], self.by_segment[rows], self.by_cluster[rows])

    def add(self, counts: Array) -> None:
        """Add dense counts, same shape as ``cells``."""
        self.cells += counts
        self.by_segment += counts.sum(axis=3)
        self.by_cluster += counts.sum(axis=2)

    def add_events(self, flat: NDArray[np.int64]) -> None:
        """Add one count at each flat index of ``cells``."""
        _, _, segments, clusters = self.cells.shape
        np.add.at(self.cells.reshape(-1), flat, 1.0)
        np.add.at(self.by_segment.reshape(-1), flat // clusters, 1.0)
        np.add.at(self.by_cluster.reshape(-1), flat // (segments * clusters) * clusters
                  + flat % clusters, 1.0)


def cluster_variance(n: Array, s: Array) -> Array:
    """:func:`safeshift.stats.cluster_ratio`'s variance over the last axis (clusters),
    elementwise: G/(G-1) Σ_g (s_g - R n_g)² / N², infinite below two clusters with data."""
    with np.errstate(divide="ignore", invalid="ignore"):
        total = n.sum(axis=-1)
        ratio = s.sum(axis=-1) / total
        resid = s - ratio[..., None] * n
        ss = np.einsum("...i,...i->...", resid, resid)
        g = np.count_nonzero(n > 0, axis=-1).astype(np.float64)
        var = g / (g - 1.0) * ss / (total * total)
    out: Array = np.where((g >= 2) & (total > 0), var, np.inf)
    return out


@dataclass(slots=True)
class ClusteredVerdicts(EngineVerdicts):
    """:class:`EngineVerdicts` with the estimates (candidate - baseline) and the standard
    errors the engine used: ``diff[run, guardrail]``, ``se[run, guardrail]``, and per segment
    value ``segment_diff[run, segment, guardrail]``, ``segment_se[run, segment, guardrail]``
    (NaN for the unit-level one where it was not needed, see :func:`clustered_statuses`)."""

    diff: Array = field(default_factory=lambda: np.zeros(0))
    se: Array = field(default_factory=lambda: np.zeros(0))
    segment_diff: Array = field(default_factory=lambda: np.zeros(0))
    segment_se: Array = field(default_factory=lambda: np.zeros(0))


def clustered_statuses(spec: EngineSpec, n: Sequence[Cells], s: Sequence[Cells],
                       requests: Cells, units: Array, *, variants: Sequence[bool] = (True,),
                       watch: Sequence[int] = ()) -> list[ClusteredVerdicts]:
    """``analyse()`` for many runs at once on clustered telemetry: ``n[j]`` and ``s[j]`` are
    guardrail j's cumulative observations and events, ``requests`` the requests (the
    baseline's weigh the segments), ``units[run, arm]`` the units seen. One result per entry of
    ``variants``: ``True`` the engine on the clustered telemetry, ``False`` on the same
    telemetry without cluster ids (request-level standard errors, as before unit clusters).

    The unit-level standard error is never below the request-level one, and a larger standard
    error only moves both bounds outwards (a wider interval at an earlier time), so a segment
    that holds at the request level holds at the unit level too: its cluster-robust variance
    is computed only where the request-level verdict is harm or pass, and for the ``watch``
    segments."""
    runs, _, n_seg, _ = requests.cells.shape
    n_g = len(spec.signals)
    req_seg = requests.by_segment  # [run, arm, segment]
    # a value is judged once it has a cell: requests or observations on either arm
    present: Mask = np.asarray((req_seg > 0).any(axis=1))
    for nj in n:
        present |= (nj.by_segment > 0).any(axis=1)
    alpha_seg = segment_alpha(spec, req_seg[:, 0], present)
    # the split is by unit: units are counted, requests only while no baseline unit is seen
    req = req_seg.sum(axis=2)
    by_units = units[:, 0] > 0
    srm = _srm_mismatch(spec, np.where(by_units, units[:, 0], req[:, 0]),
                        np.where(by_units, units[:, 1], req[:, 1]))
    outs = [ClusteredVerdicts(np.empty((runs, n_g), np.int8),
                              np.full((runs, n_seg, n_g), NO_DATA, np.int8), srm,
                              np.empty((runs, n_g)), np.empty((runs, n_g)),
                              np.full((runs, n_seg, n_g), np.nan),
                              np.full((runs, n_seg, n_g), np.nan)) for _ in variants]
    watched = np.zeros((runs, n_seg), bool)
    watched[:, list(watch)] = True
    for j in range(n_g):
        nj, sj = n[j], s[j]
        n_cell, s_cell = nj.by_segment, sj.by_segment
        n_tot, s_tot = n_cell.sum(axis=2), s_cell.sum(axis=2)  # [run, arm]
        kw: dict[str, Any] = {"tol": spec.tolerances[j], "strict": spec.strict[j],
                              "n_star": spec.n_star, "alpha_pass": spec.alpha,
                              "sign": spec.signs[j]}
        glob: dict[str, Any] = {"alpha_harm": spec.alpha_global, "min_n": MIN_GLOBAL_SAMPLES}
        seg: dict[str, Any] = {"alpha_harm": alpha_seg, "min_n": spec.segment_min}
        iid = _compare_se(n_tot[:, 0], s_tot[:, 0], n_tot[:, 1], s_tot[:, 1], **glob, **kw)
        iid_seg = (_compare_se(n_cell[:, 0], s_cell[:, 0], n_cell[:, 1], s_cell[:, 1], **seg,
                               **kw) if spec.segmented[j] else None)
        for out, clustered in zip(outs, variants, strict=True):
            if clustered:
                vg = cluster_variance(nj.by_cluster, sj.by_cluster)
                out.se[:, j], out.diff[:, j], out.overall[:, j] = _compare_se(
                    n_tot[:, 0], s_tot[:, 0], n_tot[:, 1], s_tot[:, 1], **glob, **kw,
                    cluster_var=(vg[:, 0], vg[:, 1]))
            else:
                out.se[:, j], out.diff[:, j], out.overall[:, j] = iid
            if iid_seg is None:
                continue
            se_s, diff_s, codes = iid_seg
            out.segment_diff[:, :, j] = diff_s
            if not clustered:
                out.segment_se[:, :, j] = se_s
                out.segments[:, :, j] = np.where(present, codes, NO_DATA)
                continue
            codes = codes.copy()
            r, c = np.nonzero(present & (((codes == HARM) | (codes == PASS)) | watched))
            vs = cluster_variance(nj.cells[r, :, c], sj.cells[r, :, c])  # [pair, arm]
            se_k, _, codes_k = _compare_se(
                n_cell[r, 0, c], s_cell[r, 0, c], n_cell[r, 1, c], s_cell[r, 1, c],
                alpha_harm=alpha_seg[r, c], min_n=spec.segment_min, **kw,
                cluster_var=(vs[:, 0], vs[:, 1]))
            codes[r, c] = codes_k
            out.segment_se[r, c, j] = se_k
            out.segments[:, :, j] = np.where(present, codes, NO_DATA)
    return outs


def summary_from_clusters(spec: EngineSpec, countries: Sequence[str], n: Sequence[Array],
                          s: Sequence[Array], requests: Array, units: Array, *,
                          clustered: bool = True) -> Summary:
    """Telemetry cells for one run, as the store would hand them to ``analyse()``: one cell per
    (arm, country, cluster) with traffic (``n[j][arm, country, cluster]``), or per (arm,
    country) with ``clustered=False``; the units seen per arm in a cell of their own (only
    their total is read)."""
    summary = Summary()
    n_clusters = requests.shape[-1]
    for a, arm in enumerate((BASELINE, CANDIDATE)):
        for c, country in enumerate(countries):
            segment = f"{SEGMENT_ATTRIBUTE}={country}"
            if not clustered:
                req = float(requests[a, c].sum())
                obs = [(float(nj[a, c].sum()), float(sj[a, c].sum())) for nj, sj in zip(n, s,
                                                                                     strict=True)]
                if req > 0 or any(o[0] > 0 for o in obs):
                    summary.cells[(arm, "hash", segment, NO_CLUSTER)] = _cell(spec, req, obs)
                continue
            for g in range(n_clusters):
                req = float(requests[a, c, g])
                obs = [(float(nj[a, c, g]), float(sj[a, c, g])) for nj, sj in zip(n, s,
                                                                                   strict=True)]
                if req > 0 or any(o[0] > 0 for o in obs):
                    summary.cells[(arm, "hash", segment, g)] = _cell(spec, req, obs)
        u = float(units[a])
        summary.cells[(arm, "hash", "", NO_CLUSTER)] = {UNITS_SIGNAL: Moments(u, u, u)}
    return summary


def _cell(spec: EngineSpec, requests: float, obs: Sequence[tuple[float, float]]
          ) -> dict[str, Moments]:
    cell = {REQUESTS: Moments(requests, requests, requests)}
    for signal, (k, v) in zip(spec.signals, obs, strict=True):
        cell[signal] = Moments(k, v, v)
    return cell


def check_clustered(plan: Plan, spec: EngineSpec, countries: Sequence[str], n: Sequence[Array],
                    s: Sequence[Array], requests: Array, units: Array, fast: EngineVerdicts,
                    row: int, *, clustered: bool) -> int:
    """Mismatches between the vectorised verdicts of ``row`` and the real ``analyse()``."""
    summary = summary_from_clusters(spec, countries, [nj[row] for nj in n],
                                    [sj[row] for sj in s], requests[row], units[row],
                                    clustered=clustered)
    result = analyse(plan, 0, summary)
    index = {signal: j for j, signal in enumerate(spec.signals)}
    seg_index = {c: i for i, c in enumerate(countries)}
    mismatches = 0
    covered = np.zeros(fast.segments[row].shape, bool)
    for v in result.verdicts:
        j = index[v.guardrail]
        if v.segment is None:
            code = fast.overall[row, j]
        else:
            c = seg_index[v.segment.split("=", 1)[1]]
            code = fast.segments[row, c, j]
            covered[c, j] = True
        mismatches += int(STATUS_CODES[v.status] != code)
    # values without telemetry have no verdict in analyse(), and NO_DATA here
    mismatches += int(np.count_nonzero(fast.segments[row][~covered] != NO_DATA))
    srm = result.srm.mismatch if result.srm is not None else False
    return mismatches + int(srm != bool(fast.srm_mismatch[row]))


# -- the simulation ---------------------------------------------------------------------------


@dataclass(slots=True)
class ClusteredResult:
    """Outcomes per method, who caused each rollback, and the standard errors at SE_LOOK."""

    outcomes: dict[str, Outcome]
    segment_named: dict[str, Mask]
    causes: dict[str, NDArray[np.int64]]  # per run: -1, or guardrail j (global) / G + j (segment)
    cause_segment: dict[str, NDArray[np.int64]]
    diff: Array  # [run, guardrail] at SE_LOOK; the same in the watched segment
    se: dict[str, Array]  # per engine variant, as diff
    segment_diff: Array
    segment_se: dict[str, Array]
    # each run's expected observations and events per look given its population,
    # ``[run, arm, guardrail]``, globally and in the watched segment (for the ceiling)
    rate_n: Array
    rate_s: Array
    segment_rate_n: Array
    segment_rate_s: Array
    engine_checks: int = 0
    engine_mismatches: int = 0


def baseline_horizon(spec: EngineSpec, label_share: float) -> float:
    """Seconds a fixed-horizon test of the tightest guardrail would be planned for (labels
    arrive for ``label_share`` of requests)."""
    seconds = 0.0
    for signal, tol in zip(spec.signals, spec.tolerances, strict=True):
        level, per_request = (0.9, label_share) if signal == "accuracy" else (0.01, 1.0)
        per_arm = fixed_horizon_samples_per_arm(level * (1 - level), tol, alpha=0.05, power=0.8)
        seconds = max(seconds, per_arm / (RATE * per_request * min(spec.share, 1 - spec.share)))
    return math.ceil(seconds / 60.0) * 60.0


def simulate_clustered(plan: Plan, scenario: ClusteredScenario, runs: int,
                       rng: np.random.Generator, *, traffic: Traffic = Traffic(),
                       verify: int = 0, check_every: int = 1, check_first: int = 5,
                       chunk: int = CHUNK) -> ClusteredResult:
    """Run ``runs`` rollouts of ``scenario`` on clustered traffic with every method; the first
    ``verify`` runs are checked against ``analyse()`` at each of the first ``check_first``
    looks and every ``check_every``-th after."""
    parts = [_simulate_chunk(plan, scenario, min(chunk, runs - start), rng, traffic=traffic,
                             verify=verify if start == 0 else 0,
                             check=(check_first, check_every))
             for start in range(0, runs, chunk)]
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(arrays: list[Any]) -> Any:
        return np.concatenate(arrays)

    return ClusteredResult(
        outcomes={m: Outcome(cat([p.outcomes[m].code for p in parts]),
                             cat([p.outcomes[m].samples for p in parts]),
                             cat([p.outcomes[m].seconds for p in parts]))
                  for m in first.outcomes},
        segment_named={m: cat([p.segment_named[m] for p in parts]) for m in first.segment_named},
        causes={m: cat([p.causes[m] for p in parts]) for m in first.causes},
        cause_segment={m: cat([p.cause_segment[m] for p in parts]) for m in first.cause_segment},
        diff=cat([p.diff for p in parts]),
        se={m: cat([p.se[m] for p in parts]) for m in first.se},
        segment_diff=cat([p.segment_diff for p in parts]),
        segment_se={m: cat([p.segment_se[m] for p in parts]) for m in first.segment_se},
        rate_n=cat([p.rate_n for p in parts]), rate_s=cat([p.rate_s for p in parts]),
        segment_rate_n=cat([p.segment_rate_n for p in parts]),
        segment_rate_s=cat([p.segment_rate_s for p in parts]),
        engine_checks=sum(p.engine_checks for p in parts),
        engine_mismatches=sum(p.engine_mismatches for p in parts),
    )


def _simulate_chunk(plan: Plan, scenario: ClusteredScenario, runs: int,
                    rng: np.random.Generator, *, traffic: Traffic, verify: int,
                    check: tuple[int, int]) -> ClusteredResult:
    countries = [c for c, _ in scenario.countries]
    n_seg = len(countries)
    spec = EngineSpec.from_plan(plan, 0, n_seg)
    clusters = plan.analysis.unit_buckets
    n_g = len(spec.signals)
    max_looks = math.ceil(spec.max_duration / LOOK)
    horizon = baseline_horizon(spec, traffic.label_share)
    looks_per_check = max(round(60.0 / LOOK), 1)
    z_naive = NormalDist().inv_cdf(0.95)
    tolerances = np.array(spec.tolerances)
    pop = _population(rng, traffic, scenario, runs, spec.share, clusters, max_looks)
    # per-run state, compacted to the runs still undecided by some method (``ids``)
    ids = np.arange(runs)
    common, rare_rates, seen = pop.common, pop.rare, pop.seen
    rare = _Rare(rng, rare_rates, max_looks)
    n_rare = rare_rates.shape[-1]
    arm_req = np.zeros((runs, 2))
    shape = (runs, 2, n_seg, clusters)
    kinds = ("requests", "errors", "slow", "labels", "correct")
    state = {k: Cells.of(np.zeros(shape)) for k in kinds[:5 if scenario.accuracy else 3]}
    reads = {"error_rate": ("requests", "errors"), "latency_ms>250": ("requests", "slow"),
             "accuracy": ("labels", "correct")}
    # the naive, threshold and Mann-Whitney methods judge "bad events" (errors, slow requests,
    # wrong answers) per arm: cumulative and per-minute counts
    bad = np.zeros((runs, 2, n_g))
    obs = np.zeros((runs, 2, n_g))
    bad_i = np.zeros((runs, 2, n_g))
    obs_i = np.zeros((runs, 2, n_g))

    methods = {m: Outcome.empty(runs) for m in CLUSTERED_METHODS if m != "oracle"}
    engines = {"safeshift": True, "safeshift_requests": False}
    named = {m: np.zeros(runs, bool) for m in engines}
    causes = {m: np.full(runs, -1, np.int64) for m in engines}
    cause_seg = {m: np.full(runs, -1, np.int64) for m in engines}
    watch = countries.index(scenario.watched) if scenario.watched else -1
    hs = countries.index(scenario.segment) if scenario.segment else -1
    diff_at = np.full((runs, n_g), np.nan)
    se_at = {m: np.full((runs, n_g), np.nan) for m in engines}
    seg_diff_at = np.full((runs, n_g), np.nan)
    seg_se_at = {m: np.full((runs, n_g), np.nan) for m in engines}

    # the oracle: Wald's SPRT on the changed stream (errors, or wrong answers among labels),
    # request by request; H0 the baseline's rate, H1 the harmful rate
    h0 = (traffic.error, traffic.slow, traffic.wrong)[scenario.oracle_signal].mean
    sprt = _Sprt(runs, [(*_bernoulli_llr(h0, scenario.oracle_h1), 0.0, 0.0, 0.0)])
    rate = {"requests": common[..., 0] + rare_rates[..., :3].sum(axis=-1),
            "errors": rare_rates[..., 0] + rare_rates[..., 1],
            "slow": rare_rates[..., 0] + rare_rates[..., 2]}
    if scenario.accuracy:
        rate["labels"] = common[..., 1] + rare_rates[..., 3]
        rate["correct"] = common[..., 1]
    rate_n = np.stack([rate[reads[sig][0]].sum(axis=(2, 3)) for sig in spec.signals], axis=2)
    rate_s = np.stack([rate[reads[sig][1]].sum(axis=(2, 3)) for sig in spec.signals], axis=2)
    w = max(watch, 0)
    seg_n = np.stack([rate[reads[sig][0]][:, :, w].sum(axis=2) for sig in spec.signals], axis=2)
    seg_s = np.stack([rate[reads[sig][1]][:, :, w].sum(axis=2) for sig in spec.signals], axis=2)
    result = ClusteredResult(methods, named, causes, cause_seg, diff_at, se_at, seg_diff_at,
                             seg_se_at, rate_n, rate_s, seg_n, seg_s)
    se_look = round(SE_LOOK / LOOK)
    outcomes = (*methods.values(), *sprt.outcomes)

    for look in range(1, max_looks + 1):
        t = look * LOOK
        running = np.logical_or.reduce([o.running for o in outcomes])
        pending = running[ids] | (look <= se_look)
        if not pending.any():
            break
        if pending.sum() < 0.75 * ids.size:  # compact
            keep = np.flatnonzero(pending)
            ids = ids[keep]
            common, seen = common[keep], seen[keep]
            state = {k: v.take(keep) for k, v in state.items()}
            bad, obs, bad_i, obs_i = bad[keep], obs[keep], bad_i[keep], obs_i[keep]
            arm_req = arm_req[keep]
        rows = np.arange(ids.size)
        requests = state["requests"]
        before_req = arm_req.sum(axis=1)
        draw_c = rng.poisson(common)
        cell, kind = np.divmod(rare.at(look, ids), n_rare)
        arm_of = cell // (n_seg * clusters)  # run * 2 + arm
        in_seg = (cell // clusters) % n_seg == hs
        inc_req = np.ascontiguousarray(draw_c[..., 0], dtype=np.float64)
        np.add.at(inc_req.reshape(-1), cell[kind <= 2], 1.0)
        requests.add(inc_req)
        state["errors"].add_events(cell[kind <= 1])
        state["slow"].add_events(cell[(kind == 0) | (kind == 2)])

        per_arm = {"requests": inc_req.sum(axis=(2, 3)),
                   "errors": _by_arm(arm_of, kind <= 1, ids.size),
                   "slow": _by_arm(arm_of, (kind == 0) | (kind == 2), ids.size)}
        if scenario.accuracy:
            inc_lab = np.ascontiguousarray(draw_c[..., 1], dtype=np.float64)
            state["correct"].add(inc_lab)
            np.add.at(inc_lab.reshape(-1), cell[kind == 3], 1.0)
            state["labels"].add(inc_lab)
            per_arm["labels"] = inc_lab.sum(axis=(2, 3))
            per_arm["wrong"] = _by_arm(arm_of, kind == 3, ids.size)
        arm_req += per_arm["requests"]
        for j, sig in enumerate(spec.signals):
            n_key, s_key = reads[sig]
            events = per_arm["wrong"] if sig == "accuracy" else per_arm[s_key]
            obs_i[:, :, j] += per_arm[n_key]
            bad_i[:, :, j] += events
            obs[:, :, j] += per_arm[n_key]
            bad[:, :, j] += events
        total = arm_req.sum(axis=1)

        # oracle: the changed stream on each arm, in a random order within the look
        if scenario.oracle_signal == 2:
            m_stream, e_stream = per_arm["labels"], per_arm["wrong"]
        elif hs >= 0:
            m_stream = inc_req[:, :, hs].sum(axis=2)
            e_stream = _by_arm(arm_of, (kind <= 1) & in_seg, ids.size)
        else:
            m_stream, e_stream = per_arm["requests"], per_arm["errors"]
        other = np.maximum(per_arm["requests"].sum(axis=1) - m_stream.sum(axis=1), 0)
        counts = np.zeros((runs, 5), np.int64)
        counts[ids] = np.stack([e_stream[:, 1], m_stream[:, 1] - e_stream[:, 1], e_stream[:, 0],
                                m_stream[:, 0] - e_stream[:, 0], other], axis=1)
        sprt.look(rng, counts, t - LOOK, _full(runs, ids, before_req, 0.0), pad=True,
                  seconds=LOOK)

        # the engine, with and without clusters: analyse() + the controller's rule
        live = {m: methods[m].running[ids] for m in engines}
        need = (live["safeshift"] | live["safeshift_requests"] if look != se_look
                else np.ones(ids.size, bool))
        if need.any():
            sel = rows if need.mean() > 0.5 else np.flatnonzero(need)
            view = state if sel is rows else {k: v.take(sel) for k, v in state.items()}
            n_sel = [view[reads[sig][0]] for sig in spec.signals]
            s_sel = [view[reads[sig][1]] for sig in spec.signals]
            req_sel = view["requests"]
            units = seen[sel, look]
            verdicts = clustered_statuses(spec, n_sel, s_sel, req_sel, units,
                                          variants=tuple(engines.values()),
                                          watch=[watch] if watch >= 0 and look == se_look
                                          else [])
            run_ids = ids[sel]
            arms = arm_req[sel]
            for (method, clustered), v in zip(engines.items(), verdicts, strict=True):
                for row in np.flatnonzero(run_ids < verify):
                    if look > check[0] and look % check[1]:
                        continue
                    result.engine_checks += 1
                    result.engine_mismatches += check_clustered(
                        plan, spec, countries, [x.cells for x in n_sel],
                        [x.cells for x in s_sel], req_sel.cells, units, v, int(row),
                        clustered=clustered)
                if look == se_look:
                    diff_at[run_ids] = v.diff
                    se_at[method][run_ids] = v.se
                    if watch >= 0:
                        seg_diff_at[run_ids] = v.segment_diff[:, watch]
                        seg_se_at[method][run_ids] = v.segment_se[:, watch]
                out = methods[method]
                on = live[method][sel]
                harm_g = (v.overall == HARM) & on[:, None]
                harm_s = (v.segments == HARM) & on[:, None, None]
                harm = harm_g.any(axis=1) | harm_s.any(axis=(1, 2))
                pause = on & ~harm & v.srm_mismatch
                promote = (on & ~harm & ~pause & (v.overall == PASS).all(axis=1)
                           & (arms.min(axis=1) >= spec.min_samples) & (t >= spec.min_duration))
                samples = np.full(runs, np.nan)
                samples[run_ids] = arms.sum(axis=1)
                for code, cond in ((ROLLBACK, harm), (PAUSED, pause), (PROMOTE, promote)):
                    stop = np.zeros(runs, bool)
                    stop[run_ids[cond]] = True
                    out.decide(stop, code, samples, t)
                if harm.any():
                    hit = run_ids[harm]
                    if hs >= 0:
                        named[method][hit] = (v.segments[harm, hs, :] == HARM).any(axis=1)
                    g_any = harm_g[harm].any(axis=1)
                    first_g = harm_g[harm].argmax(axis=1)
                    s_flat = harm_s[harm].transpose(0, 2, 1).reshape(int(harm.sum()), -1)
                    first_s = s_flat.argmax(axis=1)
                    causes[method][hit] = np.where(g_any, first_g, n_g + first_s // n_seg)
                    cause_seg[method][hit] = np.where(g_any, -1, first_s % n_seg)
        if t >= spec.max_duration:
            for m in engines:
                methods[m].decide(np.ones(runs, bool), INCONCLUSIVE, np.nan, t)

        # naive: fixed-sample z-test of harm beyond the tolerance on the per-arm totals
        samples_all = _full(runs, ids, total)
        nv = methods["naive"]
        if nv.running.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                pb, pc = bad[:, 0] / obs[:, 0], bad[:, 1] / obs[:, 1]  # bad-event rates
                se = np.sqrt(pb * (1 - pb) / obs[:, 0] + pc * (1 - pc) / obs[:, 1])
                z = (pc - pb - tolerances) / se
            fire = np.zeros(runs, bool)
            fire[ids] = ((se > 0) & (z > z_naive)).any(axis=1)
            nv.decide(fire, ROLLBACK, samples_all, t)

        if look % looks_per_check == 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                rb = bad_i[:, 0] / obs_i[:, 0]
                rc = bad_i[:, 1] / obs_i[:, 1]
                fail = np.zeros(runs, bool)
                fail[ids] = (rc > rb + tolerances).any(axis=1)
                methods["threshold"].decide(fail, ROLLBACK, samples_all, t)
                pmw = mann_whitney_p(bad_i[:, 1], obs_i[:, 1], bad_i[:, 0], obs_i[:, 0])
                high = ((pmw < 1 - KAYENTA_CONFIDENCE) & (rc > rb)
                        & ((rb == 0) | (rc / rb > 1 + KAYENTA_TOLERANCE)))
            fail = np.zeros(runs, bool)
            fail[ids] = high.any(axis=1)
            methods["mannwhitney"].decide(fail, ROLLBACK, samples_all, t)
            bad_i[:] = 0
            obs_i[:] = 0
        if t >= horizon:
            for m in ("naive", "threshold", "mannwhitney"):
                methods[m].decide(np.ones(runs, bool), PROMOTE, samples_all, t)

    everyone = np.ones(runs, bool)
    for o in outcomes:
        o.decide(everyone, INCONCLUSIVE, np.nan, np.nan)
    methods["oracle"] = sprt.outcomes[0]
    result.outcomes = {m: methods[m] for m in CLUSTERED_METHODS}
    return result


def _by_arm(arm_of: NDArray[np.int64], mask: Mask, rows: int) -> Array:
    """Events counted per (run, arm) from their ``run * 2 + arm`` index."""
    out: Array = np.bincount(arm_of[mask], minlength=2 * rows).reshape(rows, 2).astype(
        np.float64)
    return out


def _full(runs: int, ids: NDArray[np.intp], values: Array, fill: float = np.nan) -> Array:
    """Per-run values of the compacted rows ``ids``, ``fill`` for the others."""
    out = np.full(runs, fill)
    out[ids] = values
    return out


# -- figures ---------------------------------------------------------------------------------


def se_ratio(se: Array, diff: Array, rng: np.random.Generator, boot: int = 400
             ) -> dict[str, float | None]:
    """Mean engine standard error over the Monte-Carlo standard deviation of the estimate, with
    a bootstrap 95 % interval over runs."""
    ok = np.isfinite(se) & np.isfinite(diff)
    se, diff = se[ok], diff[ok]
    if se.size < 3:
        return {"ratio": None, "lo": None, "hi": None, "mean_se": None, "true_se": None}
    true = float(np.std(diff, ddof=1))
    idx = rng.integers(0, se.size, (boot, se.size))
    ratios = se[idx].mean(axis=1) / diff[idx].std(axis=1, ddof=1)
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    return {"ratio": float(se.mean() / true), "lo": float(lo), "hi": float(hi),
            "mean_se": float(se.mean()), "true_se": true}


def ceiling(res: ClusteredResult, spec: EngineSpec, looks: int,
            segment_alpha_value: float | None = None) -> dict[str, Any]:
    """What the best single test at ``max_duration`` could do on this traffic: a one-sided
    z-test of each guardrail's difference (and, given ``segment_alpha_value``, of the watched
    segment's error rate) knowing its true standard error. Given its population a run's
    difference is normal around the population's expected difference with the requests'
    Poisson variance, so the true variance is the spread of the populations' differences plus
    the mean Poisson variance. No valid test that decides by ``max_duration`` has more power
    than this (Neyman-Pearson, normal approximation), so at alpha it bounds the promotion rate
    (every guardrail must pass; taken as independent) and the rollback rate (the best single
    test, given all of alpha); ``rollback_engine_alpha`` is the same test at the alpha the
    engine spends on it (what is left once alpha is shared)."""
    z = NormalDist().inv_cdf(1 - spec.alpha)
    nd = NormalDist()

    def one(n: Array, s: Array, j: int) -> tuple[float, float]:
        with np.errstate(divide="ignore", invalid="ignore"):
            p = s / n
            diff = p[:, 1] - p[:, 0]
            within = (p * (1 - p) / (n * looks)).sum(axis=1)
        ok = np.isfinite(diff) & np.isfinite(within)
        harm = spec.signs[j] * float(diff[ok].mean())
        return harm, math.sqrt(float(diff[ok].var(ddof=1)) + float(within[ok].mean()))

    promote, rollback, engine = 1.0, 0.0, 0.0
    per: dict[str, Any] = {}
    tests = [(signal, res.rate_n[:, :, j], res.rate_s[:, :, j], j, spec.alpha_global)
             for j, signal in enumerate(spec.signals)]
    if segment_alpha_value is not None:
        tests.append(("segment error_rate", res.segment_rate_n[:, :, 0],
                      res.segment_rate_s[:, :, 0], 0, segment_alpha_value))
    for name, n, s, j, alpha_engine in tests:
        harm, se = one(n, s, j)
        tol = spec.tolerances[j]
        passes = nd.cdf((tol - harm) / se - z)
        fires = nd.cdf((harm - tol) / se - z)
        fires_engine = nd.cdf((harm - tol) / se - nd.inv_cdf(1 - alpha_engine))
        per[name] = {"harm": harm, "se": se, "pass": passes, "rollback": fires,
                     "rollback_engine_alpha": fires_engine, "alpha_engine": alpha_engine}
        if name == "segment error_rate":
            continue
        promote *= passes
        rollback, engine = max(rollback, fires), max(engine, fires_engine)
    if "segment error_rate" in per:
        rollback = max(rollback, per["segment error_rate"]["rollback"])
        engine = max(engine, per["segment error_rate"]["rollback_engine_alpha"])
    return {"promote": promote, "rollback": rollback, "rollback_engine_alpha": engine,
            "tests": per}


def rollback_causes(res: ClusteredResult, method: str, signals: Sequence[str],
                    countries: Sequence[str]) -> dict[str, int]:
    """Rollbacks by the verdict that caused them: ``global <guardrail>`` or ``<guardrail> in
    <value>`` (the first segment verdict when no global one fired)."""
    out: dict[str, int] = {}
    n_g = len(signals)
    rolled = res.outcomes[method].code == ROLLBACK
    for cause, seg in zip(res.causes[method][rolled], res.cause_segment[method][rolled],
                          strict=True):
        key = (f"global {signals[cause]}" if cause < n_g
               else f"{signals[cause - n_g]} in {SEGMENT_ATTRIBUTE}={countries[seg]}")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))




# -- the clustered section of the benchmark ---------------------------------------------------

A_A = ("clustered_aa", "clustered_accuracy_aa", "many_segments_aa")
"""The clustered scenarios with identical models."""


def _primary(scenario: ClusteredScenario) -> str:
    return "accuracy" if scenario.accuracy else "error_rate"


def run(*, runs: int, seed: int, quick: bool, traffic: Traffic = Traffic(),
        say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every clustered scenario with every method; the JSON section ``clustered``. ``say``
    hears one line as each scenario starts."""
    started = time.perf_counter()
    section: dict[str, Any] = {
        "runs": runs, "look_seconds": LOOK, "se_look_seconds": SE_LOOK,
        "traffic": traffic.to_json(), "scenarios": [s.name for s in CLUSTERED_SCENARIOS],
        "titles": {s.name: s.title for s in CLUSTERED_SCENARIOS},
        "segments": {s.name: len(s.countries) for s in CLUSTERED_SCENARIOS},
        "guardrails": {}, "baseline_horizon_seconds": {}, "methods": {},
        "segment_named_rate": {}, "se_ratio": {}, "rollback_causes": {}, "ceiling": {},
    }
    checks = mismatches = 0
    section["runs_per_scenario"] = {}
    for index, sc in enumerate(CLUSTERED_SCENARIOS):
        plan = bench_plan(accuracy=sc.accuracy)
        spec = EngineSpec.from_plan(plan, 0, len(sc.countries))
        rng = np.random.default_rng([seed, 100 + index])
        # 50 countries cost five times the cells: half the rollouts
        n_runs = runs if len(sc.countries) <= len(COUNTRIES) else max(runs // 2, 1)
        section["runs_per_scenario"][sc.name] = n_runs
        if say is not None:
            say(f"clustered scenario {index + 1}/{len(CLUSTERED_SCENARIOS)} {sc.name}: "
                f"{n_runs:,} rollouts ({time.perf_counter() - started:.0f} s so far)")
        # every look of the first rollout; --quick: the first three and every 30th
        res = simulate_clustered(plan, sc, n_runs, rng, traffic=traffic, verify=1,
                                 check_every=30 if quick else 1, check_first=3 if quick else 1)
        checks += res.engine_checks
        mismatches += res.engine_mismatches
        countries = [c for c, _ in sc.countries]
        section["guardrails"][sc.name] = dict(zip(spec.signals, spec.tolerances, strict=True))
        section["baseline_horizon_seconds"][sc.name] = baseline_horizon(spec,
                                                                        traffic.label_share)
        for m in CLUSTERED_METHODS:
            section["methods"].setdefault(m, {})[sc.name] = figures(res.outcomes[m])
        boot = np.random.default_rng([seed, 200 + index])
        ratios: dict[str, Any] = {}
        for m in ("safeshift", "safeshift_requests"):
            r = {sig: se_ratio(res.se[m][:, j], res.diff[:, j], boot)
                 for j, sig in enumerate(spec.signals)}
            if sc.watched:
                r[f"error_rate in {SEGMENT_ATTRIBUTE}={sc.watched}"] = se_ratio(
                    res.segment_se[m][:, 0], res.segment_diff[:, 0], boot)
            ratios[m] = r
        section["se_ratio"][sc.name] = ratios
        section["rollback_causes"][sc.name] = {
            m: rollback_causes(res, m, spec.signals, countries)
            for m in ("safeshift", "safeshift_requests")}
        if sc.segment:
            section["segment_named_rate"][sc.name] = {
                m: float(np.mean(res.segment_named[m] & (res.outcomes[m].code == ROLLBACK)))
                for m in ("safeshift", "safeshift_requests")}
        seg_alpha = None
        if sc.segment:
            shares = np.array([w for _, w in sc.countries])
            seg_alpha = float(segment_alpha(spec, shares)[countries.index(sc.segment)])
        section["ceiling"][sc.name] = ceiling(res, spec, math.ceil(spec.max_duration / LOOK),
                                              seg_alpha)
    section["engine_check"] = {"looks": checks, "mismatches": mismatches}
    section["seconds"] = round(time.perf_counter() - started, 1)
    return section


def must_show(section: dict[str, Any]) -> list[tuple[str, float, bool]]:
    """The clustered properties the benchmark must show: (check, figure, met)."""
    s = section["methods"]["safeshift"]
    ratio = section["se_ratio"]
    rows: list[tuple[str, float, bool]] = []
    for name in A_A:
        rb, pr = s[name]["rollback_rate"], s[name]["promote_rate"]
        rows.append((f"{name}: false rollbacks ≤ 5% (goal ≤ 2%)", rb, rb <= 0.05))
        rows.append((f"{name}: promoted within max_duration ≥ 80%", pr, pr >= 0.80))
    for name in A_A:
        sc = next(x for x in CLUSTERED_SCENARIOS if x.name == name)
        v = ratio[name]["safeshift"][_primary(sc)]["ratio"]
        ok = v is not None and 0.9 <= v <= 1.2
        rows.append((f"{name}: engine SE / true SE of the {_primary(sc)} difference at "
                     f"{SE_LOOK / 60:.0f} min within 0.9–1.2×", math.nan if v is None else v, ok))
    for name in ("clustered_harmful", "clustered_accuracy_harmful"):
        rb, pr = s[name]["rollback_rate"], s[name]["promote_rate"]
        rows.append((f"{name}: rolled back ≥ 99%", rb, rb >= 0.99))
        rows.append((f"{name}: promoted ≤ 1%", pr, pr <= 0.01))
    rb = s["clustered_segment_harm"]["rollback_rate"]
    rows.append(("clustered_segment_harm: rolled back ≥ 95%", rb, rb >= 0.95))
    small = s["small_segment_harm"]
    named = section["segment_named_rate"]["small_segment_harm"]["safeshift"]
    rows.append((f"small_segment_harm ({SMALL_COUNTRY}, 2% of traffic, ten times the errors): "
                 f"rolled back ≥ 95%", small["rollback_rate"], small["rollback_rate"] >= 0.95))
    rows.append(("small_segment_harm: promoted ≤ 2%", small["promote_rate"],
                 small["promote_rate"] <= 0.02))
    rows.append((f"small_segment_harm: rolled back naming {SEGMENT_ATTRIBUTE}={SMALL_COUNTRY} "
                 f"≥ 95%", named, named >= 0.95))
    return rows


def render(section: dict[str, Any], console: Console) -> None:
    """The clustered scenarios' tables, as the unclustered ones, with the standard errors."""
    traffic = section["traffic"]
    per = section["runs_per_scenario"]
    console.print(
        f"clustered traffic, {per['clustered_aa']:,} rollouts per scenario "
        f"({per['many_segments_aa']:,} with 50 countries): {traffic['units']:,} "
        f"units per rollout (lognormal request rates, sigma {traffic['rate_lognormal_sigma']:g}; "
        f"error and slow rates Beta around 1% with {traffic['error_rate']['heavy_share']:.0%} "
        f"of units failing {traffic['error_rate']['heavy'][0]:.0%}–"
        f"{traffic['error_rate']['heavy'][1]:.0%}; accuracy Beta(4.5, 0.5) on "
        f"{traffic['label_share']:.0%} labelled), {section['segments']['clustered_aa']} or "
        f"{section['segments']['many_segments_aa']} countries, 64 unit clusters, a look every "
        f"{section['look_seconds']:g} s", markup=False)
    for name in section["scenarios"]:
        ratios = section["se_ratio"][name]
        primary = "accuracy" if "accuracy" in section["guardrails"][name] else "error_rate"
        table = Table(title=f"{name}: {section['titles'][name]}", box=box.SIMPLE_HEAD,
                      title_justify="left", pad_edge=False, collapse_padding=True)
        table.add_column("method", no_wrap=True)
        for col in ("rollback", "promote", "neither", "n med", "n p90", "t med", "t p90",
                    f"SE ratio ({primary}, 10 min)"):
            table.add_column(col, justify="right", no_wrap=True)
        for method in CLUSTERED_METHODS:
            f = section["methods"][method][name]
            r = ratios.get(method, {}).get(primary)
            shown = ("-" if not r or r["ratio"] is None
                     else f"{r['ratio']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]")
            table.add_row(method, f"{f['rollback_rate']:.1%}", f"{f['promote_rate']:.1%}",
                          f"{f['inconclusive_rate']:.1%}", _fmt_n(f["median_samples"]),
                          _fmt_n(f["p90_samples"]), _fmt_s(f["median_seconds"]),
                          _fmt_s(f["p90_seconds"]), shown)
        console.print(table)
        cap = section["ceiling"][name]
        causes = section["rollback_causes"][name]
        parts = [f"ceiling (one z-test at max_duration knowing the true SE): promote "
                 f"{cap['promote']:.1%}, roll back {cap['rollback']:.1%} (at the engine's alpha "
                 f"for the test {cap['rollback_engine_alpha']:.1%})"]
        for m in ("safeshift", "safeshift_requests"):
            top = ", ".join(f"{k} {v}" for k, v in list(causes[m].items())[:3])
            if top:
                parts.append(f"{m} rollbacks: {top}")
        named = section["segment_named_rate"].get(name)
        if named:
            parts.append(f"named the segment: safeshift {named['safeshift']:.1%}, "
                         f"safeshift_requests {named['safeshift_requests']:.1%}")
        for key, r in ratios["safeshift"].items():
            if key.startswith("error_rate in") and r["ratio"] is not None:
                rq = ratios["safeshift_requests"][key]
                parts.append(f"SE ratio {key}: safeshift {r['ratio']:.2f}, "
                             f"safeshift_requests {rq['ratio']:.2f}")
        console.print("; ".join(parts), markup=False)
    check = section["engine_check"]
    console.print(f"clustered: vectorised engine checked against analysis.analyse() at "
                  f"{check['looks']:,} looks: {check['mismatches']} mismatching verdicts",
                  markup=False)
