"""Small pieces on their own: the breaker, the token bucket, settings, metrics, OpenAPI, logs."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from gateway_helpers import make_plan, running
from prometheus_client.parser import text_string_to_metric_families

from safeshift.gateway import GatewaySettings, create_app
from safeshift.gateway.breaker import BreakerState, CircuitBreaker
from safeshift.gateway.logs import JsonFormatter, request_id_var
from safeshift.gateway.rate_limit import TokenBucket


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_failures_in_the_window_and_probes_half_open() -> None:
    t = FakeTime()
    changes: list[BreakerState] = []
    b = CircuitBreaker(3, window=10, cooldown=5, clock=t, on_change=changes.append)
    for _ in range(2):
        assert b.allow()
        b.record(False)
    t.now = 11  # the first two failures left the window
    assert b.allow()
    b.record(False)
    assert b.state is BreakerState.CLOSED
    for _ in range(2):
        b.record(False)
    assert b.state is BreakerState.OPEN and not b.allow()
    t.now = 15.9
    assert not b.allow()
    t.now = 16.0  # cooldown over: one probe at a time
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()
    b.record(False)  # the probe failed: open again for another cooldown
    assert b.state is BreakerState.OPEN
    t.now = 21.0
    assert b.allow()
    b.abandon()  # a cancelled probe frees the slot
    assert b.allow()
    b.record(True)
    assert b.state is BreakerState.CLOSED and b.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN,
                       BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert b.opened == 2


def test_successes_do_not_reset_the_failure_window() -> None:
    t = FakeTime()
    b = CircuitBreaker(2, window=10, cooldown=5, clock=t)
    b.record(False)
    b.record(True)
    b.record(False)
    assert b.state is BreakerState.OPEN


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=2, now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0  # one token back after half a second
    assert bucket.take(0.5) > 0


def test_settings_from_environment() -> None:
    s = GatewaySettings.from_env({"SAFESHIFT_RATE_LIMIT": "25", "SAFESHIFT_ACCESS_LOG": "off",
                                  "SAFESHIFT_MAX_BODY_BYTES": "2048", "OTHER": "x"})
    assert s.rate_limit == 25.0 and s.access_log is False and s.max_body_bytes == 2048
    assert GatewaySettings.from_env({}).rate_limit is None
    with pytest.raises(ValueError, match="SAFESHIFT_SHADOW_WORKERS"):
        GatewaySettings.from_env({"SAFESHIFT_SHADOW_WORKERS": "many"})
    with pytest.raises(TypeError, match="unknown gateway setting"):
        create_app([make_plan()], auth=False, store="memory://", max_body=5)


def test_metrics_parse_and_each_app_has_its_own_registry() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    other = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        for i in range(6):
            c.post("/v1/endpoints/churn/predict", json={"unit": f"u{i}", "inputs": {"x": 1}})
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("safeshift_requests", "safeshift_request_duration_seconds",
                 "safeshift_fallbacks", "safeshift_breaker_state", "safeshift_stage_index",
                 "safeshift_traffic_share", "safeshift_shadow_copies", "safeshift_stage_info"):
        assert name in families, name
    served = sum(s.value for s in families["safeshift_requests"].samples
                 if s.name == "safeshift_requests_total")
    assert served == 6
    shares = {s.labels["arm"]: s.value for s in families["safeshift_traffic_share"].samples}
    assert shares == {"candidate": 0.5, "baseline": 0.5}
    info = [s.labels for s in families["safeshift_stage_info"].samples]
    assert info == [{"endpoint": "churn", "rollout": "churn-v2", "stage": "canary",
                     "phase": "running"}]
    theirs = text_string_to_metric_families(other.gateway.metrics.exposition().decode())
    assert sum(s.value for f in theirs if f.name == "safeshift_requests"
               for s in f.samples) == 0


def test_openapi_documents_every_route_and_schema() -> None:
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600)
    with running(app) as url:
        doc = httpx.get(f"{url}/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/endpoints/{name}/predict", "/v2/models/{name}/infer", "/v1/feedback",
                 "/v1/reports", "/metrics", "/healthz", "/readyz", "/v2/health/live",
                 "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready"):
        assert path in paths, path
    body = paths["/v1/endpoints/{name}/predict"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"}
    schemas = doc["components"]["schemas"]
    assert "inputs" in schemas["PredictRequest"]["required"]
    assert "422" in paths["/v1/feedback"]["post"]["responses"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + \
                [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):  # every reference resolves
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("safeshift.gateway", logging.WARNING, "x", 1, "hello %s",
                               ("world",), None)
    record.rollout = "r"
    token = request_id_var.set("abc")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello world" and line["request_id"] == "abc"
    assert line["level"] == "warning" and line["rollout"] == "r"


@pytest.mark.parametrize("doc", [
    {"ts": "t", "path": "/v1/é\u2028\"\\\n\x00", "status": 200, "duration_ms": 0.812,
     "client": None, "fallback": False, "given": True, "n": 2**70, "tiny": 1e-05},
    {"nan": float("nan"), "inf": float("-inf"), "zero": -0.0, "list": [1, "x", None],
     "nested": {"a": {"b": 1.5}}, "bytes": b"by", "other": object()},
    {1: "a non-string key", "b": 2}, {},
])
def test_access_log_lines_are_what_json_dumps_writes(doc: dict) -> None:
    from safeshift.gateway.logs import _json_line

    assert _json_line(doc) == json.dumps(doc, default=str, separators=(",", ":"))
