"""Bodies that are not RFC 8259 JSON, or nest too deep, get a 422 naming the problem on every
POST route — fast path and FastAPI routes alike — and nothing is counted or stored."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, running, units_for

from safeshift.assign import BASELINE
from safeshift.gateway import create_app
from safeshift.gateway._http import HTTPError
from safeshift.gateway.bodies import MAX_DEPTH, load_json

P = "/v1/endpoints/churn/predict"
INF = "/v2/models/churn/infer"
PINNED = "/v2/models/churn/versions/v1/infer"
F = "/v1/feedback"
R = "/v1/reports"
ROUTES = [P, INF, PINNED, F, R]
HEADER = "inference-header-content-length"


def nested(depth: int, kind: str = "list") -> bytes:
    """A JSON value nested ``depth`` levels: ``[[...[1]...]]`` or ``{"a":{"a":...1...}}``."""
    if kind == "list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "fastapi"])
def served(request: pytest.FixtureRequest) -> Any:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     fast_path=request.param)
    with running(app) as url, httpx.Client(base_url=url) as client:
        yield app, client


def _requests(app: Any) -> float:
    rollout = app.gateway.endpoints["churn"].rollout
    app.gateway.flush_all()
    return sum(r.n for r in rollout.store.telemetry("churn-v2", 0) if r.signal == "requests")


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("path", ROUTES)
def test_2000_deep_json_is_a_422_naming_the_limit(served: Any, path: str, kind: str) -> None:
    app, c = served
    body = nested(2000, kind)
    assert len(body) <= 12_001  # 4 KB as lists, 12 KB as objects
    before = _requests(app)
    r = c.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["field"] == "body" and "too deep" in doc["error"]
    assert str(MAX_DEPTH) in doc["error"]
    assert _requests(app) == before


def test_deep_json_inside_a_valid_document_is_refused_too(served: Any) -> None:
    _, c = served
    inner = json.loads(nested(MAX_DEPTH))  # inside the body object and the inputs list: 66 deep
    r = c.post(P, json={"inputs": [inner]})
    assert r.status_code == 422 and r.json()["field"] == "body"
    ok = c.post(P, json={"inputs": [json.loads(nested(MAX_DEPTH - 2))]})  # 64: the limit
    assert ok.status_code == 200, ok.text


def test_deep_json_on_the_binary_extension_path(served: Any) -> None:
    """tritonclient's binary requests: the JSON header is parsed by the same parser."""
    _, c = served
    head = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP64","parameters":' + \
        nested(2000, "object") + b"}]}"
    for path in (INF, PINNED):
        r = c.post(path, content=head + b"\x00" * 8, headers={HEADER: str(len(head))})
        assert r.status_code == 422, r.text
        assert "too deep" in r.json()["error"]


NON_JSON: list[tuple[str, bytes, str]] = [
    (P, b'{"inputs": {"x": NaN}}', "inputs.x"),
    (P, b'{"inputs": [{"x": 1}, {"x": -Infinity}]}', "inputs[1].x"),
    (P, b'{"inputs": {"x": 1}, "context": {"country": Infinity}}', "context.country"),
    (P, b'{"inputs": {"x": 1e999}}', "inputs.x"),
    (INF, b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1.0, NaN]}]}',
     "inputs[0].data[1]"),
    (INF, b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}], '
          b'"parameters": {"context.score": -Infinity}}', "parameters.context.score"),
    (PINNED, b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [Infinity]}]}',
     "inputs[0].data[0]"),
    (F, b'{"id": "r1", "outcome": {"revenue": Infinity}}', "outcome.revenue"),
    (F, b'[{"id": "r1", "label": 1}, {"id": "r2", "outcome": {"revenue": NaN}}]',
     "[1].outcome.revenue"),
    (F, b'{"id": "r1", "label": NaN}', "label"),
    (F, b'{"id": "r1", "label": [1, -Infinity]}', "label[1]"),
    (R, b'{"id": "r1", "kind": "bad", "text": NaN}', "text"),
    (F, b"NaN", "body"),
]


