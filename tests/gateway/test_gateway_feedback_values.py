"""Feedback values the statistics could not survive — non-finite, or outside the metric's range —
are refused naming the field, over HTTP and in Python alike, and nothing of the batch is
stored: one 1e308 cannot freeze a guardrail."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, running

from safeshift import MemoryStore
from safeshift.clock import VirtualClock
from safeshift.feedback import check_feedback_values
from safeshift.gateway import create_app
from safeshift.plan import OUTCOME_LIMIT
from safeshift.rollout import Rollout

P = "/v1/endpoints/churn/predict"
F = "/v1/feedback"
REVENUE = {"metric": "revenue", "source": "feedback", "direction": "decrease", "tolerance": 1.0}


def _serve(c: httpx.Client, n: int) -> list[str]:
    return [c.post(P, json={"unit": f"u{i}", "inputs": {"x": i}}).json()["id"] for i in range(n)]


@pytest.mark.parametrize(("item", "field", "words"), [
    ({"outcome": {"revenue": 1e308}}, "outcome.revenue", "outside [-1e+09, 1e+09]"),
    ({"outcome": {"revenue": -2e9}}, "outcome.revenue", "larger unit"),
    ({"outcome": {"accuracy": 1.5}}, "outcome.accuracy", "between 0 and 1"),
    ({"outcome": {"error_rate": -0.1}}, "outcome.error_rate", "[0, 1]"),
    ({"outcome": {"revenue": 10**12}}, "outcome.revenue", "outside"),
])
def test_out_of_range_outcomes_are_a_422_naming_the_field(item: dict[str, Any], field: str,
                                                          words: str) -> None:
    app = create_app([make_plan(guardrails=[REVENUE])], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        rid = _serve(c, 1)[0]
        r = c.post(F, json={"id": rid, **item})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field and words in r.json()["error"]
        # in a batch the item is named, and the valid item before it is not stored either
        r = c.post(F, json=[{"id": rid, "label": 1}, {"id": rid, **item}])
        assert r.status_code == 422 and r.json()["field"] == f"[1].{field}"
        ok = c.post(F, json={"id": rid, "label": 1}).json()
        assert ok["accepted"] == ["accuracy"]


def test_in_range_values_are_accepted() -> None:
    app = create_app([make_plan(guardrails=[REVENUE])], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        rid = _serve(c, 1)[0]
        r = c.post(F, json={"id": rid, "outcome": {"revenue": OUTCOME_LIMIT, "accuracy": 1,
                                                   "spend": -OUTCOME_LIMIT}})
        assert r.status_code == 200, r.text
        assert sorted(r.json()["accepted"]) == ["accuracy", "revenue", "spend"]


def test_a_huge_outcome_cannot_freeze_the_guardrail() -> None:
    clock = VirtualClock()
    plan = make_plan(guardrails=[REVENUE], stages=[{"name": "canary", "traffic": "50%",
                                                    "min_duration": "1h"}])
    app = create_app([plan], auth=False, store="memory://", clock=clock, tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    with running(app) as url, httpx.Client(base_url=url) as c:
        ids = _serve(c, 200)
        bad = c.post(F, json=[{"id": ids[0], "outcome": {"revenue": 1e308}}])
        assert bad.status_code == 422
        batch = [{"id": rid, "outcome": {"revenue": 10.0 + i % 3}} for i, rid in enumerate(ids)]
        assert c.post(F, json=batch).status_code == 200
    verdict = next(v for v in rollout.analysis().verdicts
                   if v.guardrail == "revenue" and v.segment is None)
    assert verdict.n_baseline > 0 and verdict.n_candidate > 0
    assert all(math.isfinite(x) for x in (verdict.lower, verdict.upper, verdict.mean_baseline,
                                          verdict.mean_candidate))


def test_labels_are_bounded_where_abs_error_scores_them() -> None:
    plan = make_plan(guardrails=[{"metric": "abs_error", "tolerance": 0.5}])
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        rid, two = _serve(c, 1)[0], c.post(P, json={"inputs": [{"x": 1}, {"x": 2}]}).json()["id"]
        r = c.post(F, json={"id": rid, "label": 1e12})
        assert r.status_code == 422 and r.json()["field"] == "label"
        assert "abs_error" in r.json()["error"]
        r = c.post(F, json=[{"id": rid, "label": 1}, {"id": two, "label": [1, -1e300]}])
        assert r.status_code == 422 and r.json()["field"] == "[1].label[1]"
        assert c.post(F, json={"id": rid, "label": 3}).json()["accepted"] == ["accuracy",
                                                                              "abs_error"]
    plain = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    with running(plain) as url, httpx.Client(base_url=url) as c:
        rid = _serve(c, 1)[0]  # without abs_error a large label is a class like any other
        assert c.post(F, json={"id": rid, "label": 10**15}).status_code == 200


def test_huge_integers_are_refused_however_they_are_written() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        rid = _serve(c, 1)[0]
        for body in (b'{"id": "%s", "outcome": {"revenue": 1%s}}', b'{"id": "%s", "label": 1%s}'):
            r = c.post(F, content=body % (rid.encode(), b"0" * 400))
            assert r.status_code == 422, r.text


def test_python_api_raises_naming_the_item_and_the_field() -> None:
    store = MemoryStore()
    rollout = Rollout.from_plan(make_plan(guardrails=[REVENUE]), store=store,
                                clock=VirtualClock())
    rid = rollout.predict({"x": 1}, unit="u1").id
    rollout.flush()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"outcome": {"revenue": 1e308}}, r"item 0: outcome.revenue: 1e\+308 is outside"),
        ({"outcome": {"revenue": float("nan")}}, "item 0: outcome.revenue: nan is not a finite number"),
        ({"outcome": {"revenue": "12.5"}}, "item 0: outcome.revenue: outcome values must be "
                                           "numbers"),
        ({"label": float("inf")}, "item 0: label: inf is not a finite label"),
        ({"label": [1, float("nan")]}, r"item 0: label\[1\]: nan"),
        ({"label": 10**400}, "item 0: label: "),
    ]
    for item, message in cases:
        with pytest.raises(ValueError, match=message):
            rollout.feedback(rid, **item)
    with pytest.raises(ValueError, match=r"item 1: outcome.revenue"):
        rollout.feedback_many([{"id": rid, "label": 1},
                               {"id": rid, "outcome": {"revenue": -1e10}}])
    assert rollout.feedback(rid, label=1).accepted == ["accuracy"]  # nothing was stored before
    assert rollout.feedback(rid, outcome={"revenue": 12.5}).accepted == ["revenue"]


@pytest.mark.parametrize(("label", "outcome", "limit", "expected"), [
    (None, {"x": 1}, None, None),
    ("cat", None, None, None),
    ([True, "a", 3], None, None, None),
    ([[1, 2], [3, float("nan")]], None, None, "label[1][1]"),
    (2e9, None, 1e9, "label"),
    (2e9, None, None, None),
    (None, {"report_rate": 2}, None, "outcome.report_rate"),
    (None, {"revenue": True}, None, "outcome.revenue"),
    (None, [1], None, "outcome"),
])
def test_check_feedback_values(label: Any, outcome: Any, limit: float | None,
                               expected: str | None) -> None:
    problem = check_feedback_values(label, outcome, label_limit=limit)
    assert (problem[0] if problem else None) == expected


def test_a_declared_range_bounds_an_outcome_over_http_and_in_python() -> None:
    """``range: [0, 500]`` on a guardrail: 501 is refused naming the field and the range, in a
    batch nothing is stored; values inside the range are counted."""
    ranged = {**REVENUE, "range": [0, 500]}
    app = create_app([make_plan(guardrails=[ranged])], auth=False, store="memory://", tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    with running(app) as url, httpx.Client(base_url=url) as c:
        ids = _serve(c, 2)
        r = c.post(F, json=[{"id": ids[0], "outcome": {"revenue": 20}},
                            {"id": ids[1], "outcome": {"revenue": 501}}])
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "[1].outcome.revenue"
        assert "outside [0, 500]" in r.json()["error"]
        assert "the plan's guardrail declares this range" in r.json()["error"]
        assert c.post(F, json={"id": ids[0], "outcome": {"revenue": -1}}).status_code == 422
        # an outcome the plan gives no range keeps the default limit
        ok = c.post(F, json={"id": ids[0], "outcome": {"revenue": 500, "spend": 1e6}})
        assert ok.status_code == 200 and sorted(ok.json()["accepted"]) == ["revenue", "spend"]
    assert rollout.joiner.feedback_problem(None, {"revenue": 500.5}) == (
        "outcome.revenue", "500.5 is outside [0, 500], the range of 'revenue': send a number in "
        "that range (the plan's guardrail declares this range)")
    assert rollout.joiner.feedback_problem(None, {"revenue": 0}) is None
    with pytest.raises(ValueError, match=r"outcome.revenue: 900 is outside \[0, 500\]"):
        rollout.feedback(ids[1], outcome={"revenue": 900})
