"""One serving core: library mode (``Rollout.predict``), the gateway (HTTP) and the simulator
(``simulate.serve_requests``) leave identical records for the same traffic.

The traffic mixes what every path must count the same way: requests on both arms, a unit seen
twice, segments, a candidate that fails on some inputs (the baseline answers: a fallback, the
candidate's error), inputs both models reject (a request fault, no model's error) and, in the
shadow stage, mirrored copies compared pairwise. Only latencies differ between the paths (they
are measured); everything else — every telemetry cell's counts and sums, every request record
— must be equal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, running

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.clock import VirtualClock
from safeshift.errors import RejectedInputError
from safeshift.gateway import create_app
from safeshift.models import ModelBackend, ModelResult
from safeshift.models.python import PythonModel
from safeshift.plan import Plan
from safeshift.rollout import Rollout
from safeshift.simulate import Request, serve_requests
from safeshift.store import MemoryStore

START = 1_767_225_600.0
STAGES = {
    "canary": [{"name": "canary", "traffic": "50%", "min_duration": "1h"}],
    "shadow": [{"name": "shadow", "shadow": "100%", "min_duration": "1h"}],
}


def baseline(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    return [int(r["x"] > 5) for r in rows]  # a row without "x": KeyError, the request's fault


def candidate(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    if any(r["x"] % 7 == 3 for r in rows):
        raise RuntimeError("the candidate breaks on these inputs")  # its own fault
    return [int(r["x"] > 4) for r in rows]


def models() -> dict[str, ModelBackend]:
    return {BASELINE: PythonModel(baseline, "base"), CANDIDATE: PythonModel(candidate, "cand")}


def traffic() -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
    """(request id, unit, context, row): 30 units, two requests each, two countries."""
    out = []
    for i in range(60):
        row: dict[str, Any] = {"y": 1} if i % 11 == 5 else {"x": i % 13}
        out.append((f"r{i}", f"u{i % 30}", {"country": "de" if i % 3 else "fr"}, row))
    return out


def plan_for(stage: str) -> Plan:
    guardrails: list[dict[str, Any]] = [{"metric": "error_rate", "tolerance": 0.01}]
    if stage == "shadow":
        guardrails.append({"metric": "disagreement", "max": 0.5})
    return make_plan(stages=STAGES[stage], segments=["country"], guardrails=guardrails)


def by_library(plan: Plan) -> MemoryStore:
    store = MemoryStore()
    rollout = Rollout.from_plan(plan, store=store, clock=VirtualClock(START), models=models())
    for rid, unit, ctx, row in traffic():
        with contextlib.suppress(RejectedInputError):  # the request's fault: counted, told
            rollout.predict(row, unit=unit, context=ctx, request_id=rid)
    rollout.close()  # finishes the shadow copies, flushes
    return store


def by_gateway(plan: Plan) -> MemoryStore:
    store = MemoryStore()
    app = create_app([plan], auth=False, store=store, clock=VirtualClock(START),
                     models={plan.endpoint: models()}, tick_interval=3600, flush_interval=3600)
    rollout = app.gateway.endpoints[plan.endpoint].rollout
    shadowed = 0
    with running(app) as url, httpx.Client(base_url=url) as c:
        for rid, unit, ctx, row in traffic():
            r = c.post(f"/v1/endpoints/{plan.endpoint}/predict",
                       json={"id": rid, "unit": unit, "context": ctx, "inputs": row})
            assert r.status_code in (200, 422), r.text
            shadowed += r.status_code == 200 and r.json()["stage"] == "shadow"
        _wait_for(lambda: _shadow_copies(c.get("/metrics").text) >= shadowed)
        app.gateway.flush_all()
    assert rollout.unflushed_records == 0
    return store


def by_simulator(plan: Plan) -> MemoryStore:
    store = MemoryStore()
    rollout = Rollout.from_plan(plan, store=store, clock=VirtualClock(START), models=models())
    backends = models()

    def respond(arm: str, requests: Sequence[Request]) -> list[ModelResult]:
        return [backends[arm].predict([r.row]) for r in requests]

    batch: dict[str, list[Request]] = {BASELINE: []}
    shadowed = []
    for rid, unit, ctx, row in traffic():
        a = rollout.assign(unit, ctx)
        req = Request(rid, unit, ctx, a, row, None)
        batch.setdefault(a.telemetry_arm, []).append(req)
        if a.shadow:
            shadowed.append(req)
    serve_requests(rollout, batch, shadowed, respond)
    rollout.close()
    return store


def _shadow_copies(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("safeshift_shadow_copies_total{"))


def _wait_for(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the gateway's shadow copies did not finish"
        time.sleep(0.05)


def telemetry(store: MemoryStore, plan: Plan) -> dict[tuple[Any, ...], tuple[float, ...]]:
    """Every cell's sums, without what latency makes differ between runs."""
    out = {}
    for r in store.telemetry(plan.rollout):
        key = (r.stage, r.arm, r.cohort, r.segment, r.window, r.cluster, r.signal)
        out[key] = (r.n,) if r.signal == "latency_ms" else (r.n, r.s, r.ss)
    return out


def records(store: MemoryStore, plan: Plan) -> dict[str, tuple[Any, ...]]:
    ids = [rid for rid, *_ in traffic()]
    return {rid: (rec.stage, rec.arm, rec.cohort, rec.segment, rec.created_at, rec.expires_at,
                  rec.outputs, rec.cluster, rec.unit_hash)
            for rid, rec in store.get_requests(ids).items()}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_library_gateway_and_simulator_record_the_same(stage: str) -> None:
    plan = plan_for(stage)
    stores = {"library": by_library(plan), "gateway": by_gateway(plan),
              "simulator": by_simulator(plan)}
    cells = {path: telemetry(s, plan) for path, s in stores.items()}
    kept = {path: records(s, plan) for path, s in stores.items()}
    lib = cells["library"]
    # the traffic exercises what the paths could count differently
    signals = {key[-1] for key in lib}
    assert {"requests", "error_rate", "units", "request_fault"} <= signals
    if stage == "shadow":
        assert "disagreement" in signals
        assert {key[1] for key in lib} == {BASELINE, CANDIDATE}
    else:
        errors = sum(v[1] for k, v in lib.items() if k[1] == CANDIDATE and k[-1] == "error_rate")
        assert errors > 0  # the candidate's own faults, answered by the baseline
    assert len(kept["library"]) > 40
    for path in ("gateway", "simulator"):
        assert cells[path] == lib, path
        assert kept[path] == kept["library"], path
