"""``safeshift bench decisions``: its vectorised engine is ``analyse()`` exactly, its
Mann-Whitney is scipy's, and a small seeded run shows the must-show properties."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as sps

from safeshift.bench import _clustered as cl
from safeshift.bench import decisions as bench
from safeshift.plan import Plan


def _plan(traffic: str = "50%", *, strict: bool = False, segments: bool = True,
          alpha: float = 0.05, expected: int | None = None, accuracy: bool = False,
          unit_buckets: int | None = None) -> Plan:
    """One canary stage with the benchmark's guardrails (and, with ``accuracy``, a feedback
    guardrail); ``unit_buckets`` for clustered telemetry."""
    stage: dict[str, Any] = {"name": "canary", "traffic": traffic, "min_samples": 500,
                             "max_duration": "1h"}
    if expected:
        stage["expected_samples"] = expected
    return Plan.from_dict({
        "rollout": "t", "endpoint": "t",
        "baseline": {"version": "v1", "model": "fake:a"},
        "candidate": {"version": "v2", "model": "fake:b"},
        "change": {"summary": "t"},
        "segments": ["country"],
        "stages": [stage],
        "guardrails": [
            {"metric": "error_rate", "tolerance": 0.002, "strict": strict},
            {"metric": "latency_ms", "above": 250, "tolerance": 0.01, "segments": segments},
            *([{"metric": "accuracy", "tolerance": 0.01}] if accuracy else []),
        ],
        "analysis": {"alpha": alpha, "segment_min_samples": 50,
                     **({"unit_buckets": unit_buckets} if unit_buckets else {})},
    })


@pytest.mark.parametrize("plan", [
    bench.bench_plan(),
    _plan("10%", strict=True, expected=30000),
    _plan("2%", segments=False, alpha=0.1),
], ids=["bench", "strict-10pct", "unsegmented-2pct"])
def test_fast_path_reproduces_analyse(plan: Plan) -> None:
    rng = np.random.default_rng(3)
    countries = [f"C{i}" for i in range(6)]
    spec = bench.EngineSpec.from_plan(plan, 0, len(countries))
    runs = 150
    share = spec.share
    # arm sizes from a handful to ~10^5 per segment, sometimes off the configured split (SRM)
    size = np.exp(rng.uniform(np.log(5), np.log(2e5), (runs, 1, len(countries))))
    skew = np.where(rng.random((runs, 1, 1)) < 0.2, rng.uniform(0.8, 1.25, (runs, 1, 1)), 1.0)
    n = np.floor(np.concatenate([size * (1 - share), size * share * skew], axis=1))
    p_b = rng.uniform(0.0, 0.05, (runs, 1, len(countries), 2))
    p_c = np.clip(p_b + rng.choice([-0.01, 0.0, 0.002, 0.005, 0.01, 0.03], p_b.shape)
                  + rng.normal(0, 0.002, p_b.shape), 0, 1)
    p = np.concatenate([p_b, p_c], axis=1)
    x = rng.binomial(n[..., None].astype(np.int64), p).astype(float)
    fast = bench.engine_statuses(spec, n, x)
    seen: set[int] = set()
    for row in range(runs):
        assert bench.check_against_analyse(plan, spec, countries, n, x, fast, row) == 0, row
        seen.update(int(c) for c in fast.overall[row])
        seen.update(int(c) for c in fast.segments[row].ravel())
    # the random inputs reach every verdict, and the SRM check both ways
    assert seen == {bench.NO_DATA, bench.HOLD, bench.PASS, bench.HARM}
    assert 0 < fast.srm_mismatch.sum() < runs


def test_mann_whitney_matches_scipy() -> None:
    rng = np.random.default_rng(9)
    for _ in range(60):
        n1, n2 = rng.integers(2, 400, 2)
        p1, p2 = rng.uniform(0, 0.3, 2)
        a = (rng.random(n1) < p1).astype(float)
        b = (rng.random(n2) < p2).astype(float)
        ours = bench.mann_whitney_p(np.array([a.sum()]), np.array([float(n1)]),
                                    np.array([b.sum()]), np.array([float(n2)]))[0]
        if np.ptp(np.concatenate([a, b])) == 0:
            assert np.isnan(ours)
            continue
        ref = sps.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


PRINTED: dict[str, str] = {}  # what the quick run printed


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    out = tmp_path_factory.mktemp("bench")
    json_path, png = out / "decisions.json", out / "decisions.png"
    text = io.StringIO()
    console = Console(file=text, width=120)
    result = bench.main(quick=True, runs=200, json_path=json_path, plot_path=png, seed=11,
                        console=console)
    PRINTED["quick"] = text.getvalue()
    return result, json_path, png


def test_quick_run_says_which_scenario_it_is_on(quick: tuple[dict[str, Any], Path, Path]) -> None:
    lines = [x for x in PRINTED["quick"].splitlines() if x.startswith("  ... ")]
    assert len(lines) == len(bench.SCENARIOS) + len(quick[0]["clustered"]["scenarios"])
    assert lines[0].startswith(f"  ... scenario 1/{len(bench.SCENARIOS)} ")
    assert "clustered scenario 1/" in lines[len(bench.SCENARIOS)]


def test_quick_run_shows_the_must_show_properties(
        quick: tuple[dict[str, Any], Path, Path]) -> None:
    result, _, _ = quick
    s = result["methods"]["safeshift"]
    # A/A: at most alpha false rollbacks, and it promotes within the plan's max_duration
    assert s["aa"]["rollback_rate"] <= 0.05
    assert s["aa"]["promote_rate"] >= 0.80
    # peeking methods roll back identical models far more often
    for method in ("naive", "threshold", "mannwhitney"):
        assert result["methods"][method]["aa"]["rollback_rate"] > s["aa"]["rollback_rate"] + 0.03
    # a harmful change is caught, a change within the tolerance is not rolled back
    assert s["harmful"]["rollback_rate"] >= 0.97
    assert s["harmful"]["promote_rate"] <= 0.02
    assert s["latency"]["rollback_rate"] >= 0.97
    assert s["within_tolerance"]["rollback_rate"] <= 0.05
    # the worst case of both guarantees: exactly at the tolerance, neither is warranted
    assert s["at_tolerance"]["rollback_rate"] <= 0.05
    assert s["at_tolerance"]["promote_rate"] <= 0.05
    assert result["methods"]["naive"]["at_tolerance"]["rollback_rate"] > 0.2
    # segment-local harm: rolled back, naming the segment
    assert s["segment_harm"]["rollback_rate"] >= 0.95
    assert result["segment_named_rate"]["segment_harm"] >= 0.93
    # the vectorised engine agreed with analyse() wherever it was checked
    assert result["engine_check"]["looks"] > 100
    assert result["engine_check"]["mismatches"] == 0


def test_quick_run_harm_detection_cost_does_not_regress(
        quick: tuple[dict[str, Any], Path, Path]) -> None:
    """The issue's target (<= 2.5x the oracle SPRT) is below what any test with safeshift's
    guarantee can reach (see the next test and docs/decisions.md). This guards the measured
    cost instead (quick run: 7.4x; full run: 8.6x) so that a change that slows harm detection
    fails."""
    result, _, _ = quick
    m = result["methods"]
    ratio = (m["safeshift"]["harmful"]["median_rollback_samples"]
             / m["oracle"]["harmful"]["median_rollback_samples"])
    assert ratio <= 10.0


def test_quick_run_lower_bound_is_above_the_target_and_below_safeshift(
        quick: tuple[dict[str, Any], Path, Path]) -> None:
    """The SPRT at the least favourable null point averages the fewest samples of any test
    that keeps false rollbacks <= alpha for every candidate within the tolerance: it already
    needs more than 2.5x the oracle, and safeshift (a valid test) cannot average fewer."""
    result = quick[0]
    bound = result["harm_lower_bound"]
    # Wald's bound holds for every test: the SPRT comes close to it, safeshift stays above it
    assert bound["wald_bound_vs_oracle_mean"] > bench.ORACLE_RATIO_TARGET
    assert 0.9 * bound["wald_mean_bound"] <= bound["mean_samples"] <= 1.3 * bound["wald_mean_bound"]
    assert result["methods"]["safeshift"]["harmful"]["mean_rollback_samples"] > bound["wald_mean_bound"]
    assert bound["bound_vs_oracle_median"] > bench.ORACLE_RATIO_TARGET
    assert 1.0 < bound["safeshift_vs_bound_mean"] < 3.0


def test_wald_bound_matches_its_formula() -> None:
    # no tolerance, known rates: E[N] >= (0.95 ln 19 - 0.05 ln 19) / KL with KL at q = 1.5 %
    q = bench.least_favourable_null(0.01, 0.02, 0.0, 0.5)
    kl = 0.5 * (0.02 * np.log(0.02 / q) + 0.98 * np.log(0.98 / (1 - q))) \
        + 0.5 * (0.01 * np.log(0.01 / q) + 0.99 * np.log(0.99 / (1 - q)))
    assert bench.wald_asn_bound(0.01, 0.02, 0.0, 0.5) == pytest.approx(0.9 * np.log(19) / kl)
    # a tolerance moves the null closer to the truth: more samples
    assert bench.wald_asn_bound(0.01, 0.02, 0.002, 0.5) > bench.wald_asn_bound(0.01, 0.02, 0.0, 0.5)


def test_least_favourable_null_minimises_the_divergence() -> None:
    q = bench.least_favourable_null(0.01, 0.02, 0.002, 0.5)
    grid = np.linspace(0.005, 0.02, 30001)

    def kl(p: float, r: np.ndarray) -> np.ndarray:
        out: np.ndarray = p * np.log(p / r) + (1 - p) * np.log((1 - p) / (1 - r))
        return out

    divergence = 0.5 * kl(0.02, grid + 0.002) + 0.5 * kl(0.01, grid)
    assert q == pytest.approx(grid[divergence.argmin()], abs=1e-6)
    # between the truth's rates: the null point shifts the baseline up, the candidate down
    assert 0.01 < q < q + 0.002 < 0.02
    # the larger arm pins its own rate: a small candidate share keeps q near the baseline's
    assert 0.01 < bench.least_favourable_null(0.01, 0.02, 0.002, 0.1) < q
    assert bench.least_favourable_null(0.01, 0.02, 0.002, 0.9) + 0.002 > q + 0.002


def test_quick_run_breakdown_explains_the_cost(quick: tuple[dict[str, Any], Path, Path]) -> None:
    result, _, _ = quick
    steps = [row["median_samples"] for row in result["harm_cost_breakdown"]]
    # each guarantee costs samples; the last step is safeshift's own global verdict
    assert steps == sorted(steps)
    assert steps[-2] == steps[-1]


def test_quick_run_writes_json_and_png(quick: tuple[dict[str, Any], Path, Path]) -> None:
    _, json_path, png = quick
    data = json.loads(json_path.read_text())
    assert data["runs"] == 200
    assert set(data["methods"]) == set(bench.METHODS)
    for method in bench.METHODS:
        assert set(data["methods"][method]) == {"aa", "harmful", "within_tolerance",
                                                "segment_harm", "latency", "at_tolerance"}
        for cell in data["methods"][method].values():
            assert {"rollback_rate", "promote_rate", "median_samples", "p90_samples"} <= set(cell)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_figures() -> None:
    plan = bench.bench_plan()
    scenario = bench.SCENARIOS[1]
    a = bench.simulate(plan, scenario, 40, np.random.default_rng(1))
    b = bench.simulate(plan, scenario, 40, np.random.default_rng(1))
    for method in bench.METHODS:
        assert np.array_equal(a.outcomes[method].code, b.outcomes[method].code)
        assert np.array_equal(a.outcomes[method].samples, b.outcomes[method].samples,
                              equal_nan=True)


# -- clustered traffic ------------------------------------------------------------------------


def test_segment_alpha_is_analyse_s_segment_weights() -> None:
    """The vectorised segment alpha is ``analysis.segment_weights`` spent as analyse() does."""
    from safeshift.analysis import segment_weights

    plan = bench.bench_plan()
    spec = bench.EngineSpec.from_plan(plan, 0, 6)
    rng = np.random.default_rng(4)
    requests = np.floor(rng.exponential(500, (40, 6)) * (rng.random((40, 6)) < 0.8))
    present = rng.random((40, 6)) < 0.9
    fast = bench.segment_alpha(spec, requests, present)
    for row in range(40):
        values = {("country", f"C{i}"): requests[row, i] for i in range(6) if present[row, i]}
        weights = segment_weights(values)
        for i in range(6):
            if present[row, i]:
                assert fast[row, i] == (0.05 / 2) * weights[("country", f"C{i}")] / 2
            else:
                assert np.isnan(fast[row, i])


def test_cluster_variance_is_cluster_ratio_s() -> None:
    from safeshift.stats import cluster_ratio

    rng = np.random.default_rng(8)
    n = np.floor(rng.exponential(20, (300, 16)) * (rng.random((300, 16)) < 0.5))
    s = np.floor(n * rng.uniform(0, 0.3, n.shape))
    fast = cl.cluster_variance(n, s)
    for row in range(300):
        _, var, groups = cluster_ratio(n[row].tolist(), s[row].tolist())
        if groups < 2:
            assert fast[row] == np.inf
        else:
            assert fast[row] == pytest.approx(var, rel=1e-12)


@pytest.mark.parametrize("accuracy,strict", [(False, False), (True, True)],
                         ids=["rates", "accuracy-strict"])
def test_clustered_fast_path_reproduces_analyse(accuracy: bool, strict: bool) -> None:
    """Random clustered telemetry — clusters with and without data, values missing, arms off
    their split, effects in both directions — gives analyse()'s verdicts, with and without
    the cluster ids."""
    plan = _plan("20%", strict=strict, accuracy=accuracy, unit_buckets=16)
    rng = np.random.default_rng(12 if accuracy else 13)
    countries = [f"C{i}" for i in range(5)]
    spec = bench.EngineSpec.from_plan(plan, 0, len(countries))
    runs, clusters = 120, plan.analysis.unit_buckets
    shape = (runs, 2, len(countries), clusters)
    size = np.exp(rng.uniform(np.log(0.5), np.log(3000), (runs, 1, len(countries), 1)))
    sparse = rng.random(shape) < rng.uniform(0.05, 1.0, (runs, 1, 1, 1))
    absent = rng.random((runs, 1, len(countries), 1)) < 0.1
    requests = np.floor(rng.exponential(1.0, shape) * size * sparse * ~absent)
    n, s = [], []
    for j, _ in enumerate(spec.signals):
        base = rng.uniform(0.0, 0.05, (runs, 1, len(countries), 1))
        # per-cluster propensities (clustering), and a candidate shift of either sign
        p = np.clip(base * rng.gamma(0.5, 2.0, shape)
                    + np.array([0.0, 1.0])[None, :, None, None]
                    * rng.choice([-0.01, 0.0, 0.003, 0.01, 0.04], (runs, 1, 1, 1)), 0, 1)
        obs = requests if j < 2 else np.floor(requests * 0.4)
        if j == 2:  # accuracy: correct answers, lower is worse
            p = 1 - p
        n.append(bench_cells(obs))
        s.append(bench_cells(rng.binomial(obs.astype(np.int64), p).astype(float)))
    units = np.floor(requests.sum(axis=(2, 3)) * rng.uniform(0.2, 0.4, (runs, 1))
                     * np.where(rng.random((runs, 1)) < 0.2, [[1.0, 1.3]], [[1.0, 1.0]]))
    seen: set[int] = set()
    for v, clustered in zip(cl.clustered_statuses(spec, n, s, bench_cells(requests), units,
                                                  variants=(True, False)), (True, False),
                            strict=True):
        for row in range(runs):
            assert cl.check_clustered(plan, spec, countries, [x.cells for x in n],
                                      [x.cells for x in s], requests, units, v, row,
                                      clustered=clustered) == 0, (row, clustered)
            seen.update(int(c) for c in v.overall[row])
            seen.update(int(c) for c in v.segments[row].ravel())
    assert seen == {bench.NO_DATA, bench.HOLD, bench.PASS, bench.HARM}


def bench_cells(a: np.ndarray) -> cl.Cells:
    return cl.Cells.of(np.asarray(a, dtype=float))


def test_harm_multiplier_moves_the_mean_by_its_factor() -> None:
    rng = np.random.default_rng(2)
    traffic = cl.Traffic()
    for prop, factor in ((traffic.error, 2.0), (traffic.error, 10.0), (traffic.wrong, 1.3)):
        p = prop.draw(rng, (400_000,))
        assert p.mean() == pytest.approx(prop.mean, rel=0.03)
        c = prop.multiplier(factor)
        assert prop.capped_mean(c) == pytest.approx(factor * prop.mean, rel=1e-9)
        assert np.minimum(c * p, 1).mean() == pytest.approx(factor * prop.mean, rel=0.03)


def test_quick_run_clustered_properties(quick: tuple[dict[str, Any], Path, Path]) -> None:
    """On clustered traffic the unit-level engine keeps false rollbacks down where the
    request-level one does not, and its standard error matches the Monte-Carlo one."""
    c = quick[0]["clustered"]
    s, r = c["methods"]["safeshift"], c["methods"]["safeshift_requests"]
    for name in cl.A_A:
        assert s[name]["rollback_rate"] <= 0.05, name
        assert r[name]["rollback_rate"] >= s[name]["rollback_rate"] + 0.10, name
    for name in ("clustered_harmful", "clustered_accuracy_harmful", "clustered_segment_harm"):
        assert s[name]["promote_rate"] <= 0.01, name
        assert s[name]["rollback_rate"] >= 0.3, name
    # the engine's standard error against the Monte-Carlo one at 10 minutes (100 rollouts; 50
    # with 50 countries, hence the wider band), and the request-level one well below it
    ratio = c["se_ratio"]
    for name, signal, lo, hi, requests in (("clustered_aa", "error_rate", 0.85, 1.25, 0.8),
                                           ("clustered_accuracy_aa", "accuracy", 0.85, 1.25, 0.9),
                                           ("many_segments_aa", "error_rate", 0.75, 1.3, 0.8)):
        assert lo <= ratio[name]["safeshift"][signal]["ratio"] <= hi, name
        assert ratio[name]["safeshift_requests"][signal]["ratio"] <= requests, name
    # no valid test promotes much on this traffic: the ceiling says so
    assert c["ceiling"]["clustered_aa"]["promote"] < 0.6
    assert c["engine_check"]["looks"] > 50
    assert c["engine_check"]["mismatches"] == 0


def test_quick_run_writes_the_clustered_section(quick: tuple[dict[str, Any], Path, Path]) -> None:
    _, json_path, _ = quick
    data = json.loads(json_path.read_text())["clustered"]
    names = [sc.name for sc in cl.CLUSTERED_SCENARIOS]
    assert data["scenarios"] == names
    assert set(data["methods"]) == set(cl.CLUSTERED_METHODS)
    for method in cl.CLUSTERED_METHODS:
        assert set(data["methods"][method]) == set(names)
    assert set(data["se_ratio"]) == set(names) == set(data["ceiling"])
    checks = [row["check"] for row in json.loads(json_path.read_text())["must_show"]]
    assert any(check.startswith("clustered_aa: false rollbacks") for check in checks)
