"""The Open Inference Protocol's versioned routes, through an unmodified tritonclient: the
baseline's version always answers (outside the comparison), a candidate's only once promoted,
an unknown version is a 404 in the protocol's error shape."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from gateway_helpers import make_plan, running, units_for
from tritonclient.utils import InferenceServerException

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.gateway import create_app
from safeshift.models.python import PythonModel


def _input(value: float = 1.0, binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput("x", [1], "FP64")
    inp.set_data_from_numpy(np.array([value]), binary_data=binary)
    return inp


def _client(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=url.removeprefix("http://"))


@pytest.mark.parametrize("fast_path", [True, False])
def test_tritonclient_pins_the_baseline_and_cannot_pin_an_unpromoted_candidate(
        fast_path: bool) -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600, fast_path=fast_path)
    cand = units_for(app, "churn", CANDIDATE, 5)
    with running(app) as url:
        client = _client(url)
        try:
            meta = client.get_model_metadata("churn", "v1")
            assert meta["versions"] == ["v1"] and meta["parameters"]["arm"] == "baseline"
            meta = client.get_model_metadata("churn", "v2")
            assert meta["parameters"] == {"rollout": "churn-v2", "stage": "canary",
                                          "arm": "candidate", "pinned_inference": False}
            assert client.is_model_ready("churn", "v1")
            assert not client.is_model_ready("churn", "v2")  # 409: not promoted
            assert not client.is_model_ready("churn", "v9")  # 404
            assert client.is_model_ready("churn")  # the unversioned route is unchanged

            for unit in cand:  # units the rollout gives the candidate still get v1
                for binary in (True, False):
                    result = client.infer("churn", [_input(binary=binary)], model_version="v1",
                                          headers={"X-Safeshift-Unit": unit})
                    response = result.get_response()
                    assert response["model_version"] == "v1"
                    assert response["parameters"]["arm"] == "baseline"
                    assert result.as_numpy("output").tolist() == [1]
            unpinned = client.infer("churn", [_input()], headers={"X-Safeshift-Unit": cand[0]})
            assert unpinned.get_response()["model_version"] == "v2"

            with pytest.raises(InferenceServerException, match="being rolled out"):
                client.infer("churn", [_input()], model_version="v2",
                             headers={"X-Safeshift-Unit": cand[0]})
            with pytest.raises(InferenceServerException, match="has no version 'v9'"):
                client.infer("churn", [_input()], model_version="v9")
            with pytest.raises(InferenceServerException, match="has no version"):
                client.get_model_metadata("churn", "v9")
        finally:
            client.close()


def test_errors_use_the_protocols_shape() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    tensor = {"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}
    with running(app) as url, httpx.Client(base_url=url) as c:
        for path, status, field in [("/v2/models/churn/versions/v9/infer", 404, "version"),
                                    ("/v2/models/nope/versions/v1/infer", 404, "name"),
                                    ("/v2/models/churn/versions/v2/infer", 409, "version")]:
            r = c.post(path, json={"inputs": [tensor]})
            assert r.status_code == status and r.json()["field"] == field
            assert isinstance(r.json()["error"], str)
        assert c.get("/v2/models/churn/versions/v9").status_code == 404
        assert c.get("/v2/models/churn/versions/v9/ready").status_code == 404
        r = c.get("/v2/models/churn/versions/v2/ready")
        assert r.status_code == 409 and r.json() == {"name": "churn", "version": "v2",
                                                     "ready": False}
        # a pinned request's id must be fresh like any other
        assert c.post("/v2/models/churn/versions/v1/infer",
                      json={"id": "p-1", "inputs": [tensor]}).status_code == 200
        r = c.post("/v2/models/churn/versions/v1/infer", json={"id": "p-1", "inputs": [tensor]})
        assert r.status_code == 409 and r.json()["field"] == "id"


def test_pinned_requests_are_counted_outside_the_comparison_and_take_feedback() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    cand = units_for(app, "churn", CANDIDATE, 3)
    base = units_for(app, "churn", BASELINE, 3)
    tensor = {"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}
    with running(app) as url, httpx.Client(base_url=url) as c:
        for unit in cand + base:
            r = c.post("/v2/models/churn/versions/v1/infer",
                       json={"id": f"pin-{unit}", "inputs": [tensor],
                             "parameters": {"unit": unit}})
            assert r.status_code == 200 and r.json()["model_version"] == "v1"
        fb = c.post("/v1/feedback", json={"id": f"pin-{cand[0]}", "label": 1}).json()
        assert fb["arm"] == "baseline" and fb["accepted"] == ["accuracy"]
    rows = [r for r in rollout.store.telemetry("churn-v2", 0) if r.signal == "requests"]
    assert {(r.arm, r.cohort) for r in rows} == {(BASELINE, "excluded")}
    assert sum(r.n for r in rows) == 6
    assert rollout.store.get_request(f"pin-{base[0]}").cohort == "excluded"


def test_pinned_requests_with_bad_inputs_are_request_faults_like_any_other() -> None:
    """The pinned route runs the same serving steps: inputs the baseline rejects are a 422 and
    a request fault (in /metrics and the store), never a model error, and leave no record."""
    def needs_x(rows: list[Any]) -> list[Any]:
        return [row["x"] for row in rows]

    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     models={"churn": {"baseline": PythonModel(needs_x)}})
    rollout = app.gateway.endpoints["churn"].rollout
    wrong = {"name": "y", "shape": [1], "datatype": "FP64", "data": [1.0]}
    with running(app) as url, httpx.Client(base_url=url) as c:
        r = c.post("/v2/models/churn/versions/v1/infer", json={"id": "bad-1", "inputs": [wrong]})
        assert r.status_code == 422 and "rejected the inputs" in r.json()["error"]
        metrics = c.get("/metrics").text
    assert 'safeshift_request_faults_total{arm="baseline",endpoint="churn"} 1.0' in metrics
    app.gateway.flush_all()
    rows = rollout.store.telemetry("churn-v2", 0)
    assert sum(r.n for r in rows if r.signal == "request_fault") == 1
    assert not any(r.signal == "error_rate" and r.s > 0 for r in rows)
    assert rollout.store.get_request("bad-1") is None


def test_a_promoted_candidate_can_be_pinned() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    rollout = app.gateway.endpoints["churn"].rollout
    with running(app) as url:
        rollout.promote(actor="test", reason="the candidate is better")
        client = _client(url)
        try:
            assert client.is_model_ready("churn", "v2")
            assert client.get_model_metadata("churn", "v2")["parameters"]["pinned_inference"]
            result = client.infer("churn", [_input()], model_version="v2")
            assert result.get_response()["model_version"] == "v2"
            assert result.as_numpy("output").tolist() == [2]
            old = client.infer("churn", [_input()], model_version="v1")  # still loaded here
            assert old.get_response()["model_version"] == "v1"
        finally:
            client.close()


def _rolled_back(app: Any) -> None:
    app.gateway.endpoints["churn"].rollout.rollback(actor="test", reason="harm")


def test_a_rolled_back_candidate_cannot_be_pinned() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        _rolled_back(app)
        tensor = {"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}
        r = c.post("/v2/models/churn/versions/v2/infer", json={"inputs": [tensor]})
        assert r.status_code == 409 and "rolled back" in r.json()["error"]
        assert c.post("/v2/models/churn/versions/v1/infer",
                      json={"inputs": [tensor]}).status_code == 200
