"""A store that stops answering does not stop serving: requests keep their arms (the last
split seen), background tasks report the trouble, and all resumes when the store is back."""

from __future__ import annotations

import time
from typing import Any

import httpx
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
    app = create_app([make_plan(serving={"refresh": "100ms"})], store=store, tick_interval=0.1,
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
    # telemetry flows again (rows drained during the outage are lost: Rollout.flush does not
    # put them back when the write fails)
    rows = store.telemetry("churn-v2", 0)
    assert sum(r.n for r in rows if r.signal == "requests" and r.arm == CANDIDATE) >= 3
