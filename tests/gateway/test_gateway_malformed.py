"""Malformed input on every endpoint: a 4xx JSON error naming the field, and nothing stored."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, running, units_for

from safeshift import ops
from safeshift.assign import CANDIDATE
from safeshift.auth import Role
from safeshift.clock import SystemClock
from safeshift.gateway import create_app
from safeshift.store import MemoryStore

P = "/v1/endpoints/churn/predict"
INF = "/v2/models/churn/infer"
F = "/v1/feedback"
R = "/v1/reports"
TENSOR = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}

CASES: list[tuple[str, Any, int, str | None]] = [
    # predict
    (P, b"", 422, "body"),
    (P, b"{not json", 422, "body"),
    (P, b"[1, 2]", 422, "body"),
    (P, {"unit": "u"}, 422, "inputs"),
    (P, {"inputs": 3}, 422, "inputs"),
    (P, {"inputs": []}, 422, "inputs"),
    (P, {"inputs": [None]}, 422, "inputs[0]"),
    (P, {"inputs": {"x": 1}, "unit": ["a"]}, 422, "unit"),
    (P, {"inputs": {"x": 1}, "context": "BR"}, 422, "context"),
    (P, {"inputs": {"x": 1}, "context": {"country": {"a": 1}}}, 422, "context.country"),
    (P, {"inputs": {"x": 1}, "id": ""}, 422, "id"),
    (P, {"inputs": {"x": 1}, "id": "x" * 129}, 422, "id"),
    (P, {"inputs": {"x": 1}, "input": {"x": 1}}, 422, "input"),
    ("/v1/endpoints/nope/predict", {"inputs": {"x": 1}}, 404, "name"),
    # infer (Open Inference Protocol)
    (INF, b"", 422, "body"),
    (INF, b"{oops", 422, "body"),
    (INF, {"inputs": []}, 422, "inputs"),
    (INF, {"inputs": [{**TENSOR, "datatype": "FP128"}]}, 422, "inputs[0].datatype"),
    (INF, {"inputs": [{**TENSOR, "shape": [2]}]}, 422, "inputs[0].data"),
    (INF, {"inputs": [{**TENSOR, "shape": "1"}]}, 422, "inputs[0].shape"),
    (INF, {"inputs": [{**TENSOR, "data": ["a"]}]}, 422, "inputs[0].data"),
    (INF, {"inputs": [{k: v for k, v in TENSOR.items() if k != "data"}]}, 422, "inputs[0].data"),
    (INF, {"inputs": [TENSOR], "parameters": {"context": 5}}, 422, "parameters.context"),
    (INF, {"inputs": [TENSOR], "outputs": [{"name": "nope"}]}, 400, "outputs[0].name"),
    (INF, {"inputs": [TENSOR, {**TENSOR, "name": "y", "shape": [2], "data": [1, 2]}]}, 422,
     "inputs[1].shape"),
    ("/v2/models/nope/infer", {"inputs": [TENSOR]}, 404, "name"),
    # feedback
    (F, b"", 422, "body"),
    (F, b"{", 422, "body"),
    (F, b"7", 422, "body"),
    (F, {"label": 1}, 422, "id"),
    (F, {"id": "r1"}, 422, "label"),
    (F, {"id": "r1", "outcome": {"revenue": "lots"}}, 422, "outcome.revenue"),
    (F, {"id": "r1", "outcome": {"Bad Name": 1}}, 422, "outcome.Bad Name"),
    (F, {"id": "r1", "label": 1, "extra": 1}, 422, "extra"),
    (F, [], 422, "body"),
    (F, [{"id": "r1", "label": 1}, {"id": "r2"}], 422, "[1].label"),
    (F, {"id": "never-served", "label": 1}, 404, "id"),
    # reports
    (R, b"", 422, "body"),
    (R, {"id": "r1"}, 422, "kind"),
    (R, {"id": "r1", "kind": ""}, 422, "kind"),
    (R, {"id": "r1", "kind": "bad", "text": 5}, 422, "text"),
    (R, [{"id": "r1", "kind": "bad"}, {"kind": "bad"}], 422, "[1].id"),
    (R, {"id": "never-served", "kind": "bad"}, 404, "id"),
]


@pytest.fixture(scope="module")
def served() -> Any:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600, rate_limit=None)
    with running(app) as url:
        yield app, url


@pytest.mark.parametrize(("path", "body", "status", "field"), CASES,
                         ids=[f"{c[0].split('/')[-1]}-{i}" for i, c in enumerate(CASES)])
def test_malformed_requests_get_a_json_error_and_store_nothing(
        served: Any, path: str, body: Any, status: int, field: str | None) -> None:
    app, url = served
    rollout = app.gateway.endpoints["churn"].rollout
    app.gateway.flush_all()
    before = len(rollout.store.telemetry("churn-v2"))
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content)  # no Content-Type, like tritonclient
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert isinstance(doc["error"], str) and doc["error"]
    assert doc.get("field") == field
    assert len(rollout.recorder.aggregator) == 0  # no telemetry buffered ...
    app.gateway.flush_all()
    assert len(rollout.store.telemetry("churn-v2")) == before  # ... nor stored


def test_a_batch_with_one_unknown_id_writes_nothing(served: Any) -> None:
    app, url = served
    unit = units_for(app, "churn", CANDIDATE, 1)[0]
    with httpx.Client(base_url=url) as c:
        pid = c.post(P, json={"unit": unit, "inputs": {"x": 1}}).json()["id"]
        r = c.post(F, json=[{"id": pid, "label": 2}, {"id": "ghost", "label": 1}])
        assert r.status_code == 404 and r.json()["field"] == "[1].id"
        r = c.post(R, json=[{"id": pid, "kind": "wrong"}, {"id": "ghost", "kind": "wrong"}])
        assert r.status_code == 404
        # nothing was written: the valid items are accepted now, not duplicates
        ok = c.post(F, json={"id": pid, "label": 2}).json()
        assert ok["accepted"] == ["accuracy"] and ok["duplicate"] == []
        assert c.post(R, json={"id": pid, "kind": "wrong"}).json()["accepted"] is True


def test_oversized_bodies_get_413() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600, max_body_bytes=1000)
    with running(app) as url, httpx.Client(base_url=url) as c:
        big = {"inputs": [{"x": 1}] * 200}
        r = c.post(P, json=big)
        assert r.status_code == 413 and r.json()["field"] == "body"

        def chunks() -> Any:  # no Content-Length: the streamed size is counted
            for _ in range(20):
                yield b" " * 100

        r = c.post(P, content=chunks())
        assert r.status_code == 413
        assert c.post(P, json={"inputs": {"x": 1}}).status_code == 200


def test_rate_limit_per_client_with_retry_after() -> None:
    """Buckets key on the authenticated client's token, never on a header the client picks."""
    store = MemoryStore()
    clock = SystemClock()
    a, _ = ops.create_token(store, clock, name="app-a", role=Role.CLIENT, expires_in=None)
    b, _ = ops.create_token(store, clock, name="app-b", role=Role.CLIENT, expires_in=None)
    app = create_app([make_plan()], store=store, tick_interval=3600, rate_limit=1.0,
                     rate_burst=3)
    with running(app) as url, httpx.Client(base_url=url) as c:
        as_a = {"authorization": f"Bearer {a}"}
        # a fresh client-chosen header on every request no longer buys a fresh bucket
        codes = [c.post(P, json={"inputs": {"x": 1}},
                        headers={**as_a, "x-client-id": f"id-{i}"}).status_code
                 for i in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        r = c.post(P, json={"inputs": {"x": 1}}, headers=as_a)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "rate limit" in r.json()["error"]
        # another client has its own bucket; health and metrics are never limited
        assert c.post(P, json={"inputs": {"x": 1}},
                      headers={"authorization": f"Bearer {b}"}).status_code == 200
        assert all(c.get("/healthz").status_code == 200 for _ in range(10))
        metrics = c.get("/metrics").text
    assert "safeshift_http_errors_total" in metrics


def test_unknown_routes_and_methods_get_json_errors(served: Any) -> None:
    _, url = served
    r = httpx.get(f"{url}/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v1/endpoints/churn/predict")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{url}/v2/models/nope")
    assert r.status_code == 404 and r.json()["field"] == "name"
    r = httpx.get(f"{url}/v2/models/nope/ready")
    assert r.status_code == 404
