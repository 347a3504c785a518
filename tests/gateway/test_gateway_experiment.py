"""An experiment stage: the candidate and a challenger share the candidate traffic; each is
served by its own model, with its own breaker, and counted under its own arm."""

from __future__ import annotations

from collections import Counter

import httpx
from gateway_helpers import make_plan, running

from safeshift.gateway import create_app


def test_challengers_are_served_and_protected_separately() -> None:
    plan = make_plan(
        challengers=[{"name": "bold", "version": "v3", "model": "fake:bold?output=3"}],
        stages=[{"name": "bakeoff", "traffic": "99%", "min_duration": "1h",
                 "experiment": {"objective": "accuracy"}}],
        guardrails=[{"metric": "error_rate", "tolerance": 0.01}])
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600)
    ep = app.gateway.endpoints["churn"]
    assert set(ep.candidates) == {"candidate", "bold"}
    with running(app) as url, httpx.Client(base_url=url) as c:
        answers = Counter()
        for i in range(200):
            body = c.post("/v1/endpoints/churn/predict",
                          json={"unit": f"u{i}", "inputs": {"x": 1}}).json()
            answers[(body["version"], body["outputs"][0])] += 1
        metrics = c.get("/metrics").text
    # each variant answers with its own model (1% of units stay on the baseline)
    assert set(answers) <= {("v1", 1), ("v2", 2), ("v3", 3)}
    assert answers[("v2", 2)] > 50 and answers[("v3", 3)] > 50
    assert 'safeshift_breaker_state{endpoint="churn",variant="bold"} 0.0' in metrics
    rows = ep.rollout.store.telemetry("churn-v2", 0)
    arms = {r.arm for r in rows if r.signal == "requests"}
    assert {"candidate", "bold"} <= arms <= {"baseline", "candidate", "bold"}
