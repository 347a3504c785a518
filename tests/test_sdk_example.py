"""The example FastAPI app (examples/fastapi-app) under a real uvicorn on loopback, through
whole rollouts on a virtual clock: its churn models promoted stage by stage (shadow, canary,
full) on traffic and labels sent over HTTP; a candidate that fails on a third of the inputs
rolled back, while every user it failed got the baseline's answer."""

from __future__ import annotations

import importlib.util
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import joblib
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from tests.gateway.gateway_helpers import running

from safeshift import Plan, VirtualClock
from safeshift.models import SklearnModel
from safeshift.state import Action, Phase
from safeshift.store import open_store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fastapi-app"
FEATURES = ["mean_radius", "mean_texture", "mean_perimeter", "mean_area"]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("safeshift_fastapi_example", EXAMPLE / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example()


def data() -> tuple[list[dict[str, float]], list[int]]:
    d = load_breast_cancer()
    columns = [list(d.feature_names).index(f.replace("_", " ")) for f in FEATURES]
    rows = [{f: float(x[c]) for f, c in zip(FEATURES, columns, strict=True)} for x in d.data]
    return rows, [int(t) for t in d.target]


def quick_plan(**changes: Any) -> Plan:
    """The example's plan with stages short enough for a test."""
    doc = yaml.safe_load((EXAMPLE / "plan.yaml").read_text())
    doc.update(changes)
    return Plan.from_dict(doc, base_dir=EXAMPLE)


def local(name: str) -> SklearnModel:
    bundle = joblib.load(ROOT / "examples" / "churn" / "models" / f"{name}.joblib")
    return SklearnModel(bundle["model"], bundle["features"])


def test_the_example_app_promotes_its_candidate_stage_by_stage(example: ModuleType,
                                                               tmp_path: Path) -> None:
    plan = quick_plan(
        stages=[{"name": "shadow", "shadow": "100%", "min_duration": "1m", "min_samples": 100},
                {"name": "canary", "traffic": "50%", "min_duration": "1m", "min_samples": 100},
                {"name": "full", "traffic": "100%"}],
        guardrails=[{"metric": "error_rate", "tolerance": 0.05},
                    {"metric": "accuracy", "source": "feedback", "tolerance": 0.2},
                    {"metric": "disagreement", "stage": "shadow", "max": 0.3}])
    clock = VirtualClock(1_700_000_000.0)
    store = str(tmp_path / "store.db")
    app = example.create_app(plan, store=store, clock=clock, tick_interval=0.05,
                             flush_interval=0.05)
    rows, labels = data()
    want = {"v1": local("churn_v1"), "v2": local("churn_v2")}
    rng = random.Random(4)
    seen: dict[str, set[str]] = {}
    reader = open_store(store)
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(200):
            labelled = []
            for _ in range(20):
                k = rng.randrange(len(rows))
                body = {"user_id": f"user-{rng.randrange(400)}", "country": rng.choice(["BR", "US"]),
                        "plan": "pro", "features": rows[k]}
                r = c.post("/churn", json=body)
                assert r.status_code == 200, r.text
                doc = r.json()
                assert r.headers["x-request-id"] == doc["id"]
                assert r.headers["x-safeshift-version"] == doc["version"]
                assert doc["churn"] == want[doc["version"]].predict([rows[k]]).outputs[0]
                seen.setdefault(doc["stage"], set()).add(doc["arm"])
                labelled.append({"id": doc["id"], "label": labels[k]})
            fb = c.post("/safeshift/feedback", json=labelled)  # the labels, as a batch
            assert fb.status_code == 200, fb.text
            assert all(res["accepted"] == ["accuracy"] for res in fb.json()["results"])
            clock.advance(5)
            time.sleep(0.08)  # a tick or two of the app's controller
            if reader.get_state(plan.rollout).phase.terminal:
                break
        state = reader.get_state(plan.rollout)
        assert state.phase is Phase.PROMOTED
        after = c.post("/churn", json={"user_id": "user-1", "features": rows[0]}).json()
    actions = [d.action for d in reader.decisions(plan.rollout)]
    reader.close()
    assert actions == [Action.START, Action.ADVANCE, Action.PROMOTE]
    assert seen["shadow"] == {"baseline"}  # shadow: the candidate answered nobody
    assert seen["canary"] == {"baseline", "candidate"}
    assert after["version"] == "v2" and after["arm"] == "candidate"


class FailsOnLargeRadius:
    """The candidate, with a bug on a third of the inputs (large tumours)."""

    def __init__(self) -> None:
        self.model = local("churn_v2")

    def predict(self, rows: list[Any]) -> list[Any]:
        if any(row["mean_radius"] > 15.0 for row in rows):
            raise RuntimeError("overflow in the new feature pipeline")
        outputs = self.model.predict(rows).outputs
        assert outputs is not None
        return outputs


def test_a_faulty_candidate_is_rolled_back_and_never_reaches_a_user(example: ModuleType,
                                                                    tmp_path: Path) -> None:
    plan = quick_plan(stages=[{"name": "canary", "traffic": "50%", "min_duration": "10m"},
                              {"name": "full", "traffic": "100%"}],
                      guardrails=[{"metric": "error_rate", "tolerance": 0.02}])
    clock = VirtualClock(1_700_000_000.0)
    store = str(tmp_path / "store.db")
    models = {"baseline": local("churn_v1"), "candidate": FailsOnLargeRadius()}
    app = example.create_app(plan, store=store, clock=clock, models=models, tick_interval=0.05,
                             flush_interval=0.05)
    rows, _ = data()
    baseline = local("churn_v1")
    rng = random.Random(5)
    fallbacks: set[str] = set()
    reader = open_store(store)
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(100):
            for _ in range(20):
                k = rng.randrange(len(rows))
                r = c.post("/churn", json={"user_id": f"user-{rng.randrange(400)}",
                                           "features": rows[k]})
                assert r.status_code == 200, r.text  # no user sees the candidate's failure
                doc = r.json()
                if rows[k]["mean_radius"] > 15.0:  # the candidate fails on these …
                    assert doc["version"] == "v1" and doc["arm"] == "baseline"
                    assert doc["churn"] == baseline.predict([rows[k]]).outputs[0]  # … v1 answers
                if "x-safeshift-fallback" in r.headers:
                    fallbacks.add(r.headers["x-safeshift-fallback"])
            clock.advance(5)
            time.sleep(0.08)
            if reader.get_state(plan.rollout).phase.terminal:
                break
        assert reader.get_state(plan.rollout).phase is Phase.ROLLED_BACK
        after = {c.post("/churn", json={"user_id": f"user-{i}", "features": rows[i]}
                        ).json()["version"] for i in range(30)}
    decision = reader.decisions(plan.rollout)[-1]
    reader.close()
    assert decision.action is Action.ROLLBACK and "error rate" in decision.reason
    assert "error" in fallbacks  # answered by the baseline, said so in the headers
    assert after == {"v1"}
