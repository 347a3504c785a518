"""HTTP model backends against real upstream servers on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from gateway_helpers import free_socket, make_plan, running, units_for
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from safeshift.assign import CANDIDATE
from safeshift.errors import ModelLoadError
from safeshift.gateway import create_app
from safeshift.models import load_model
from safeshift.models.http import MLflowModel, OIPModel

CALLS: list[dict[str, Any]] = []


async def oip_infer(request: Request) -> JSONResponse:
    doc = await request.json()
    CALLS.append(doc)
    name = request.path_params["name"]
    if name == "broken":
        return JSONResponse({"error": "model exploded"}, 500)
    if name == "slow":
        await asyncio.sleep(1.0)
    if name == "nan":
        return JSONResponse({"model_name": name, "outputs": [
            {"name": "output", "datatype": "FP64", "shape": [1], "data": ["NaN"]}]})
    first = doc["inputs"][0]
    n = first["shape"][0]
    if first["name"] == "input":  # rows of values: answer the sum of each row
        width = first["shape"][1] if len(first["shape"]) > 1 else 1
        data = first["data"]
        out = [sum(data[i * width:(i + 1) * width]) for i in range(n)]
    else:  # named columns: answer the first column
        out = first["data"]
    return JSONResponse({"model_name": name, "model_version": "1", "outputs": [
        {"name": "output", "datatype": "FP64", "shape": [n], "data": out},
        {"name": "score", "datatype": "FP64", "shape": [n, 1], "data": [0.5] * n}]})


async def invocations(request: Request) -> JSONResponse:
    doc = await request.json()
    CALLS.append(doc)
    if "dataframe_split" in doc:
        cols = doc["dataframe_split"]["columns"]
        rows = doc["dataframe_split"]["data"]
        return JSONResponse({"predictions": [f"{cols[0]}={r[0]}" for r in rows]})
    return JSONResponse({"predictions": [len(r) for r in doc["inputs"]]})


def arun(model: Any, rows: Any) -> Any:
    """``apredict`` on a fresh loop, closing the async client on that same loop."""

    async def go() -> Any:
        try:
            return await model.apredict(rows)
        finally:
            await model.aclose()

    return asyncio.run(go())


UPSTREAM = Starlette(routes=[Route("/v2/models/{name}/infer", oip_infer, methods=["POST"]),
                             Route("/invocations", invocations, methods=["POST"])])


@pytest.fixture(scope="module")
def upstream() -> Any:
    with running(UPSTREAM) as url:
        yield url


def test_oip_backend_sync_and_async(upstream: str) -> None:
    model = load_model(f"oip:{upstream}#summer")
    assert isinstance(model, OIPModel)
    try:
        res = model.predict([[1, 2, 3], [4, 5, 6]])
        assert res.ok and res.outputs == [6.0, 15.0] and res.scores == [0.5, 0.5]
        assert CALLS[-1]["inputs"][0] == {"name": "input", "shape": [2, 3], "datatype": "INT64",
                                          "data": [1, 2, 3, 4, 5, 6]}
        res = arun(model, [{"age": 30.5, "country": "BR"}])
        assert res.ok and res.outputs == [30.5]
        assert [i["name"] for i in CALLS[-1]["inputs"]] == ["age", "country"]
        assert CALLS[-1]["inputs"][1]["datatype"] == "BYTES"
    finally:
        model.close()


@pytest.mark.parametrize("scheme", ["mlflow-server", "mlflow"])  # and its older name
def test_mlflow_backend(upstream: str, scheme: str) -> None:
    model = load_model(f"{scheme}:{upstream}")
    assert isinstance(model, MLflowModel) and model.name == f"{scheme}:{upstream}"
    try:
        assert model.predict([{"a": 1, "b": 2}, {"a": 3, "b": 4}]).outputs == ["a=1", "a=3"]
        assert CALLS[-1] == {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}
        assert arun(model, [[1, 2, 3]]).outputs == [3]
    finally:
        model.close()


@pytest.mark.parametrize(("ref", "needle", "timed_out"), [
    ("oip:{u}#broken", "HTTP 500", False),
    ("oip:{u}?timeout=0.2#slow", "timed out", True),
    ("oip:{u}#nan", "non-finite", False),
    ("oip:{u}?retries=0#missing/x", "HTTP 404", False),
])
def test_upstream_failures_are_results_not_exceptions(upstream: str, ref: str, needle: str,
                                                      timed_out: bool) -> None:
    model = load_model(ref.format(u=upstream))
    try:
        for res in (model.predict([[1.0]]), arun(model, [[1.0]])):
            assert not res.ok and needle in (res.error or "")
            assert res.timed_out is timed_out
    finally:
        model.close()


def test_connection_failures_are_retried_with_backoff_and_reported() -> None:
    sock = free_socket()  # bound, not listening: connections are refused
    port = sock.getsockname()[1]
    try:
        model = load_model(f"oip:http://127.0.0.1:{port}?retries=2&backoff=0.05#m")
        assert isinstance(model, OIPModel)
        start = time.perf_counter()
        res = model.predict([[1.0]])
        took = time.perf_counter() - start
        assert not res.ok and "ConnectError" in (res.error or "")
        assert model.attempts == 3 and took >= 0.05 + 0.1  # backoff 50 ms, then 100 ms
        res = arun(model, [[1.0]])
        assert not res.ok and model.attempts == 6
        model.close()
    finally:
        sock.close()


def test_a_read_timeout_is_not_retried(upstream: str) -> None:
    CALLS.clear()
    model = load_model(f"oip:{upstream}?timeout=0.2&retries=3#slow")
    try:
        assert model.predict([[1.0]]).timed_out
    finally:
        model.close()
    assert len(CALLS) == 1 and isinstance(model, OIPModel) and model.attempts == 1


def test_loading_does_not_connect_and_bad_references_fail_clearly() -> None:
    model = load_model("oip:http://127.0.0.1:9#m")  # nothing listens there
    model.close()
    for ref, needle in [("oip:http://127.0.0.1:9", "name the model"),
                        ("oip:ftp://x#m", r"http\(s\) URL"),
                        ("oip:http://h:1?tmeout=1#m", "unknown option"),
                        ("oip:http://h:1?timeout=-1#m", "not valid"),
                        ("mlflow-server:http://h:1#m", "one model"),
                        ("mlflow:http://h:1#m", "one model")]:
        with pytest.raises(ModelLoadError, match=needle):
            load_model(ref)


def test_http_loaders_register_lazily_in_a_fresh_interpreter() -> None:
    code = ("import sys; from safeshift.models import load_model; "
            "assert 'safeshift.models.http' not in sys.modules; "
            "m = load_model('mlflow-server:http://127.0.0.1:9'); print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "MLflowModel"


def test_gateway_with_an_oip_candidate_upstream(upstream: str) -> None:
    plan = make_plan(candidate={"version": "v2", "model": f"oip:{upstream}#summer"})
    app = create_app([plan], auth=False, store="memory://", tick_interval=3600)
    unit = units_for(app, "churn", CANDIDATE, 1)[0]
    with running(app) as url:
        r = httpx.post(f"{url}/v1/endpoints/churn/predict",
                       json={"unit": unit, "inputs": [[1, 2], [3, 4]]})
    body = r.json()
    assert body["arm"] == "candidate" and body["outputs"] == [3.0, 7.0]
    assert body["scores"] == [0.5, 0.5]
