"""Records identical to the gateway's for the same traffic: the same requests (units, contexts,
inputs, request ids), labels and reports sent to the example FastAPI app (the in-process SDK,
under uvicorn) and to ``safeshift serve`` (a process), with the same plan, the same
deterministic models and the same assignment seed, leave the same answers, the same request
records and the same telemetry in their stores — timestamps and latencies aside.

The models fail in every way the serving core tells apart: the candidate raises on some
inputs (its fault: the baseline answers), answers NaN on others (``invalid``), both reject
rows with a non-positive area (the request's fault: 422, counted against neither); in the
canary plan its breaker opens after five failures (a long window, so it opens at the same
request in both). One request reuses an earlier request's id (409 in both)."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from tests.gateway.gateway_helpers import running
from tests.serve_process import serve_process
from tests.test_sdk_example import EXAMPLE, FEATURES, load_example

from safeshift import ops
from safeshift.clock import SystemClock
from safeshift.models import load_model
from safeshift.plan import Plan
from safeshift.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent
ROLLOUT = "churn-records"

MODELS = '''
"""The churn models, with deterministic faults (a test module)."""
import math

import joblib

MODELS = {models!r}


class _Churn:
    name = ""

    def __init__(self):
        bundle = joblib.load(f"{{MODELS}}/{{self.name}}.joblib")
        self.estimator, self.features = bundle["model"], bundle["features"]

    def matrix(self, rows):
        for row in rows:
            if row["mean_area"] <= 0:
                raise ValueError("mean_area must be positive")
        return [[row[f] for f in self.features] for row in rows]


class Baseline(_Churn):
    name = "churn_v1"

    def predict(self, rows):
        return self.estimator.predict(self.matrix(rows)).tolist()


class Candidate(_Churn):
    name = "churn_v2"

    def predict(self, rows):
        x = self.matrix(rows)
        if any(row["mean_radius"] > 19 for row in rows):
            raise RuntimeError("the new pipeline overflows")
        out = self.estimator.predict(x).tolist()
        return [math.nan if row["mean_texture"] > 27 else o for row, o in zip(rows, out)]
'''

SHADOW = [{"name": "shadow", "shadow": "100%", "min_duration": "1h"},
          {"name": "full", "traffic": "100%"}]
CANARY = [{"name": "canary", "traffic": "40%", "min_duration": "1h"},
          {"name": "full", "traffic": "100%"}]


def write_plan(tmp_path: Path, stages: list[dict[str, Any]], breaker: int) -> Path:
    (tmp_path / "sdk_records_models.py").write_text(
        MODELS.format(models=str(ROOT / "examples" / "churn" / "models")))
    doc = yaml.safe_load((EXAMPLE / "plan.yaml").read_text())
    doc.update(
        rollout=ROLLOUT,
        baseline={"version": "v1", "model": "python:sdk_records_models:Baseline"},
        candidate={"version": "v2", "model": "python:sdk_records_models:Candidate",
                   "timeout": "5s"},
        stages=stages,
        guardrails=[{"metric": "error_rate", "tolerance": 0.01},
                    {"metric": "accuracy", "source": "feedback", "tolerance": 0.05},
                    *([{"metric": "disagreement", "stage": "shadow", "max": 0.2}]
                      if stages is SHADOW else [])],
        serving={"breaker_failures": breaker, "breaker_window": "1h",
                 "breaker_cooldown": "1h"})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def traffic() -> list[dict[str, Any]]:
    """300 requests: who, from where, which inputs, which request id."""
    d = load_breast_cancer()
    columns = [list(d.feature_names).index(f.replace("_", " ")) for f in FEATURES]
    rng = random.Random(12)
    out = []
    for i in range(300):
        k = rng.randrange(len(d.data))
        row = {f: float(d.data[k][c]) for f, c in zip(FEATURES, columns, strict=True)}
        if i % 29 == 7:
            row["mean_area"] = 0.0  # both models reject it
        out.append({"id": "req-10" if i == 150 else f"req-{i}",  # 150 reuses an id: 409
                    "unit": f"user-{rng.randrange(120)}", "country": rng.choice(["BR", "US", "DE"]),
                    "plan": rng.choice(["pro", "free", "internal"]), "row": row,
                    "label": int(d.target[k])})
    return out


def answer(r: httpx.Response) -> tuple[Any, ...]:
    """What the user got: the status, and the answer or the refusal."""
    if r.status_code != 200:
        return r.status_code, r.json()
    doc = r.json()
    output = doc["outputs"][0] if "outputs" in doc else doc["churn"]
    return (200, doc["id"], doc["arm"], doc["version"], doc["stage"], output,
            r.headers["x-request-id"], r.headers["x-safeshift-arm"],
            r.headers.get("x-safeshift-fallback"))


def drive(c: httpx.Client, requests: list[dict[str, Any]], *, gateway: bool) -> dict[str, Any]:
    """Send the requests, then a batch of labels and a few reports; what came back."""
    answers = []
    for q in requests:
        headers = {"x-request-id": q["id"]}
        if gateway:
            r = c.post("/v1/endpoints/churn/predict", headers=headers, json={
                "unit": q["unit"], "context": {"country": q["country"], "plan": q["plan"]},
                "inputs": q["row"]})
        else:
            r = c.post("/churn", headers=headers, json={
                "user_id": q["unit"], "country": q["country"], "plan": q["plan"],
                "features": q["row"]})
        answers.append(answer(r))
    served = [q for q, a in zip(requests, answers, strict=True) if a[0] == 200]
    labels = [{"id": q["id"], "label": q["label"]} for q in served[:120]]
    fb = c.post("/v1/feedback" if gateway else "/safeshift/feedback", json=labels)
    again = c.post("/v1/feedback" if gateway else "/safeshift/feedback", json=labels[:5])
    reports = [c.post("/v1/reports" if gateway else "/safeshift/reports",
                      json={"id": q["id"], "kind": "wrong_answer"}).json()
               for q in served[:10]]
    return {"answers": answers, "feedback": fb.json(), "again": again.json(),
            "reports": reports}


def stored(store: Store, ids: list[str], joined: list[tuple[str, str]]) -> dict[str, Any]:
    """The store's records, without timestamps and latencies: every request record, the
    feedback ``joined`` (request id, signal), and the telemetry summed over time windows
    (latency signals by count only). A request without a hashed unit (targeted or excluded
    by a rule) is its own observation, in a random cluster: such cells are summed over
    clusters."""
    records = {rid: (r.rollout, r.stage, r.arm, r.cohort, r.segment, r.outputs, r.unit_hash,
                     r.cluster if r.unit_hash >= 0 else None)
               for rid, r in store.get_requests(ids).items()}
    cells: dict[tuple[Any, ...], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for row in store.telemetry(ROLLOUT):
        key = (row.stage, row.arm, row.cohort, row.segment, row.signal,
               row.cluster if row.cohort == "hash" else None)
        cell = cells[key]
        cell[0] += row.n
        if not row.signal.startswith("latency"):
            cell[1] += row.s
            cell[2] += row.ss
    telemetry = {k: tuple(round(v, 9) for v in cell) for k, cell in cells.items()}
    labels = store.feedback_values(joined)
    return {"records": records, "telemetry": telemetry, "labels": labels,
            "phase": store.get_state(ROLLOUT).phase}


def register(url: str, plan_path: Path) -> None:
    """The rollout in a fresh store, with the assignment seed both runs share."""
    st = open_store(url)
    ops.register(st, Plan.load(plan_path), SystemClock(), salt_seed="records-test-seed")
    st.close()


@pytest.mark.parametrize(("stages", "breaker"), [(CANARY, 5), (SHADOW, 1000)],
                         ids=["canary", "shadow"])
def test_the_sdk_leaves_the_records_the_gateway_leaves(tmp_path: Path,
                                                       stages: list[dict[str, Any]],
                                                       breaker: int) -> None:
    plan_path = write_plan(tmp_path, stages, breaker)
    requests = traffic()
    ids = sorted({q["id"] for q in requests})

    gateway_store = str(tmp_path / "gateway.db")
    register(gateway_store, plan_path)
    # the controller starts the rollout, then leaves it be: a rollback decided on the
    # evidence mid-traffic would come at a different request in each run
    with serve_process([plan_path], store=gateway_store, log=tmp_path / "serve.log",
                       tick=3600, env={"SAFESHIFT_AUTH": "0"}) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        through_gateway = drive(c, requests, gateway=True)

    sdk_store = str(tmp_path / "sdk.db")
    register(sdk_store, plan_path)
    plan = Plan.load(plan_path)
    models = {arm: load_model(plan.variant(arm).model, plan.base_dir)
              for arm in ("baseline", "candidate")}
    app = load_example().create_app(plan, store=sdk_store, models=models, tick_interval=3600,
                                    flush_interval=0.1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        through_sdk = drive(c, requests, gateway=False)

    # what the users and the labelling job got
    answers = through_sdk["answers"]
    assert answers == through_gateway["answers"]
    assert through_sdk["feedback"] == through_gateway["feedback"]
    assert through_sdk["again"] == through_gateway["again"]
    assert through_sdk["reports"] == through_gateway["reports"]
    # the traffic exercised what it is meant to
    statuses = [a[0] for a in answers]
    assert statuses.count(422) == 11 and statuses.count(409) == 1
    fallbacks = {a[8] for a in answers if a[0] == 200}
    if stages is CANARY:
        assert {"candidate", "baseline"} <= {a[2] for a in answers if a[0] == 200}
        assert {"error", "breaker_open"} <= fallbacks
    else:
        assert {a[4] for a in answers if a[0] == 200} == {"shadow"}
    # and what the stores hold
    joined = [(res["id"], signal) for res in through_gateway["feedback"]["results"]
              for signal in res["accepted"]]
    assert 50 < len(joined) <= 120  # labels of excluded requests (DE) are not scored
    a, b = open_store(gateway_store), open_store(sdk_store)
    try:
        sdk, gw = stored(b, ids, joined), stored(a, ids, joined)
    finally:
        a.close()
        b.close()
    assert len(gw["records"]) == 288 and len(gw["labels"]) == len(joined)
    assert sdk["records"] == gw["records"]
    assert sdk["labels"] == gw["labels"]
    signals = {k[4] for k in gw["telemetry"]}
    assert {"requests", "error_rate", "request_fault", "accuracy"} <= signals
    if stages is SHADOW:
        assert "disagreement" in signals
        assert any(len(r[5]) == 2 for r in gw["records"].values())  # both arms' answers
    assert sdk["telemetry"] == gw["telemetry"]
    assert sdk["phase"] == gw["phase"]