@pytest.mark.parametrize(("path", "body", "field"), NON_JSON)
def test_nan_and_infinity_are_refused_naming_the_field(served: Any, path: str, body: bytes,
                                                       field: str) -> None:
    app, c = served
    before = _requests(app)
    r = c.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["field"] == field
    literal = next(x for x in ("-Infinity", "Infinity", "NaN", "1e999") if x.encode() in body)
    assert literal in doc["error"] and "finite number" in doc["error"]
    assert _requests(app) == before


def test_the_binary_extension_header_refuses_nan_naming_the_field(served: Any) -> None:
    _, c = served
    head = (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP64",'
            b'"parameters":{"binary_data_size":8}}],"parameters":{"unit":"u","context.x":NaN}}')
    r = c.post(INF, content=head + b"\x00" * 8, headers={HEADER: str(len(head))})
    assert r.status_code == 422
    assert r.json()["field"] == "parameters.context.x" and "NaN" in r.json()["error"]


def test_refused_feedback_stores_nothing(served: Any) -> None:
    app, c = served
    unit = units_for(app, "churn", BASELINE, 1, prefix="nan")[0]
    rid = c.post(P, json={"unit": unit, "inputs": {"x": 1}}).json()["id"]
    r = c.post(F, content=b'[{"id": "%s", "label": 1}, {"id": "%s", "outcome": {"rev": NaN}}]'
               % (rid.encode(), rid.encode()))
    assert r.status_code == 422 and r.json()["field"] == "[1].outcome.rev"
    again = c.post(F, json={"id": rid, "label": 1}).json()
    assert again["accepted"] == ["accuracy"] and again["duplicate"] == []  # the first was not kept


@pytest.mark.parametrize(("body", "field"), [
    (b'{"a": NaN}', "a"), (b'{"a": [0, {"b": Infinity}]}', "a[1].b"), (b"[-Infinity]", "[0]"),
    (b'{"a": 1e400}', "a"), (b'{"a": 1E+309}', "a"), (b'{"a": ' + b"9" * 400 + b"}", "a"),
    (b'{"a": -' + b"9" * 400 + b".5}", "a"), (b'{"a": NaN, "b": }', "body"),
])
def test_load_json_refuses_what_rfc_8259_and_a_float_cannot_hold(body: bytes, field: str) -> None:
    with pytest.raises(HTTPError) as caught:
        load_json(body, "x")
    assert caught.value.status == 422 and caught.value.field == field


@pytest.mark.parametrize("body", [
    b'{"a": 1e308}', b'{"a": 1e-400}', b'{"a": "NaN 1e999 Infinity"}', b'{"type1234": 5}',
    b'{"a": ' + b"9" * 300 + b"}", b"\xef\xbb\xbf[1]", nested(MAX_DEPTH), nested(MAX_DEPTH, "object"),
    b'["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]',
])
def test_load_json_accepts_standard_json(body: bytes) -> None:
    assert load_json(body, "x") == json.loads(body)


@pytest.mark.parametrize("body", [nested(MAX_DEPTH + 1), nested(MAX_DEPTH + 1, "object"),
                                  nested(100_000)])
def test_load_json_bounds_the_nesting(body: bytes) -> None:
    with pytest.raises(HTTPError) as caught:
        load_json(body, "x")
    assert caught.value.field == "body" and "too deep" in caught.value.message


@pytest.mark.parametrize("body", [
    str(2**63 - 1).encode(), str(2**64).encode(), str(-(2**63) - 1).encode(),
    b'{"unit": 18446744073709551616, "inputs": {"x": 123456789012345678901234567890}}',
    b'["\\ud800", "\\udc00x", "\\ud83d\\ude00"]', b'{"a": 1, "a": 2}', b'{"a": -0.0, "b": -0}',
    b'[0.1, 1.7976931348623157e308, 5e-324, 1E5, 2.5e-7]', '["é"]'.encode("utf-16"),
    b'{"\\u00e9": "caf\xc3\xa9"}',
])
def test_load_json_reads_what_json_reads(body: bytes) -> None:
    """Numbers beyond 64 bits stay exact integers, lone surrogates and other encodings are
    read, whichever parser reads the body."""
    doc = load_json(body, "x")
    assert doc == json.loads(body) and repr(doc) == repr(json.loads(body))
