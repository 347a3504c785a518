"""Shadow stages: the user gets the baseline's answer at once; the candidate gets a copy off
the critical path; a full queue drops copies and counts them."""

from __future__ import annotations

import time

import httpx
from gateway_helpers import make_plan, running

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.gateway import create_app

SHADOW = [{"name": "shadow", "shadow": "100%", "min_duration": "1h"}]


def test_shadow_copies_feed_the_pairwise_comparison() -> None:
    plan = make_plan(stages=SHADOW, guardrails=[{"metric": "disagreement", "max": 0.05}],
                     candidate={"version": "v2", "model": "fake:cand?output=2&latency_ms=50"})
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600)
    ids = []
    with running(app) as url, httpx.Client(base_url=url) as c:
        for i in range(40):
            t0 = time.perf_counter()
            r = c.post("/v1/endpoints/churn/predict", json={"unit": f"u{i}", "inputs": {"x": i}})
            assert time.perf_counter() - t0 < 0.045  # never waits for the 50 ms candidate
            body = r.json()
            assert body["outputs"] == [1] and body["arm"] == BASELINE and body["stage"] == "shadow"
            ids.append(body["id"])
        # a label joins to both answers once the copy is processed (the join drains it)
        fb = c.post("/v1/feedback", json={"id": ids[-1], "label": 2}).json()
        assert fb["accepted"] == ["accuracy"] and fb["arm"] == BASELINE
        metrics = c.get("/metrics").text
    assert 'safeshift_shadow_copies_total{endpoint="churn",outcome="ok"} 40.0' in metrics
    rollout = app.gateway.endpoints["churn"].rollout
    rows = rollout.store.telemetry("churn-v2", 0)

    def total(arm: str, signal: str) -> tuple[float, float]:
        sel = [r for r in rows if r.arm == arm and r.signal == signal]
        return sum(r.n for r in sel), sum(r.s for r in sel)

    assert total(BASELINE, "requests") == (40, 40)
    assert total(CANDIDATE, "requests") == (40, 40)
    assert total(CANDIDATE, "disagreement") == (40, 40)
    assert total(CANDIDATE, "accuracy") == (1, 1) and total(BASELINE, "accuracy") == (1, 0)
    rec = rollout.store.get_request(ids[0])
    assert rec is not None and rec.outputs == {BASELINE: [1], CANDIDATE: [2]}
    analysis = rollout.analysis()
    assert analysis is not None
    verdict = next(v for v in analysis.verdicts if v.guardrail == "disagreement"
                   and v.segment is None)
    assert verdict.status.value == "harm"  # 100% disagreement against a 5% bound


def test_a_full_shadow_queue_drops_copies_and_counts_them() -> None:
    plan = make_plan(stages=SHADOW, serving={"shadow_queue": 1, "candidate_timeout": "2s"},
                     candidate={"version": "v2", "model": "fake:cand?output=2&latency_ms=300"})
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600, shadow_workers=1)
    with running(app) as url, httpx.Client(base_url=url) as c:
        start = time.perf_counter()
        for i in range(10):
            r = c.post("/v1/endpoints/churn/predict", json={"unit": f"u{i}", "inputs": {"x": i}})
            assert r.status_code == 200 and r.json()["outputs"] == [1]
        assert time.perf_counter() - start < 0.5  # ten answers while one copy takes 300 ms
        shadow = app.gateway.endpoints["churn"].shadow
        dropped = shadow.dropped
        metrics = c.get("/metrics").text
    assert dropped >= 7  # one in the worker, one queued, the rest dropped
    assert f'safeshift_shadow_copies_total{{endpoint="churn",outcome="dropped"}} {dropped:.1f}' \
        in metrics
    rows = app.gateway.endpoints["churn"].rollout.store.telemetry("churn-v2", 0)
    assert sum(r.s for r in rows if r.signal == "shadow_dropped") == dropped
