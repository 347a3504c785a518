"""Feedback joined to the arm that served: a delayed label moves the accuracy verdict and the
rollout rolls back; repeats are idempotent; reports count per arm; the label window ends."""

from __future__ import annotations

from collections import Counter

import httpx
from gateway_helpers import make_plan, running, units_for

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.clock import VirtualClock
from safeshift.gateway import create_app
from safeshift.state import Phase


def _verdict(rollout, metric: str) -> str:  # type: ignore[no-untyped-def]
    analysis = rollout.analysis()
    return next(v.status.value for v in analysis.verdicts
                if v.guardrail == metric and v.segment is None)


def test_delayed_labels_turn_accuracy_from_no_data_to_harm(sqlite_url: str) -> None:
    clock = VirtualClock()
    plan = make_plan(
        baseline={"version": "v1", "model": "fake:base?output=1"},
        candidate={"version": "v2", "model": "fake:cand?output=0"},
        guardrails=[{"metric": "accuracy", "tolerance": 0.05},
                    {"metric": "report_rate", "tolerance": 0.5}],
        serving={"label_window": "2h"})
    app = create_app([plan], auth=False, store=sqlite_url, clock=clock, tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    cand_unit = units_for(app, "churn", CANDIDATE, 1)[0]
    served: dict[str, str] = {}
    with running(app) as url, httpx.Client(base_url=url) as c:
        for i in range(120):
            body = c.post("/v1/endpoints/churn/predict",
                          json={"unit": f"user-{i}", "inputs": {"x": i},
                                "context": {"country": "BR"}}).json()
            served[body["id"]] = body["arm"]
        arms = Counter(served.values())
        assert arms[BASELINE] >= 35 and arms[CANDIDATE] >= 35
        app.gateway.flush_all()
        assert _verdict(rollout, "accuracy") == "no_data"  # no labels yet: nothing to judge
        assert rollout.tick() is None  # ... and no data never fails a rollout

        clock.advance(1800)  # the labels arrive half an hour later
        batch = [{"id": rid, "label": 1} for rid in served]
        r = c.post("/v1/feedback", json=batch)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert all(res["accepted"] == ["accuracy"] for res in results)
        assert {res["id"]: res["arm"] for res in results} == served  # joined to the right arm
        assert all(res["stage"] == "canary" for res in results)

        assert _verdict(rollout, "accuracy") == "harm"
        # a repeat is idempotent: reported as duplicate, counted once
        first = next(iter(served))
        again = c.post("/v1/feedback", json={"id": first, "label": 1}).json()
        assert again["accepted"] == [] and again["duplicate"] == ["accuracy"]
        rows = rollout.store.telemetry("churn-v2", 0)
        assert sum(r.n for r in rows if r.signal == "accuracy") == 120

        # a user's issue report, counted once per request against the arm that served
        cand_id = next(rid for rid, arm in served.items() if arm == CANDIDATE)
        rep = c.post("/v1/reports", json={"id": cand_id, "kind": "wrong_answer",
                                          "text": "said no"}).json()
        assert rep == {"id": cand_id, "rollout": "churn-v2", "arm": CANDIDATE,
                       "kind": "wrong_answer", "accepted": True, "duplicate": False}
        assert c.post("/v1/reports", json={"id": cand_id, "kind": "wrong_answer"}
                      ).json()["duplicate"] is True
        rows = rollout.store.telemetry("churn-v2", 0)
        reports = [r for r in rows if r.signal == "report_rate" and r.s > 0]
        assert [(r.arm, r.s) for r in reports] == [(CANDIDATE, 1.0)]
        metrics = c.get("/metrics").text
        assert 'safeshift_reports_total{arm="candidate",endpoint="churn"} 1.0' in metrics
        assert 'safeshift_feedback_total{arm="candidate",endpoint="churn",kind="label"}' in metrics

        # the in-process controller rolls back; the next request already sees it
        decision = rollout.tick()
        assert decision is not None and rollout.state().phase is Phase.ROLLED_BACK
        assert "accuracy" in decision.reason
        r = c.post("/v1/endpoints/churn/predict", json={"unit": cand_unit, "inputs": {"x": 1}})
        assert r.json()["arm"] == BASELINE and r.json()["outputs"] == [1]

        # past the label window, feedback is refused and nothing is stored
        clock.advance(3 * 3600)
        late = c.post("/v1/feedback", json={"id": cand_id, "outcome": {"revenue": 3.0}})
        assert late.status_code == 404 and "label window" in late.json()["error"]
    rows = rollout.store.telemetry("churn-v2", 0)
    assert not [r for r in rows if r.signal == "revenue"]


def test_outcomes_join_to_the_serving_arm_and_batches_span_endpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plans = [make_plan(), make_plan(rollout="fraud-v3", endpoint="fraud")]
    app = create_app(plans, auth=False, store=str(tmp_path / "s.db"), tick_interval=3600)
    churn_unit = units_for(app, "churn", CANDIDATE, 1)[0]
    with running(app) as url, httpx.Client(base_url=url) as c:
        a = c.post("/v1/endpoints/churn/predict", json={"unit": churn_unit, "inputs": {"x": 1}}
                   ).json()["id"]
        b = c.post("/v1/endpoints/fraud/predict", json={"unit": "x", "inputs": {"x": 1}}
                   ).json()["id"]
        r = c.post("/v1/feedback", json=[{"id": a, "outcome": {"revenue": 5.0}},
                                         {"id": b, "outcome": {"revenue": 2.0}, "label": 1}])
        assert r.status_code == 200
        res = r.json()["results"]
        assert [x["rollout"] for x in res] == ["churn-v2", "fraud-v3"]
        assert res[0]["accepted"] == ["revenue"] and res[0]["arm"] == CANDIDATE
        assert sorted(res[1]["accepted"]) == ["accuracy", "revenue"]
    rows = app.gateway.endpoints["churn"].rollout.store.telemetry("churn-v2", 0)
    assert [(r.arm, r.s) for r in rows if r.signal == "revenue"] == [(CANDIDATE, 5.0)]


def test_feedback_joins_requests_served_by_another_replica(shared_store: str) -> None:
    store = shared_store
    churn = create_app([make_plan()], auth=False, store=store, tick_interval=3600)
    fraud = create_app([make_plan(rollout="fraud-v3", endpoint="fraud")], auth=False, store=store,
                       tick_interval=3600)
    unit = units_for(churn, "churn", CANDIDATE, 1)[0]
    with running(churn) as a, running(fraud) as b:
        rid = httpx.post(f"{a}/v1/endpoints/churn/predict",
                         json={"unit": unit, "inputs": {"x": 1}}).json()["id"]
        churn.gateway.flush_all()  # what the replica's flush task does within a second
        r = httpx.post(f"{b}/v1/feedback", json={"id": rid, "label": 2})
    assert r.status_code == 200, r.text
    assert r.json()["rollout"] == "churn-v2" and r.json()["arm"] == CANDIDATE
    assert r.json()["accepted"] == ["accuracy"]


def test_labels_must_match_the_rows_of_the_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = create_app([make_plan()], auth=False, store=str(tmp_path / "s.db"), tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    with running(app) as url, httpx.Client(base_url=url) as c:
        two = c.post("/v1/endpoints/churn/predict",
                     json={"unit": "u1", "inputs": [{"x": 1}, {"x": 2}]}).json()["id"]
        one = c.post("/v1/endpoints/churn/predict",
                     json={"unit": "u2", "inputs": {"x": 1}}).json()["id"]
        scalar = c.post("/v1/feedback", json={"id": two, "label": 1})
        assert scalar.status_code == 409
        assert scalar.json()["field"] == "label" and "list of 2 labels" in scalar.json()["error"]
        short = c.post("/v1/feedback", json=[{"id": one, "label": 1}, {"id": two, "label": [1]}])
        assert short.status_code == 409
        assert short.json()["field"] == "[1].label" and "2 rows but 1 labels" in short.json()["error"]
        # nothing of the rejected batch was stored: the first item is still new
        ok = c.post("/v1/feedback", json=[{"id": one, "label": [1]}, {"id": two, "label": [1, 0]}])
        assert ok.status_code == 200, ok.text
        assert [r["accepted"] for r in ok.json()["results"]] == [["accuracy"], ["accuracy"]]
    accuracy = [r for r in rollout.store.telemetry("churn-v2", 0) if r.signal == "accuracy"]
    assert sum(r.n for r in accuracy) == 3  # one row + two rows, each scored once
