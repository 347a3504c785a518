"""The Open Inference Protocol: an unmodified tritonclient against the gateway, and the
parsing of the binary tensor extension."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
import tritonclient.http as httpclient
from gateway_helpers import make_plan, running, units_for
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

from safeshift.assign import BASELINE, CANDIDATE
from safeshift.gateway import create_app, oip
from safeshift.gateway._http import HTTPError
from safeshift.models.python import PythonModel


@pytest.fixture(scope="module")
def sklearn_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    data = load_breast_cancer()
    x, y = data.data[:200], data.target[:200]
    est = LogisticRegression(max_iter=3000).fit(x, y)
    path = tmp_path_factory.mktemp("models") / "lr.joblib"
    joblib.dump({"model": est, "features": [str(f) for f in data.feature_names]}, path)
    return path, x


def test_tritonclient_infers_through_the_gateway(sklearn_models: tuple[Path, np.ndarray]) -> None:
    path, x = sklearn_models
    plan = make_plan(path.parent, baseline={"version": "v1", "model": f"joblib:{path}"},
                     candidate={"version": "v2", "model": "fake:cand?output=7"})
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600)
    base_unit = units_for(app, "churn", BASELINE, 1)[0]
    cand_unit = units_for(app, "churn", CANDIDATE, 1)[0]
    expected = app.gateway.endpoints["churn"].baseline.predict(x[:4].tolist()).outputs
    with running(app) as url:
        client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        try:
            assert client.is_server_live()
            assert client.is_server_ready()
            assert client.is_model_ready("churn")
            assert not client.is_model_ready("nope")
            meta = client.get_model_metadata("churn")
            assert meta["name"] == "churn" and meta["versions"] == ["v1", "v2"]
            assert meta["inputs"][0]["shape"] == [-1, 30]
            # the scikit-learn classifier's classes are integers: declared before any answer
            assert meta["outputs"][0]["datatype"] == "INT64"

            for binary in (True, False):
                inp = httpclient.InferInput("input", [4, 30], "FP32")
                inp.set_data_from_numpy(x[:4].astype(np.float32), binary_data=binary)
                outs = [httpclient.InferRequestedOutput("output", binary_data=binary),
                        httpclient.InferRequestedOutput("score", binary_data=binary)]
                res = client.infer("churn", [inp], outputs=outs, request_id=f"req-{binary}",
                                   headers={"X-Safeshift-Unit": base_unit,
                                            "X-Safeshift-Context-Country": "BR"})
                assert res.as_numpy("output").tolist() == expected
                assert res.get_output("output")["datatype"] == meta["outputs"][0]["datatype"]
                scores = res.as_numpy("score")
                assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))
                response = res.get_response()
                assert response["id"] == f"req-{binary}"
                assert response["model_version"] == "v1"
                assert response["parameters"]["arm"] == "baseline"

            # the defaults: binary input, binary outputs asked for, unit in parameters
            inp = httpclient.InferInput("input", [2, 30], "FP64")
            inp.set_data_from_numpy(x[:2])
            res = client.infer("churn", [inp], parameters={"unit": cand_unit})
            assert res.as_numpy("output").tolist() == [7, 7]
            assert res.get_response()["parameters"]["arm"] == "candidate"

            with pytest.raises(Exception, match="unknown endpoint"):
                client.infer("nope", [inp])
        finally:
            client.close()
    rollout = app.gateway.endpoints["churn"].rollout
    rec = rollout.store.get_request("req-True")
    assert rec is not None and rec.segment == "" and rec.arm == BASELINE


def test_named_columns_become_rows_of_features() -> None:
    seen: list[Any] = []

    def spy(rows: list[Any]) -> list[int]:
        seen.append(list(rows))
        return [1] * len(rows)

    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     models={"churn": {"baseline": PythonModel(spy),
                                       "candidate": PythonModel(spy)}})
    with running(app) as url:
        # a Python model does not declare its output type: BYTES until an answer shows it
        before = httpx.get(f"{url}/v2/models/churn").json()["outputs"][0]["datatype"]
        r = httpx.post(f"{url}/v2/models/churn/infer", json={"inputs": [
            {"name": "age", "shape": [2], "datatype": "INT32", "data": [30, 40]},
            {"name": "country", "shape": [2, 1], "datatype": "BYTES", "data": ["BR", "DE"]}],
            "parameters": {"unit": "anyone", "context.country": "BR"}})
        after = httpx.get(f"{url}/v2/models/churn").json()["outputs"][0]["datatype"]
    assert (before, after) == ("BYTES", "INT64")
    assert r.status_code == 200, r.text
    assert seen == [[{"age": 30, "country": "BR"}, {"age": 40, "country": "DE"}]]
    out = r.json()["outputs"][0]
    assert out == {"name": "output", "datatype": "INT64", "shape": [2], "data": [1, 1]}


def _binary_body(doc: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, str]:
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), str(len(head))


def test_parse_binary_extension_numeric_and_bytes() -> None:
    numbers = np.arange(6, dtype="<f4")
    texts = b"".join(struct.pack("<I", len(t)) + t for t in (b"hello", b"w\xc3\xb6rld"))
    body, n = _binary_body({"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32",
         "parameters": {"binary_data_size": 24}},
    ]}, [numbers.tobytes()])
    req = oip.parse_infer(body, n)
    assert oip.to_rows(req.inputs) == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    body, n = _binary_body({"inputs": [
        {"name": "t", "shape": [2], "datatype": "BYTES",
         "parameters": {"binary_data_size": len(texts)}}]}, [texts])
    assert oip.to_rows(oip.parse_infer(body, n).inputs) == ["hello", "wörld"]


@pytest.mark.parametrize(("doc", "blob", "field"), [
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                  "parameters": {"binary_data_size": 4}}]}, b"\0" * 4,
     "inputs[0].parameters.binary_data_size"),  # 4 bytes for 2 floats
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                  "parameters": {"binary_data_size": 8}}]}, b"\0" * 4,
     "inputs[0].parameters.binary_data_size"),  # claims more than there is
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                  "parameters": {"binary_data_size": 4}}]}, b"\0" * 8, "inputs"),  # left over
])
def test_parse_binary_extension_rejects_inconsistent_sizes(doc: dict[str, Any], blob: bytes,
                                                           field: str) -> None:
    body, n = _binary_body(doc, [blob])
    with pytest.raises(HTTPError) as err:
        oip.parse_infer(body, n)
    assert err.value.status == 422 and err.value.field == field


def test_header_length_outside_the_body_is_refused() -> None:
    with pytest.raises(HTTPError) as err:
        oip.parse_infer(b"{}", "99")
    assert err.value.field == "Inference-Header-Content-Length"


def test_binary_response_round_trips() -> None:
    req = oip.parse_infer(json.dumps({"inputs": [
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        "parameters": {"binary_data_output": True}}).encode(), None)
    body, headers = oip.encode_response(model_name="m", model_version="v", request_id="r",
                                        outputs=[1.5, 2.5], scores=None, request=req,
                                        parameters={})
    hdr = dict(headers)
    n = int(hdr[b"inference-header-content-length"])
    doc = json.loads(body[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(body[n:], "<f8").tolist() == [1.5, 2.5]
