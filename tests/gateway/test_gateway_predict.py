"""The predict path over real HTTP: arms, headers, ids, fallbacks, the event loop stays free."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, running, units_for

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.gateway import create_app
from safeshift.models import FakeModel, ModelResult
from safeshift.models.python import PythonModel


def test_predict_serves_both_arms_with_headers_and_ids() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    cand = units_for(app, "churn", CANDIDATE, 3)
    base = units_for(app, "churn", BASELINE, 3)
    with running(app) as url, httpx.Client(base_url=url) as c:
        for unit in cand:
            r = c.post("/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1}})
            assert r.status_code == 200
            body = r.json()
            assert body["outputs"] == [2] and body["arm"] == "candidate"
            assert body["version"] == "v2" and body["stage"] == "canary"
            assert r.headers["x-safeshift-version"] == "v2"
            assert r.headers["x-safeshift-arm"] == "candidate"
        for unit in base:
            r = c.post("/v1/endpoints/churn/predict",
                       json={"unit": unit, "inputs": [{"x": 1}, {"x": 2}], "id": f"id-{unit}"})
            body = r.json()
            assert body["outputs"] == [1, 1] and body["arm"] == "baseline"
            assert body["id"] == f"id-{unit}"  # the client's id is echoed
            assert r.headers["x-safeshift-arm"] == "baseline"
        r1 = c.post("/v1/endpoints/churn/predict", json={"unit": "z", "inputs": {"x": 1}})
        r2 = c.post("/v1/endpoints/churn/predict", json={"unit": "z", "inputs": {"x": 1}})
        assert r1.json()["id"] != r2.json()["id"]  # a new id when the client sends none
        assert r1.json()["id"] == r1.headers["x-request-id"]  # ... the one the logs carry
    rollout = app.gateway.endpoints["churn"].rollout
    assert rollout.store.get_request(f"id-{base[0]}") is not None  # flushed at shutdown


def test_unit_can_come_from_the_context_under_the_plans_unit_key() -> None:
    app = create_app([make_plan(unit="user_id")], auth=False, store="memory://", tick_interval=3600)
    unit = units_for(app, "churn", CANDIDATE, 1)[0]
    with running(app) as url:
        r = httpx.post(f"{url}/v1/endpoints/churn/predict",
                       json={"context": {"user_id": unit}, "inputs": {"x": 1}})
    assert r.json()["arm"] == "candidate"


class _Broken:
    """A candidate with a chosen fault."""

    name = "broken"

    def __init__(self, result: ModelResult | None = None, raises: bool = False) -> None:
        self.result = result
        self.raises = raises

    def predict(self, rows: Any) -> ModelResult:
        raise AssertionError("the gateway calls apredict")

    async def apredict(self, rows: Any) -> ModelResult:
        if self.raises:
            raise RuntimeError("boom")
        assert self.result is not None
        return ModelResult(outputs=self.result.outputs, error=self.result.error)

    def close(self) -> None:
        return None


@pytest.mark.parametrize(("candidate", "reason"), [
    (_Broken(ModelResult(outputs=[float("nan")])), "invalid"),
    (_Broken(ModelResult(outputs=[1, 2, 3])), "invalid"),  # wrong shape: 3 outputs, 1 row
    (_Broken(ModelResult(error="ValueError: bad")), "error"),
    (_Broken(raises=True), "error"),  # a backend that breaks the protocol by raising
])
def test_a_failing_candidate_falls_back_to_the_baseline(candidate: Any, reason: str) -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     models={"churn": {"candidate": candidate}})
    unit = units_for(app, "churn", CANDIDATE, 1)[0]
    with running(app) as url:
        r = httpx.post(f"{url}/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1}})
        metrics = httpx.get(f"{url}/metrics").text
    assert r.status_code == 200
    body = r.json()
    assert body["outputs"] == [1] and body["arm"] == "baseline" and body["fallback"] is True
    assert body["version"] == "v1"
    assert r.headers["x-safeshift-fallback"] == reason
    assert f'safeshift_fallbacks_total{{endpoint="churn",reason="{reason}"}} 1.0' in metrics
    # telemetry counts a candidate failure on the candidate arm
    rollout = app.gateway.endpoints["churn"].rollout
    rows = rollout.store.telemetry("churn-v2", 0)
    errors = [r for r in rows if r.signal == "error_rate" and r.arm == CANDIDATE]
    assert sum(r.s for r in errors) == 1.0 and sum(r.n for r in errors) == 1.0


def test_a_failing_baseline_is_an_error_for_the_client() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     models={"churn": {"baseline": FakeModel("b", error_rate=1.0)}})
    unit = units_for(app, "churn", BASELINE, 1)[0]
    with running(app) as url:
        r = httpx.post(f"{url}/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1}})
    assert r.status_code == 502
    assert "could not answer" in r.json()["error"]


def test_a_hanging_sync_candidate_does_not_block_the_event_loop() -> None:
    release = threading.Event()

    def hang(rows: list[Any]) -> list[int]:
        release.wait(5)  # a CPU-bound model that never answers in time
        return [2] * len(rows)

    plan = make_plan(serving={"candidate_timeout": "200ms"}, stages=[
        {"name": "canary", "traffic": "50%", "min_duration": "1h"}])
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600,
                     models={"churn": {"candidate": PythonModel(hang)}})
    assert app.gateway.endpoints["churn"].candidate.threaded
    cand = units_for(app, "churn", CANDIDATE, 4)
    base = units_for(app, "churn", BASELINE, 1)[0]

    async def scenario(url: str) -> tuple[list[httpx.Response], float, float]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            start = time.perf_counter()
            slow = [asyncio.create_task(c.post("/v1/endpoints/churn/predict",
                                               json={"unit": u, "inputs": {"x": 1}}))
                    for u in cand]
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            fast = await c.post("/v1/endpoints/churn/predict", json={"unit": base, "inputs": {"x": 1}})
            fast_latency = time.perf_counter() - t0
            assert fast.json()["arm"] == "baseline"
            done = await asyncio.gather(*slow)
            return done, fast_latency, time.perf_counter() - start

    try:
        with running(app) as url:
            responses, fast_latency, total = asyncio.run(scenario(url))
    finally:
        release.set()
    assert fast_latency < 0.15  # the loop was free while four candidate calls hung
    assert total < 1.5  # each hung call was cut at its 200 ms timeout
    for r in responses:
        assert r.status_code == 200
        assert r.json()["outputs"] == [1] and r.headers["x-safeshift-fallback"] == "timeout"


def test_fast_path_and_fastapi_route_answer_alike() -> None:
    bodies = []
    for fast in (True, False):
        app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600, fast_path=fast)
        unit = units_for(app, "churn", CANDIDATE, 1)[0]
        with running(app) as url, httpx.Client(base_url=url) as c:
            ok = c.post("/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1},
                                                              "id": "same"})
            bad = c.post("/v1/endpoints/churn/predict", json={"unit": unit})
            infer = c.post("/v2/models/churn/infer", json={
                "id": "i", "parameters": {"unit": unit},
                "inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]})
            bodies.append((ok.status_code, ok.json(), ok.headers["x-safeshift-arm"],
                           bad.status_code, bad.json(), infer.status_code, infer.json()))
    assert bodies[0] == bodies[1]
    assert bodies[0][0] == 200 and bodies[0][3] == 422


def test_inputs_the_baseline_rejects_are_a_422_and_not_counted(tmp_path: Any) -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     models={"churn": {"baseline": PythonModel(_needs_age),
                                       "candidate": PythonModel(_needs_age)}})
    units = units_for(app, "churn", CANDIDATE, 2) + units_for(app, "churn", BASELINE, 2)
    with running(app) as url, httpx.Client(base_url=url) as c:
        for unit in units:
            r = c.post("/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1}})
            assert r.status_code == 422 and r.json()["field"] == "inputs"
            assert "missing feature 'age'" in r.json()["error"]
        ok = c.post("/v1/endpoints/churn/predict", json={"unit": units[0], "inputs": {"age": 3}})
        assert ok.status_code == 200 and ok.json()["outputs"] == [3]
    rows = app.gateway.endpoints["churn"].rollout.store.telemetry("churn-v2", 0)
    assert sum(r.n for r in rows if r.signal == "requests") == 1


def _needs_age(rows: list[Any]) -> list[Any]:
    for row in rows:
        if "age" not in row:
            raise KeyError("missing feature 'age'")
    return [row["age"] for row in rows]
