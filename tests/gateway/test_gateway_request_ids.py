"""A request id already taken gets 409 — in this process at once, in the store across replicas
and restarts — so that every record has one request and every label finds its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, running, units_for

from safeshift import MemoryStore
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.clock import VirtualClock
from safeshift.errors import RejectedInputError, StoreError
from safeshift.feedback import RecentRequestIds, RequestIdTakenError
from safeshift.gateway import create_app
from safeshift.models.python import PythonModel
from safeshift.rollout import Rollout
from safeshift.state import RequestRecord

P = "/v1/endpoints/churn/predict"
INF = "/v2/models/churn/infer"
TENSOR = {"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}


def _taken(r: httpx.Response, rid: str, field: str) -> None:
    assert r.status_code == 409, r.text
    doc = r.json()
    assert doc["field"] == field
    assert repr(rid) in doc["error"] and "taken" in doc["error"] and "fresh id" in doc["error"]


def _requests(app: Any) -> float:
    app.gateway.flush_all()
    rows = app.gateway.endpoints["churn"].rollout.store.telemetry("churn-v2", 0)
    return sum(r.n for r in rows if r.signal == "requests")


def test_a_repeated_id_is_a_409_and_the_first_request_keeps_its_label() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    base = units_for(app, "churn", BASELINE, 1)[0]
    cand = units_for(app, "churn", CANDIDATE, 1)[0]
    with running(app) as url, httpx.Client(base_url=url) as c:
        first = c.post(P, json={"id": "req-1", "unit": base, "inputs": {"x": 1}})
        assert first.status_code == 200 and first.json()["arm"] == "baseline"
        counted = _requests(app)
        again = c.post(P, json={"id": "req-1", "unit": cand, "inputs": {"x": 1}})
        _taken(again, "req-1", "id")
        assert _requests(app) == counted  # refused before any model ran: nothing counted
        # the same id space for both protocols
        _taken(c.post(INF, json={"id": "req-1", "inputs": [TENSOR]}), "req-1", "id")
        ok = c.post(INF, json={"id": "req-2", "inputs": [TENSOR], "parameters": {"unit": cand}})
        assert ok.status_code == 200 and ok.json()["id"] == "req-2"
        _taken(c.post(P, json={"id": "req-2", "inputs": {"x": 1}}), "req-2", "id")
        # the label joins the request that had the id first
        fb = c.post("/v1/feedback", json={"id": "req-1", "label": 1}).json()
        assert fb["arm"] == "baseline" and fb["accepted"] == ["accuracy"]
        # ids the gateway makes are never refused
        made = {c.post(P, json={"inputs": {"x": 1}}).json()["id"] for _ in range(20)}
        assert len(made) == 20


def test_the_x_request_id_header_names_the_record_and_must_be_fresh_too() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        first = c.post(P, json={"inputs": {"x": 1}}, headers={"X-Request-ID": "trace-7"})
        assert first.status_code == 200 and first.json()["id"] == "trace-7"
        _taken(c.post(P, json={"inputs": {"x": 1}}, headers={"X-Request-ID": "trace-7"}),
               "trace-7", "X-Request-ID")
        assert "X-Request-ID header" in c.post(
            INF, json={"inputs": [TENSOR]}, headers={"X-Request-ID": "trace-7"}).json()["error"]
        # a body id names the record instead: the header is then only the log's id
        own = c.post(P, json={"id": "own-1", "inputs": {"x": 1}},
                     headers={"X-Request-ID": "trace-7"})
        assert own.status_code == 200 and own.json()["id"] == "own-1"
        assert own.headers["x-request-id"] == "trace-7"


def test_concurrent_requests_with_one_id_get_one_answer() -> None:
    # anonymous requests: all answered by the slow baseline
    plan = make_plan(baseline={"version": "v1", "model": "fake:base?output=1&latency_ms=300"})
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600)

    async def scenario(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url) as c:
            rs = await asyncio.gather(*(c.post(P, json={"id": "dup", "inputs": {"x": i}})
                                        for i in range(5)))
        return sorted(r.status_code for r in rs)

    with running(app) as url:
        assert asyncio.run(scenario(url)) == [200, 409, 409, 409, 409]
    assert app.gateway.endpoints["churn"].rollout.store.get_request("dup") is not None


def test_an_id_whose_inputs_were_refused_is_free_and_a_502_keeps_it() -> None:
    def model(rows: list[Any]) -> list[Any]:
        if "boom" in rows[0]:
            raise RuntimeError("the model crashed")
        return [rows[0]["age"] for _ in rows]  # KeyError without an age: the inputs' fault

    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     models={"churn": {"baseline": PythonModel(model),
                                       "candidate": PythonModel(model)}})
    unit = units_for(app, "churn", BASELINE, 1)[0]
    with running(app) as url, httpx.Client(base_url=url) as c:
        bad = c.post(P, json={"id": "r-1", "unit": unit, "inputs": {"x": 1}})
        assert bad.status_code == 422  # no record: the client may fix the inputs and retry
        ok = c.post(P, json={"id": "r-1", "unit": unit, "inputs": {"age": 3}})
        assert ok.status_code == 200 and ok.json()["outputs"] == [3]
        crashed = c.post(P, json={"id": "r-2", "unit": unit, "inputs": {"boom": 1}})
        assert crashed.status_code == 502  # counted against the arm, with a record
        _taken(c.post(P, json={"id": "r-2", "unit": unit, "inputs": {"age": 3}}), "r-2", "id")


def test_replicas_sharing_a_store_refuse_an_id_another_one_served(shared_store: str) -> None:
    plan = make_plan()
    a = create_app([plan], auth=False, store=shared_store, tick_interval=3600)
    b = create_app([plan], auth=False, store=shared_store, tick_interval=3600, controller=False)
    with running(a) as url_a, running(b) as url_b:
        r = httpx.post(f"{url_a}{P}", json={"id": "shared-1", "inputs": {"x": 1}})
        assert r.status_code == 200
        a.gateway.flush_all()  # the flush task writes records within a second
        _taken(httpx.post(f"{url_b}{P}", json={"id": "shared-1", "inputs": {"x": 1}}),
               "shared-1", "id")
        _taken(httpx.post(f"{url_b}{INF}", json={"id": "shared-1", "inputs": [TENSOR]}),
               "shared-1", "id")
        assert httpx.post(f"{url_b}{P}", json={"id": "shared-2", "inputs": {"x": 1}}
                          ).status_code == 200
    # and after a restart, from the store alone
    c = create_app([plan], auth=False, store=shared_store, tick_interval=3600)
    with running(c) as url_c:
        for rid in ("shared-1", "shared-2"):
            _taken(httpx.post(f"{url_c}{P}", json={"id": rid, "inputs": {"x": 1}}), rid, "id")


class _CountingStore(MemoryStore):
    """Counts ``get_requests`` calls; each takes ``delay`` seconds, or raises when ``down``."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.down = False
        self.lookups: list[int] = []

    def get_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        self.lookups.append(len(request_ids))
        if self.down:
            raise StoreError("the store is unreachable")
        if self.delay:
            time.sleep(self.delay)
        return super().get_requests(request_ids)


