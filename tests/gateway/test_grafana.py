"""The Grafana dashboard shipped with the package names only metrics /metrics exposes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import httpx
from gateway_helpers import make_plan, running
from prometheus_client.parser import text_string_to_metric_families

from safeshift.gateway import create_app

_NAME = re.compile(r"\bsafeshift_[a-z_]+")
_SUFFIXES = {"_bucket": {"histogram"}, "_count": {"histogram", "summary"},
             "_sum": {"histogram", "summary"}, "_total": {"counter"}}
"""A series name's suffix, and the metric types that expose it."""


def _dashboard() -> dict[str, object]:
    text = resources.files("safeshift").joinpath("data", "grafana-dashboard.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


def _expressions(dashboard: dict[str, object]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]  # type: ignore[attr-defined,index]
    exprs += [v["query"] for v in dashboard["templating"]["list"]]  # type: ignore[index]
    return exprs


def unknown_metrics(exprs: list[str], exposed: dict[str, str]) -> set[str]:
    """The series names in ``exprs`` that /metrics does not expose: no family of that name, or
    a family of another type (``_total`` of a gauge, a bare counter, ``_bucket`` of a
    counter)."""
    out = set()
    for expr in exprs:
        for name in _NAME.findall(expr):
            for suffix, types in _SUFFIXES.items():
                family = name.removesuffix(suffix)
                if name.endswith(suffix) and exposed.get(family) in types:
                    break
            else:
                if exposed.get(name) not in ("gauge", "untyped"):
                    out.add(name)
    return out


def test_every_expression_names_an_exposed_metric(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    app = create_app([plan], auth=False, store=str(tmp_path / "s.db"), tick_interval=3600)
    with running(app) as url, httpx.Client(base_url=url) as c:
        for i in range(20):
            assert c.post("/v1/endpoints/churn/predict",
                          json={"unit": f"u{i}", "inputs": {"x": 1}}).status_code == 200
        text = c.get("/metrics").text
    exposed = {f.name: f.type for f in text_string_to_metric_families(text)}
    dashboard = _dashboard()
    exprs = _expressions(dashboard)
    assert len(exprs) >= 20 and len(dashboard["panels"]) >= 10  # type: ignore[arg-type]
    assert unknown_metrics(exprs, exposed) == set()
    # the check can fail: a name the gateway does not export is caught
    assert unknown_metrics(["rate(safeshift_nonexistent_total[5m])"], exposed) == {
        "safeshift_nonexistent_total"}
    assert unknown_metrics(["increase(safeshift_records_dropped_total[1h])",  # a gauge
                            "safeshift_requests"], exposed) == {  # a counter, bare
        "safeshift_records_dropped_total", "safeshift_requests"}
    for panel in dashboard["panels"]:  # type: ignore[attr-defined]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"]


def test_cli_prints_and_writes_the_dashboard(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "-m", "safeshift.cli", "grafana", "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(out.read_text()) == _dashboard()
