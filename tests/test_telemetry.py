"""Sufficient statistics: mergeable, exact for counts, close for quantiles."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tests.conftest import plan_dict

from safeshift import Plan
from safeshift.telemetry import (
    Aggregator,
    Histogram,
    Moments,
    SegmentKeyer,
    Summary,
    prediction_signals,
    segment_dict,
)


def test_moments_merge_equals_direct() -> None:
    rng = random.Random(2)
    values = [rng.gauss(5, 2) for _ in range(1000)]
    whole, left, right = Moments(), Moments(), Moments()
    for i, v in enumerate(values):
        whole.add(v)
        (left if i % 3 else right).add(v)
    left.merge(right)
    assert (left.n, left.s) == (whole.n, pytest.approx(whole.s))
    assert left.ss == pytest.approx(whole.ss)
    assert left.mean == pytest.approx(float(np.mean(values)))


def test_histogram_quantiles_within_bucket_resolution() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(np.log(80), 0.6, size=20_000)
    h = Histogram()
    for v in values:
        h.add(float(v))
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(float(np.quantile(values, q)), rel=0.05)
    assert h.share_above(250) == pytest.approx(float(np.mean(values > 250)), abs=0.01)
    other = Histogram()
    other.merge(h)
    other.merge(h.counts)
    assert other.total == 2 * h.total


def test_segment_keys_are_canonical_and_capped() -> None:
    keyer = SegmentKeyer(["country", "plan"], max_values=2)
    assert keyer.key({"country": "BR", "plan": "pro"}) == "country=BR|plan=pro"
    assert keyer.key({}) == "country=(none)|plan=(none)"
    keyer.key({"country": "US"})
    assert keyer.key({"country": "JP"}).startswith("country=(other)")
    assert segment_dict("country=BR|plan=a=b") == {"country": "BR", "plan": "a=b"}
    assert SegmentKeyer([]).key({"country": "BR"}) == ""


def test_aggregator_thresholds_and_drain() -> None:
    data = plan_dict(guardrails=[{"metric": "latency_ms", "above": 250, "tolerance": 0.01}])
    agg = Aggregator(Plan.from_dict(data))
    key = agg.key(0, "candidate", "hash", "country=BR", now=125.0)
    assert key.window == 120
    for latency in (100.0, 300.0, 260.0):
        agg.observe(key, {"latency_ms": latency}, hist=True)
    rows = {r.signal: r for r in agg.drain()}
    assert rows["latency_ms>250"].n == 3 and rows["latency_ms>250"].s == 2
    assert rows["latency_ms"].hist and sum(rows["latency_ms"].hist.values()) == 3
    assert agg.drain() == []
    summary = Summary.from_rows(rows.values())
    assert summary.total("candidate", "latency_ms>250", where=("country", "BR")).s == 2
    assert summary.total("candidate", "latency_ms>250", where=("country", "US")).n == 0


def test_prediction_signals() -> None:
    assert prediction_signals([1, 0], [0.95, 0.05]) == {"score_bin:9": 1.0, "score_bin:0": 1.0}
    assert prediction_signals(["cat", "dog", "cat"], None) == {"class:cat": 2.0, "class:dog": 1.0}
    assert prediction_signals([1.5, 2.5], None) == {}  # regression without scores: no bins


def test_unit_counter_counts_each_unit_once_per_stage() -> None:
    from safeshift.telemetry import UnitCounter

    counter = UnitCounter()
    assert counter.first(0, 12345) and not counter.first(0, 12345)
    assert counter.first(1, 12345)  # a new stage counts its units afresh
    assert not counter.first(0, -1)  # anonymous requests are not units
    counter.first(2, 1)  # only the two most recent stages are kept
    assert counter.first(0, 12345)
    # fixed memory, nearly exact: 200,000 distinct hashes lose about 0.3% to shared bits
    rng = random.Random(5)
    hashes = rng.sample(range(2**32), 200_000)
    fresh = UnitCounter()
    firsts = sum(fresh.first(0, h) for h in hashes)
    assert 0.994 * len(hashes) < firsts <= len(hashes)
    assert not any(fresh.first(0, h) for h in hashes[:1000])
