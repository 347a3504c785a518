"""The in-process SDK (:mod:`safeshift.integrations.starlette`): an app's own models served
through the gateway's serving core — assignment, fallback, breaker, request faults, request
ids, feedback validation — and its FastAPI and Starlette faces."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
from fastapi import Depends, FastAPI
from sklearn.linear_model import LogisticRegression
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from safeshift import MemoryStore, Plan, VirtualClock
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.errors import ModelLoadError
from safeshift.integrations.starlette import Safeshift, Serve, ServingError, as_backend
from safeshift.models import PythonModel, SklearnModel
from safeshift.state import Phase
from safeshift.store import Store

T = TypeVar("T")


def plan(**overrides: Any) -> Plan:
    doc: dict[str, Any] = {
        "rollout": "score-v2", "endpoint": "score",
        "baseline": {"version": "v1", "model": "fake:base"},
        "candidate": {"version": "v2", "model": "fake:cand", "timeout": "200ms"},
        "change": {"summary": "the app's own models"}, "unit": "user_id",
        "segments": ["country"],
        "stages": [{"name": "canary", "traffic": "50%", "min_duration": "1h"},
                   {"name": "full", "traffic": "100%"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.01},
                       {"metric": "basket", "source": "feedback", "range": [0, 100],
                        "tolerance": 5}],
    }
    doc.update(overrides)
    return Plan.from_dict(doc)


def double(rows: list[Any]) -> list[Any]:
    return [2 * row["x"] for row in rows]  # KeyError on a row without "x": the request's fault


def triple(rows: list[Any]) -> list[Any]:
    return [3 * row["x"] for row in rows]


def run(ss: Safeshift, body: Callable[[], Awaitable[T]]) -> T:
    """``body()`` with ``ss`` started, on a fresh event loop; stopped afterwards."""
    async def main() -> T:
        async with ss.lifespan():
            return await body()
    return asyncio.run(main())


def against(app: Any, body: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    """``body(client)`` against ``app`` in process (its lifespan run around it)."""
    async def main() -> T:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return await body(c)
    return asyncio.run(main())


@pytest.fixture
def store() -> Iterator[Store]:
    st = MemoryStore()
    yield st
    st.close()


def test_the_apps_own_models_answer_by_arm_and_every_request_is_recorded(store: Store) -> None:
    ss = Safeshift(plan(), store=store, models={"baseline": double, "candidate": triple},
                   tick_interval=3600)

    async def body() -> tuple[list[Any], list[str]]:
        answers = [await ss.predict({"x": i}, unit=f"u{i}", context={"country": "BR"})
                   for i in range(200)]
        await ss.flush()
        return answers, [ss.rollout.assign(f"u{i}", None).arm for i in range(200)]

    answers, assigned = run(ss, body)
    arms = {a.arm for a in answers}
    assert arms == {BASELINE, CANDIDATE}  # 50 %: both arms serve
    for i, a in enumerate(answers):
        assert a.outputs == [(2 if a.arm == BASELINE else 3) * i]
        assert a.version == ("v1" if a.arm == BASELINE else "v2")
        assert a.stage == "canary" and a.fallback is None
    records = store.get_requests([a.id for a in answers])
    assert len(records) == 200
    assert {records[a.id].arm for a in answers} == arms
    assert all(records[a.id].arm == a.arm for a in answers)
    # the same assignment as the rollout's own (sticky per unit)
    assert [a.arm for a in answers] == assigned


def test_a_failing_candidate_never_reaches_users_and_its_breaker_opens(store: Store) -> None:
    calls = {"n": 0}

    def broken(rows: list[Any]) -> list[Any]:
        calls["n"] += 1
        raise RuntimeError("candidate bug")

    p = plan(serving={"breaker_failures": 5, "breaker_window": "1h", "breaker_cooldown": "1h"})
    ss = Safeshift(p, store=store, models={"baseline": double, "candidate": broken},
                   tick_interval=3600)

    async def body() -> tuple[list[Any], list[str]]:
        answers = [await ss.predict({"x": i}, unit=f"u{i}") for i in range(120)]
        await ss.flush()
        return answers, [ss.rollout.assign(f"u{i}", None).arm for i in range(120)]

    answers, assigned = run(ss, body)
    on_candidate = [a for a, arm in zip(answers, assigned, strict=True) if arm == CANDIDATE]
    assert len(on_candidate) > 20
    for i, a in enumerate(answers):
        assert a.outputs == [2 * i] and a.arm == BASELINE and a.version == "v1"
    reasons = [a.fallback for a in on_candidate]
    assert reasons[:5] == ["error"] * 5  # the first five failures open the breaker …
    assert set(reasons[5:]) == {"breaker_open"}  # … which stops calling the candidate
    assert calls["n"] == 5
    errors = [r for r in store.telemetry("score-v2") if r.signal == "error_rate" and r.arm == CANDIDATE]
    assert sum(r.s for r in errors) >= 5  # counted against the candidate


def test_inputs_both_models_reject_are_the_requests_fault(store: Store) -> None:
    ss = Safeshift(plan(), store=store, models={"baseline": double, "candidate": triple},
                   tick_interval=3600)

    async def body() -> tuple[ServingError, Any]:
        with pytest.raises(ServingError) as caught:
            await ss.predict({"y": 1}, unit="u1", request_id="order-1")
        # no record was left, so the id is free again
        again = await ss.predict({"x": 1}, unit="u1", request_id="order-1")
        await ss.flush()
        return caught.value, again

    err, again = run(ss, body)
    assert err.status == 422 and err.field == "inputs"
    assert "rejected the inputs" in err.message and "KeyError" in err.message
    assert again.id == "order-1"
    faults = [r for r in store.telemetry("score-v2") if r.signal == "request_fault"]
    assert sum(r.s for r in faults) == 1
    errors = [r for r in store.telemetry("score-v2") if r.signal == "error_rate"]
    assert sum(r.s for r in errors) == 0


def test_a_callers_request_id_names_one_request(store: Store) -> None:
    ss = Safeshift(plan(), store=store, models={"baseline": double, "candidate": triple},
                   tick_interval=3600)

    async def body() -> ServingError:
        await ss.predict({"x": 1}, unit="u1", request_id="order-7")
        with pytest.raises(ServingError) as caught:
            await ss.predict({"x": 2}, unit="u2", request_id="order-7")
        return caught.value

    err = run(ss, body)
    assert err.status == 409 and err.field == "id" and "order-7" in err.message


@pytest.mark.parametrize(("inputs", "field"), [([], "inputs"), (None, "inputs"),
                                                ([{"x": 1}, None], "inputs[1]"), (7, "inputs")])
def test_inputs_the_gateway_would_refuse_are_422_before_any_model(store: Store, inputs: Any,
                                                                  field: str) -> None:
    ss = Safeshift(plan(), store=store, models={"baseline": double, "candidate": triple},
                   tick_interval=3600)

    async def body() -> ServingError:
        with pytest.raises(ServingError) as caught:
            await ss.predict(inputs, unit="u1")
        return caught.value

    err = run(ss, body)
    assert err.status == 422 and err.field == field


def test_feedback_is_validated_and_joined_as_the_gateways(store: Store) -> None:
    ss = Safeshift(plan(), store=store, models={"baseline": double, "candidate": triple},
                   tick_interval=3600)

    async def body() -> dict[str, Any]:
        a = await ss.predict({"x": 1}, unit="u1")
        out: dict[str, Any] = {"answer": a}
        for name, kwargs in (("nan", {"label": math.nan}),
                             ("range", {"outcome": {"basket": 250.0}}),
                             ("inf", {"outcome": {"basket": math.inf}}),
                             ("nothing", {})):
            with pytest.raises(ServingError) as caught:
                await ss.feedback(a.id, **kwargs)
            out[name] = caught.value
        with pytest.raises(ServingError) as caught:
            await ss.feedback("never-served", outcome={"basket": 3.0})
        out["unknown"] = caught.value
        out["ok"] = await ss.feedback(a.id, outcome={"basket": 42.0})
        out["again"] = await ss.feedback(a.id, outcome={"basket": 42.0})
        out["report"] = await ss.report(a.id, "wrong_answer", "that is not my basket")
        return out

    out = run(ss, body)
    assert out["nan"].status == 422
    assert out["range"].status == 422 and out["range"].field == "outcome.basket"
    assert "100" in out["range"].message  # names the declared range
    assert out["inf"].status == 422
    assert out["nothing"].status == 422 and out["nothing"].field == "label"
    assert out["unknown"].status == 404 and out["unknown"].field == "id"
    assert out["ok"]["accepted"] == ["basket"] and out["ok"]["arm"] == out["answer"].arm
    assert out["again"]["accepted"] == [] and out["again"]["duplicate"] == ["basket"]
    assert out["report"]["accepted"] is True
    rows = [r for r in store.telemetry("score-v2") if r.signal == "basket"]
    assert sum(r.n for r in rows) == 1 and sum(r.s for r in rows) == 42.0


def test_before_start_it_says_how_to_start() -> None:
    ss = Safeshift(plan(), store=MemoryStore(), models={"baseline": double})
    assert not ss.started
    with pytest.raises(RuntimeError, match=r"lifespan"):
        asyncio.run(ss.predict({"x": 1}))


def test_models_for_an_arm_the_plan_lacks_are_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"no arm 'challenger'.*baseline, candidate"):
        Safeshift(plan(), store=MemoryStore(), models={"challenger": double})


def test_as_backend_takes_estimators_bundles_objects_and_functions() -> None:
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]])
    est = LogisticRegression().fit(x, [0, 1, 0, 1])
    assert isinstance(as_backend(est), SklearnModel)
    bundle = as_backend({"model": est, "features": ["a", "b"]})
    assert isinstance(bundle, SklearnModel)
    assert bundle.predict([{"a": 1.0, "b": 0.0}]).outputs == [1]
    assert isinstance(as_backend(double), PythonModel)
    already = PythonModel(triple)
    assert as_backend(already) is already
    with pytest.raises(ModelLoadError, match="not a model"):
        as_backend(42, "baseline")


def _fastapi_app(store: Store) -> tuple[FastAPI, Safeshift]:
    ss = Safeshift(plan(), store=store, models={"baseline": double, "candidate": triple},
                   tick_interval=3600)
    app = FastAPI(lifespan=ss.lifespan)
    ss.install(app)
    app.include_router(ss.router(prefix="/ss"))

    @app.post("/score/{user}")
    async def score(user: str, row: dict[str, Any], serve: Serve = Depends(ss.serve)
                    ) -> dict[str, Any]:
        answer = await serve(row, unit=user)
        return {"id": answer.id, "value": answer.outputs[0], "arm": answer.arm}

    return app, ss


def test_the_fastapi_dependency_sets_the_gateways_headers_and_takes_x_request_id(
        store: Store) -> None:
    app, ss = _fastapi_app(store)

    async def body(c: httpx.AsyncClient) -> dict[str, httpx.Response]:
        out = {"first": await c.post("/score/u1", json={"x": 2})}
        doc = out["first"].json()
        out["given"] = await c.post("/score/u2", json={"x": 2}, headers={"x-request-id": "order-9"})
        out["taken"] = await c.post("/score/u3", json={"x": 2}, headers={"x-request-id": "order-9"})
        out["odd"] = await c.post("/score/u4", json={"x": 2},
                                  headers={"x-request-id": "not a token!"})
        out["rejected"] = await c.post("/score/u5", json={"y": 2})
        out["fb"] = await c.post("/ss/feedback", json={"id": "order-9", "outcome": {"basket": 10}})
        out["batch"] = await c.post("/ss/feedback", json=[
            {"id": doc["id"], "outcome": {"basket": 1}}, {"id": "order-9", "outcome": {"basket": 500}}])
        out["garbled"] = await c.post("/ss/feedback", content=b"{nope")
        out["report"] = await c.post("/ss/reports", json={"id": doc["id"], "kind": "wrong_answer"})
        out["unknown"] = await c.post("/ss/reports", json={"id": "nope", "kind": "x"})
        assert ss.rollout.state().phase is Phase.RUNNING
        return out

    out = against(app, body)
    r = out["first"]
    doc = r.json()
    assert r.status_code == 200
    assert r.headers["x-request-id"] == doc["id"]
    assert r.headers["x-safeshift-arm"] == doc["arm"]
    assert r.headers["x-safeshift-version"] == ("v1" if doc["arm"] == BASELINE else "v2")
    assert r.headers["x-safeshift-stage"] == "canary"
    given = out["given"]
    assert given.json()["id"] == "order-9" and given.headers["x-request-id"] == "order-9"
    assert out["taken"].status_code == 409
    assert out["taken"].json()["field"] == "X-Request-ID"
    odd = out["odd"]
    assert odd.status_code == 200 and odd.json()["id"] != "not a token!"  # replaced
    assert out["rejected"].status_code == 422
    assert out["rejected"].json()["field"] == "inputs"  # the gateway's body: error and field
    assert out["fb"].status_code == 200 and out["fb"].json()["accepted"] == ["basket"]
    assert out["batch"].status_code == 422
    assert out["batch"].json()["field"] == "[1].outcome.basket"
    assert out["garbled"].status_code == 422
    assert out["report"].status_code == 200 and out["report"].json()["accepted"] is True
    assert out["unknown"].status_code == 404
    assert not ss.started  # the lifespan stopped it
    assert store.get_request("order-9") is not None


def test_without_install_a_refusal_is_still_its_status() -> None:
    ss = Safeshift(plan(), store=MemoryStore(), models={"baseline": double, "candidate": triple},
                   tick_interval=3600)
    app = FastAPI(lifespan=ss.lifespan)

    @app.post("/score")
    async def score(row: dict[str, Any]) -> dict[str, Any]:
        return {"value": (await ss.predict(row, unit="u1")).outputs[0]}

    r = against(app, lambda c: c.post("/score", json={"y": 1}))
    assert r.status_code == 422 and "rejected the inputs" in r.json()["detail"]


def test_a_plain_starlette_app(store: Store) -> None:
    ss = Safeshift(plan(), store=store, models={"baseline": double, "candidate": triple},
                   tick_interval=3600)

    async def score(request: Request) -> JSONResponse:
        answer = await ss.predict(await request.json(), unit=request.path_params["user"])
        return JSONResponse({"id": answer.id, "value": answer.outputs[0]},
                            headers=ss.headers(answer))

    app = Starlette(routes=[Route("/score/{user}", score, methods=["POST"])],
                    lifespan=ss.lifespan)
    ss.install(app)

    async def body(c: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        return await c.post("/score/u1", json={"x": 5}), await c.post("/score/u1", json={"z": 5})

    r, bad = against(app, body)
    assert r.status_code == 200 and r.json()["value"] in (10, 15)
    assert r.headers["x-request-id"] == r.json()["id"]
    assert bad.status_code == 422 and bad.json()["field"] == "inputs"
    assert store.get_request(r.json()["id"]) is not None  # flushed when the app stopped


def test_tick_and_status_drive_the_rollout_on_a_virtual_clock(store: Store) -> None:
    clock = VirtualClock(1_700_000_000.0)
    p = plan(stages=[{"name": "canary", "traffic": "50%", "min_duration": "1m",
                      "min_samples": 50},
                     {"name": "full", "traffic": "100%"}],
             guardrails=[{"metric": "error_rate", "tolerance": 0.05}])
    ss = Safeshift(p, store=store, models={"baseline": double, "candidate": double},
                   clock=clock, tick_interval=3600)

    async def body() -> tuple[Any, list[Any], Any]:
        before = await ss.status()
        decisions = []
        for step in range(40):
            for i in range(20):
                await ss.predict({"x": i}, unit=f"u{step}-{i}")
            clock.advance(10)
            decisions += await ss.tick()
            if ss.rollout.state().phase.terminal:
                break
        return before, decisions, await ss.status()

    before, decisions, after = run(ss, body)
    assert before.phase is Phase.RUNNING and before.stage == "canary"
    assert [d.phase for d in decisions] == [Phase.PROMOTED]
    assert after.phase is Phase.PROMOTED
