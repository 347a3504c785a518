"""The Python examples of docs/sdk.md work as written: the complete app, saved as ``app.py``
and served (its lifespan run, in process), answers a prediction and takes its label; the
``safeshift.client`` block runs against a real gateway on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ROOT
from tests.gateway.gateway_helpers import running

from safeshift import Plan, ops
from safeshift.auth import Role
from safeshift.client import Client, ClientError
from safeshift.clock import SystemClock
from safeshift.gateway import create_app
from safeshift.store import MemoryStore, open_store

DOC = ROOT / "docs" / "sdk.md"
ROW = {"mean_radius": 12.0, "mean_texture": 18.0, "mean_perimeter": 78.0, "mean_area": 450.0}


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_the_complete_app_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app_block = next(b for b in blocks() if "FastAPI(lifespan=ss.lifespan)" in b)
    (tmp_path / "app.py").write_text(app_block)
    monkeypatch.chdir(tmp_path)  # the store, safeshift.db, and the module lineage finds
    spec = importlib.util.spec_from_file_location("app", tmp_path / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "app", module)
    spec.loader.exec_module(module)
    app = module.app

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            r = await c.post("/tumour", json={"user_id": "u-1", "country": "BR",
                                              "measurements": [17.99, 10.38, 122.8, 1001]})
            fb = await c.post("/safeshift/feedback", json={"id": r.json()["id"], "label": 0})
            return r, fb

    r, fb = asyncio.run(main())
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc == {"id": doc["id"], "malignant": True, "version": "v1"}  # shadow: v1 answers
    assert r.headers["x-request-id"] == doc["id"] and r.headers["x-safeshift-stage"] == "shadow"
    assert fb.status_code == 200 and fb.json()["accepted"] == ["accuracy"]
    store = open_store(str(tmp_path / "safeshift.db"))
    try:
        assert store.get_request(doc["id"]) is not None
        start = store.decisions("tumour-v2")[0]
    finally:
        store.close()
    # the decisions' lineage fingerprints the file the in-memory models live in
    digest = hashlib.sha256((tmp_path / "app.py").read_bytes()).hexdigest()
    assert start.evidence["lineage"]["models"]["candidate"]["sha256"] == digest


def test_the_client_example_runs_against_a_gateway() -> None:
    client_block = next(b for b in blocks() if "from safeshift.client import Client" in b)
    plan = Plan.load(ROOT / "examples" / "churn" / "plan.yaml")
    store = MemoryStore()
    tokens: dict[str, Any] = {}
    for name, role, rights in (("APP_TOKEN", Role.CLIENT, {}),
                               ("LABEL_TOKEN", Role.CLIENT, {"labels": True}),
                               ("OPERATOR_TOKEN", Role.OPERATOR, {})):
        tokens[name], _ = ops.create_token(store, SystemClock(), name=name.lower(), role=role,
                                           expires_in=None, rights=rights)
    app = create_app([plan], store=store, tick_interval=3600, access_log=False)
    with running(app) as url:
        code = client_block.replace("http://127.0.0.1:8000", url)
        namespace: dict[str, Any] = dict(tokens)
        exec(compile(code, str(DOC), "exec"), namespace)
        with Client(url, token=tokens["APP_TOKEN"]) as c:
            ready = c.ready()
            named = c.predict("churn", [ROW, ROW], unit="u-9", request_id="order-1")
            with pytest.raises(ClientError) as taken:
                c.predict("churn", ROW, unit="u-9", request_id="order-1")
        with Client(url, token=tokens["LABEL_TOKEN"]) as c:
            labelled = c.label("order-1", [0, 0])
    answer = namespace["answer"]
    assert answer["outputs"] == [0] and answer["version"] == "v1" and answer["arm"] == "baseline"
    assert ready["endpoints"]["churn"]["rollout"] == "churn-v2"
    assert named["id"] == "order-1" and len(named["outputs"]) == 2
    assert taken.value.status == 409 and "order-1" in str(taken.value)
    assert labelled["id"] == "order-1" and labelled["accepted"] == ["accuracy"]
    rollout = app.gateway.rollouts["churn-v2"]
    assert str(rollout.state().phase) == "paused"  # the operator's pause went through
