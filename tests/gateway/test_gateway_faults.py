"""Fault injection over real HTTP: the candidate raises on 20% of inputs and sleeps past its
timeout on 10%. Every request succeeds, failures get the baseline's answer, and the in-process
controller rolls the rollout back."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
from gateway_helpers import make_plan, running

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.gateway import create_app
from safeshift.state import Phase


def test_candidate_faults_never_reach_users_and_the_rollout_rolls_back(sqlite_url: str) -> None:
    plan = make_plan(
        candidate={"version": "v2",
                   "model": "fake:cand?output=2&error_rate=0.2&slow_rate=0.1&slow_ms=500"},
        stages=[{"name": "canary", "traffic": "50%", "min_duration": "1h"}],
        guardrails=[{"metric": "error_rate", "tolerance": 0.01}],
        serving={"candidate_timeout": "100ms"})
    app = create_app([plan], auth=False, store=sqlite_url, tick_interval=0.2)
    rollout = app.gateway.endpoints["churn"].rollout

    async def load(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as c:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> httpx.Response:
                async with sem:
                    return await c.post("/v1/endpoints/churn/predict",
                                        json={"unit": f"u{i}", "inputs": {"x": i}})

            return await asyncio.gather(*(one(i) for i in range(400)))

    with running(app) as url:
        start = time.perf_counter()
        responses = asyncio.run(load(url))
        elapsed = time.perf_counter() - start
        deadline = time.monotonic() + 10
        while rollout.state().phase is not Phase.ROLLED_BACK and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
        after = httpx.post(f"{url}/v1/endpoints/churn/predict",
                           json={"unit": "u1", "inputs": {"x": 1}}).json()
    assert all(r.status_code == 200 for r in responses)
    reasons: Counter[str] = Counter()
    for r in responses:
        body = r.json()
        if body["arm"] == CANDIDATE:
            assert body["outputs"] == [2] and not body["fallback"]
        else:
            assert body["outputs"] == [1] and body["version"] == "v1"
            if body["fallback"]:
                reasons[r.headers["x-safeshift-fallback"]] += 1
    assert reasons["error"] > 0 and reasons["timeout"] > 0
    assert elapsed < 30
    state = rollout.state()
    assert state.phase is Phase.ROLLED_BACK, state.reason
    assert "error rate" in state.reason or "error_rate" in state.reason
    assert after["arm"] == BASELINE and not after["fallback"]
    assert 'safeshift_decisions_total{action="rollback",endpoint="churn"} 1.0' in metrics
    assert 'safeshift_fallbacks_total{endpoint="churn",reason="timeout"}' in metrics


def test_calls_refused_by_the_open_breaker_count_as_errors_without_a_latency(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plan = make_plan(
        candidate={"version": "v2", "model": "fake:cand?error_rate=1"},
        stages=[{"name": "canary", "traffic": "100%", "min_duration": "1h"}],
        serving={"breaker_failures": 3, "breaker_window": "1m", "breaker_cooldown": "1h"})
    app = create_app([plan], auth=False, store=str(tmp_path / "s.db"), tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    with running(app) as url, httpx.Client(base_url=url) as c:
        reasons = Counter(c.post("/v1/endpoints/churn/predict",
                                 json={"unit": f"u{i}", "inputs": {"x": i}}
                                 ).headers["x-safeshift-fallback"] for i in range(20))
        app.gateway.flush_all()
    assert reasons == {"error": 3, "breaker_open": 17}
    rows = [r for r in rollout.store.telemetry(plan.rollout, 0) if r.arm == CANDIDATE]
    n = {sig: sum(r.n for r in rows if r.signal == sig) for sig in ("error_rate", "latency_ms")}
    # all 20 are the candidate's failures; only the 3 calls it made have a latency
    assert n == {"error_rate": 20, "latency_ms": 3}