def test_store_lookups_are_batched() -> None:
    store = _CountingStore(delay=0.02)
    app = create_app([make_plan()], auth=False, store=store, tick_interval=3600)

    async def scenario(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url) as c:
            rs = await asyncio.gather(*(c.post(P, json={"id": f"b-{i}", "inputs": {"x": 1}})
                                        for i in range(60)))
        return [r.status_code for r in rs]

    with running(app) as url:
        store.lookups.clear()
        assert asyncio.run(scenario(url)) == [200] * 60
    assert sum(store.lookups) == 60  # every id looked up once ...
    assert len(store.lookups) < 20  # ... in a few queries


def test_a_slow_store_does_not_stall_serving() -> None:
    store = _CountingStore(delay=1.0)
    app = create_app([make_plan()], auth=False, store=store, tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        start = time.perf_counter()
        assert c.post(P, json={"id": "slow-1", "inputs": {"x": 1}}).status_code == 200
        assert time.perf_counter() - start < 0.6  # waited at most the lookup timeout
        # this process still knows the ids it gave out
        _taken(c.post(P, json={"id": "slow-1", "inputs": {"x": 1}}), "slow-1", "id")


def test_an_unreachable_store_does_not_stop_serving() -> None:
    store = _CountingStore()
    app = create_app([make_plan()], auth=False, store=store, tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        store.down = True
        assert c.post(P, json={"id": "down-1", "inputs": {"x": 1}}).status_code == 200
        _taken(c.post(P, json={"id": "down-1", "inputs": {"x": 1}}), "down-1", "id")
        metrics = c.get("/metrics").text
    assert 'safeshift_store_errors_total{operation="request_id"} 1.0' in metrics


def test_an_id_is_free_again_once_its_record_is_purged(sqlite_url: str) -> None:
    clock = VirtualClock()
    plan = make_plan(serving={"label_window": "1h"})
    app = create_app([plan], auth=False, store=sqlite_url, clock=clock, tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    with running(app) as url, httpx.Client(base_url=url) as c:
        assert c.post(P, json={"id": "old", "inputs": {"x": 1}}).status_code == 200
        app.gateway.flush_all()
        clock.advance(3601)  # past the label window, but not purged: the row would still win
        _taken(c.post(P, json={"id": "old", "inputs": {"x": 1}}), "old", "id")
        rollout.store.purge_expired(clock.now())
        assert c.post(P, json={"id": "old", "inputs": {"x": 1}}).status_code == 200
        app.gateway.flush_all()
        assert rollout.store.get_request("old").created_at == clock.now()  # the new record


def test_rollout_check_request_id_in_python() -> None:
    clock = VirtualClock()
    store = MemoryStore()
    rollout = Rollout.from_plan(make_plan(), store=store, clock=clock)
    rollout.check_request_id("py-1")
    with pytest.raises(RequestIdTakenError, match="'py-1' is already taken"):
        rollout.check_request_id("py-1")
    rollout.predict({"x": 1}, request_id="py-2")
    rollout.flush()
    other = Rollout.from_plan(make_plan(), store=store, clock=clock)  # e.g. another process
    with pytest.raises(RequestIdTakenError):
        other.check_request_id("py-2")
    other.request_ids.release("py-3")  # releasing an unknown id is harmless
    other.check_request_id("py-3")


def test_recent_request_ids_are_bounded_and_expire() -> None:
    ids = RecentRequestIds(size=3)
    assert ids.claim("a", until=10, now=0) and not ids.claim("a", until=10, now=5)
    assert ids.claim("a", until=20, now=10)  # its window ended: the store decides now
    for name in "bcd":
        assert ids.claim(name, until=100, now=10)
    assert len(ids) == 3 and ids.claim("a", until=100, now=10)  # the oldest was forgotten
    ids.release("a")
    assert ids.claim("a", until=100, now=10)


def test_rollout_predict_refuses_a_request_id_twice() -> None:
    """Library mode checks a caller's id as the gateway does: the second request with it would
    never get a label. Inputs the model rejects leave no record, so their id stays free."""
    def needs_x(rows: list[Any]) -> list[Any]:
        return [row["x"] for row in rows]

    store = MemoryStore()
    rollout = Rollout.from_plan(make_plan(), store=store, clock=VirtualClock(),
                                models={"baseline": PythonModel(needs_x),
                                        "candidate": PythonModel(needs_x)})
    first = rollout.predict({"x": 1}, unit="u1", request_id="lib-1")
    assert first.id == "lib-1"
    with pytest.raises(RequestIdTakenError, match="'lib-1' is already taken"):
        rollout.predict({"x": 2}, unit="u2", request_id="lib-1")
    with pytest.raises(RejectedInputError):
        rollout.predict({"y": 2}, unit="u2", request_id="lib-2")
    assert rollout.predict({"x": 2}, unit="u2", request_id="lib-2").id == "lib-2"
    rollout.flush()
    assert store.get_request("lib-1") is not None and store.get_request("lib-2") is not None
    assert rollout.predict({"x": 3}).id not in {"lib-1", "lib-2"}  # no id: one is made
    rollout.close()
