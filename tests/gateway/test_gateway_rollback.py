"""A rollback reaches every new request within a second: decided in this process (at once) or
by another process on the same store (the replica re-reads it every ``serving.refresh``)."""

from __future__ import annotations

import time

import httpx
import pytest
from gateway_helpers import make_plan, running, units_for

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.gateway import create_app
from safeshift.rollout import Rollout
from safeshift.state import Phase


def _arms(c: httpx.Client, units: list[str]) -> set[str]:
    return {c.post("/v1/endpoints/churn/predict", json={"unit": u, "inputs": {"x": 1}}
                   ).json()["arm"] for u in units}


@pytest.mark.parametrize("controller", [False, True], ids=["replica", "with-controller"])
def test_rollback_by_another_process_reaches_the_gateway_within_a_second(
        shared_store: str, controller: bool) -> None:
    plan = make_plan()
    operator = Rollout.from_plan(plan, store=shared_store)  # starts the rollout
    # a replica without a controller, or a gateway whose own controller ticks only hourly:
    # either way the decision taken elsewhere must arrive through the store
    app = create_app([plan], auth=False, store=shared_store, controller=controller, tick_interval=3600)
    cand = units_for(app, "churn", CANDIDATE, 5)
    with running(app) as url, httpx.Client(base_url=url) as c:
        assert _arms(c, cand) == {CANDIDATE}
        operator.rollback(actor="ops", reason="test")
        decided = time.monotonic()
        while _arms(c, cand[:1]) != {BASELINE}:
            assert time.monotonic() - decided < 1.0
            time.sleep(0.01)
        took = time.monotonic() - decided
        assert _arms(c, cand) == {BASELINE}
        # the replica flushes telemetry by itself, about every second
        deadline = time.monotonic() + 3
        while not operator.store.telemetry("churn-v2") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert operator.store.telemetry("churn-v2")
        ready = c.get("/readyz").json()
    assert took < 1.0
    assert ready["endpoints"]["churn"]["active"] is False
    operator.store.close()


def test_rollback_in_this_process_reaches_the_next_request(sqlite_url: str) -> None:
    app = create_app([make_plan()], auth=False, store=sqlite_url, tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    cand = units_for(app, "churn", CANDIDATE, 5)
    with running(app) as url, httpx.Client(base_url=url) as c:
        assert _arms(c, cand) == {CANDIDATE}
        rollout.rollback(actor="ops")
        assert _arms(c, cand) == {BASELINE}
        metrics = c.get("/metrics").text
    assert rollout.state().phase is Phase.ROLLED_BACK
    assert 'safeshift_traffic_share{arm="candidate",endpoint="churn"}' in metrics
