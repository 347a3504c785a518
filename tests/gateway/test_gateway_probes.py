"""Probes through a real gateway: its controller task sends them to the candidate on their
schedule, the users never see them, and a failing probe rolls back while users keep getting
answers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from gateway_helpers import make_plan, running, units_for

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.gateway import create_app
from safeshift.state import Phase


def test_a_failing_probe_rolls_back_the_served_candidate(tmp_path: Path) -> None:
    # the candidate answers 2 where the golden input's answer is 1
    plan = make_plan(probes=[{"name": "golden", "inputs": [{"x": 1}], "expect": [1],
                              "every": "200ms"}])
    app = create_app([plan], auth=False, store=f"sqlite:///{tmp_path / 's.db'}",
                     tick_interval=0.2)
    rollout = app.gateway.endpoints["churn"].rollout
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        units = units_for(app, "churn", CANDIDATE, 5)
        deadline = time.monotonic() + 20
        answers = []
        while rollout.state().phase is not Phase.ROLLED_BACK and time.monotonic() < deadline:
            for u in units:
                r = c.post("/v1/endpoints/churn/predict", json={"unit": u, "inputs": {"x": 1}})
                assert r.status_code == 200
                answers.append(r.json()["arm"])
            time.sleep(0.05)
        assert rollout.state().phase is Phase.ROLLED_BACK
        decision = rollout.decisions()[-1]
        assert "probe golden" in decision.reason and "failed" in decision.reason
        assert {c.post("/v1/endpoints/churn/predict", json={"unit": u, "inputs": {"x": 1}}
                       ).json()["arm"] for u in units} == {BASELINE}
        # the probe calls are not requests: every candidate request counted was a user's
        app.gateway.flush_all()  # what the flush task has not written yet
        counted = sum(r.n for r in rollout.store.telemetry("churn-v2", 0)
                      if r.arm == CANDIDATE and r.signal == "requests")
        assert counted == answers.count(CANDIDATE)
