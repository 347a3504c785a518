"""Guardrails fed by a real Prometheus scraping a real gateway: a candidate whose latency
metric regresses is rolled back on Prometheus's numbers, and a Prometheus that is down holds
the rollout, says so in its reason, and is used again once it answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from gateway_helpers import make_plan, running
from tests.prometheus_process import free_port, prometheus, prometheus_binary, wait_for_series

from safeshift.gateway import create_app
from safeshift.rollout import Rollout
from safeshift.state import Phase

MODEL_MS = ('1000 * sum(rate(safeshift_model_duration_seconds_sum{arm="{{arm}}"}[1s])) / '
            'sum(rate(safeshift_model_duration_seconds_count{arm="{{arm}}"}[1s]))')


def prom_plan(url: str, *, candidate_ms: int) -> Any:
    return make_plan(
        candidate={"version": "v2", "model": f"fake:cand?output=2&latency_ms={candidate_ms}"},
        baseline={"version": "v1", "model": "fake:base?output=1&latency_ms=5"},
        guardrails=[{"metric": "error_rate", "tolerance": 0.01},
                    {"metric": "model_ms", "direction": "increase", "tolerance": 10,
                     "prometheus": {"url": url, "query": MODEL_MS, "interval": "1s",
                                    "min_samples": 10, "timeout": "1s"}}])


@contextmanager
def traffic(url: str) -> Iterator[list[int]]:
    """Users sending predictions until the block ends; yields their status codes."""
    codes: list[int] = []
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/endpoints/churn/predict",
                           json={"unit": f"user-{i % 500}", "inputs": {"x": 1}})
                codes.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=send, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        yield codes
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


def serving(tmp_path: Path, prom_url: str, candidate_ms: int) -> tuple[Any, Rollout]:
    app = create_app([prom_plan(prom_url, candidate_ms=candidate_ms)], auth=False,
                     store=f"sqlite:///{tmp_path / 's.db'}", tick_interval=0.2)
    return app, app.gateway.endpoints["churn"].rollout


def test_prometheus_latency_regression_rolls_back(tmp_path: Path) -> None:
    prometheus_binary()
    port = free_port()  # the plan names Prometheus before it runs, as a deployment would
    app, rollout = serving(tmp_path, f"http://127.0.0.1:{port}", candidate_ms=45)
    with running(app) as url, prometheus([url.removeprefix("http://")], tmp_path / "prom",
                                         port=port) as prom, traffic(url) as codes:
        wait_for_series(prom, MODEL_MS.replace("{{arm}}", "candidate"))
        assert wait_until(lambda: rollout.state().phase is Phase.ROLLED_BACK, 60)
    decision = rollout.decisions()[-1]
    assert "model ms" in decision.reason and "values read at the same instants" in decision.reason
    verdict = next(v for v in decision.evidence["verdicts"] if v["guardrail"] == "model_ms")
    assert verdict["status"] == "harm"
    assert 25 < verdict["estimate"] < 55  # about 40 ms slower, as Prometheus measured it
    assert verdict["n_candidate"] >= 10
    assert codes and set(codes) == {200}  # users got answers throughout


def test_prometheus_down_holds_and_says_so_then_is_read_again(tmp_path: Path) -> None:
    prometheus_binary()
    port = free_port()
    app, rollout = serving(tmp_path, f"http://127.0.0.1:{port}", candidate_ms=5)
    with running(app) as url, traffic(url) as codes:
        assert wait_until(lambda: "no fresh measurements" in rollout.state().reason, 20)
        state = rollout.state()
        assert state.phase is Phase.RUNNING and state.stage_index == 0
        assert f"Prometheus at http://127.0.0.1:{port} cannot be reached" in state.reason
        with prometheus([url.removeprefix("http://")], tmp_path / "prom", port=port):
            assert wait_until(lambda: "no fresh measurements" not in rollout.state().reason, 20)
            assert rollout.state().reason.startswith("rollout started")

            def measured() -> float:
                a = rollout.analysis()
                assert a is not None
                return next(v.n_candidate for v in a.verdicts if v.guardrail == "model_ms")
            assert wait_until(lambda: measured() >= 3, 20)
    assert codes and set(codes) == {200}
