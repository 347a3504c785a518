"""A store that stops answering does not stop serving: requests keep their arms (the last
split seen), background tasks report the trouble, and all resumes when the store is back."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, running, units_for

from safeshift.assign import CANDIDATE
from safeshift.errors import StoreError
from safeshift.gateway import create_app
from safeshift.store import MemoryStore


class FlakyStore(MemoryStore):
    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreError("the store is unreachable (test)")

    def get_state(self, name: str) -> Any:
        self._check()
        return super().get_state(name)

    def add_telemetry(self, rows: Any) -> None:
        self._check()
        super().add_telemetry(rows)

    def put_requests(self, records: Any) -> None:
        self._check()
        super().put_requests(records)


def test_serving_survives_a_store_outage() -> None:
    store = FlakyStore()
    app = create_app([make_plan(serving={"refresh": "100ms"})], auth=False, store=store, tick_interval=0.1,
                     flush_interval=0.1)
    cand = units_for(app, "churn", CANDIDATE, 3)
    with running(app) as url, httpx.Client(base_url=url) as c:
        store.down = True
        time.sleep(0.3)  # refresh, flush and tick fail in the background meanwhile
        for unit in cand:
            r = c.post("/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1}})
            assert r.status_code == 200 and r.json()["arm"] == CANDIDATE
        ready = c.get("/readyz")
        assert ready.status_code == 200 and "unreachable" in ready.json()["store"]
        metrics = c.get("/metrics").text
        assert 'safeshift_store_errors_total{operation="refresh"}' in metrics
        store.down = False
        deadline = time.monotonic() + 3
        while c.get("/readyz").json()["store"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").json()["store"] == "ok"
        for unit in cand:
            c.post("/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1}})
        deadline = time.monotonic() + 3
        while not store.telemetry("churn-v2", 0) and time.monotonic() < deadline:
            time.sleep(0.05)
    # telemetry flows again, and what failed to flush during the outage was kept and written
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sum(
            r.n for r in store.telemetry("churn-v2", 0)
            if r.signal == "requests" and r.arm == CANDIDATE) < 2 * len(cand):
        time.sleep(0.05)
    rows = store.telemetry("churn-v2", 0)
    assert sum(r.n for r in rows if r.signal == "requests" and r.arm == CANDIDATE) == 2 * len(cand)


@pytest.mark.process
def test_postgresql_outage_loses_nothing(postgres_cluster: Any) -> None:
    """A real PostgreSQL stopped mid-run and started again: requests keep being served on their
    arms, readiness reports the outage, and once the server is back every request served
    meanwhile reaches the store: its telemetry, and its record that late feedback joins."""
    app = create_app([make_plan(serving={"refresh": "100ms"})], auth=False, store=postgres_cluster.url,
                     tick_interval=0.1, flush_interval=0.1)
    rollout = app.gateway.endpoints["churn"].rollout
    cand = units_for(app, "churn", CANDIDATE, 4)
    served: list[str] = []
    with running(app) as url, httpx.Client(base_url=url) as c:
        def predict(unit: str) -> None:
            r = c.post("/v1/endpoints/churn/predict", json={"unit": unit, "inputs": {"x": 1}})
            assert r.status_code == 200 and r.json()["arm"] == CANDIDATE
            served.append(r.json()["id"])

        predict(cand[0])
        postgres_cluster.stop_server()
        for unit in cand:
            predict(unit)
        time.sleep(0.4)  # flushes, refreshes and ticks fail meanwhile
        with pytest.raises(StoreError, match=r"store postgresql\+psycopg://.*:\*\*\*@.* failed"):
            rollout.store.get_state("churn-v2")  # a plain error naming the store, password hidden
        ready = c.get("/readyz").json()
        assert ready["store"] != "ok"
        assert 'safeshift_store_errors_total{operation="flush"}' in c.get("/metrics").text
        postgres_cluster.start_server()
        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["store"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").json()["store"] == "ok"
        app.gateway.flush_all()
        feedback = c.post("/v1/feedback", json=[{"id": rid, "label": 1} for rid in served])
        assert feedback.status_code == 200, feedback.text
    rows = rollout.store.telemetry("churn-v2", 0)
    assert sum(r.n for r in rows if r.signal == "requests" and r.arm == CANDIDATE) == len(served)
    assert sum(r.n for r in rows if r.signal == "accuracy" and r.arm == CANDIDATE) == len(served)


def test_a_long_outage_keeps_a_bounded_buffer_and_counts_what_it_drops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from safeshift import recorder

    monkeypatch.setattr(recorder, "MAX_BUFFERED_RECORDS", 5)
    store = FlakyStore()
    app = create_app([make_plan()], auth=False, store=store, tick_interval=3600, flush_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        store.down = True
        ids = [c.post("/v1/endpoints/churn/predict",
                      json={"unit": f"u{i}", "inputs": {"x": 1}}).json()["id"] for i in range(8)]
        with pytest.raises(StoreError):
            app.gateway.flush_all()
        metrics = c.get("/metrics").text
        assert 'safeshift_unflushed_records{endpoint="churn"} 5.0' in metrics
        assert 'safeshift_records_dropped{endpoint="churn"} 3.0' in metrics
        store.down = False
        app.gateway.flush_all()
        assert 'safeshift_unflushed_records{endpoint="churn"} 0.0' in c.get("/metrics").text
    # the newest records were kept: their feedback can still join
    assert [store.get_request(rid) is not None for rid in ids] == [False] * 3 + [True] * 5
