"""``safeshift serve`` as a real process: JSON logs with request ids, graceful shutdown that
flushes telemetry, fail-fast start-up errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gateway_helpers import free_socket, make_plan, running, write_plan

from safeshift import ops
from safeshift.auth import Role
from safeshift.clock import SystemClock
from safeshift.errors import ModelLoadError, PlanError, RolloutError
from safeshift.gateway import create_app
from safeshift.rollout import Rollout
from safeshift.store import open_store, sqlite_url

pytestmark = pytest.mark.process


def _serve(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "SAFESHIFT_FLUSH_INTERVAL": "30"}  # only the shutdown flushes
    return subprocess.Popen([sys.executable, "-m", "safeshift.cli", "serve", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_logs_json_and_flushes_on_sigterm(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.yaml")
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    store = tmp_path / "store.db"
    st = open_store(str(store))
    token, _ = ops.create_token(st, SystemClock(), name="app", role=Role.CLIENT,
                                expires_in=None)
    st.close()
    auth = {"authorization": f"Bearer {token}"}
    # no controller tick before SIGTERM either: a tick flushes too (the test raced with it)
    proc = _serve([str(plan), "--store", str(store), "--port", str(port), "--tick", "60"],
                  tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.post(f"{url}/v1/endpoints/churn/predict",
                          json={"unit": "u", "inputs": {"x": 1}}).status_code == 401
        ids = [httpx.post(f"{url}/v1/endpoints/churn/predict", headers=auth,
                          json={"unit": f"u{i}", "inputs": {"x": i}}).json()["id"]
               for i in range(10)]
        assert httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/feedback"]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), stderr  # uvicorn re-raises the signal
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [r for r in lines if r["logger"] == "safeshift.access" and r.get("endpoint")]
    assert {r["request_id"] for r in access} == set(ids)
    assert all(r["status"] == 200 and r["arm"] in ("baseline", "candidate") for r in access)
    assert any(r["message"] == "gateway stopped" and r["flushed"] > 0 for r in lines)
    st = open_store(str(store))
    try:
        rows = st.telemetry("churn-v2")
        assert sum(r.n for r in rows if r.signal == "requests") == 10
        assert st.get_request(ids[0]) is not None
    finally:
        st.close()


def test_serve_without_auth_is_refused_beyond_loopback(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.yaml")
    for args in (["--no-auth"], []):
        env_auth = {} if args else {"SAFESHIFT_AUTH": "0"}  # the variable cannot dodge it
        proc = subprocess.run(
            [sys.executable, "-m", "safeshift.cli", "serve", str(plan), "--store",
             str(tmp_path / "s.db"), "--host", "0.0.0.0", *args], cwd=tmp_path,
            env={**os.environ, **env_auth}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "without authentication" in proc.stderr and "127.0.0.1" in proc.stderr
    assert not (tmp_path / "s.db").exists()


def test_serve_fails_fast_on_a_bad_model_reference(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.yaml",
                      candidate={"version": "v2", "model": "joblib:missing.joblib"})
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = _serve([str(plan), "--store", str(tmp_path / "s.db"), "--port", str(port)], tmp_path)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "candidate model 'joblib:missing.joblib'" in stderr and "no such file" in stderr


def test_serve_refuses_a_port_in_use_before_touching_the_store(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.yaml")
    busy = free_socket()
    busy.listen()
    try:
        proc = _serve([str(plan), "--store", str(tmp_path / "s.db"), "--port",
                       str(busy.getsockname()[1])], tmp_path)
        _, stderr = proc.communicate(timeout=60)
    finally:
        busy.close()
    assert proc.returncode == 2, stderr
    assert "cannot listen on 127.0.0.1:" in stderr and "pick another --port" in stderr
    assert not (tmp_path / "s.db").exists()  # no rollout was registered


def test_two_active_plans_for_one_endpoint_is_a_start_up_error(tmp_path: Path) -> None:
    a = make_plan()
    b = make_plan(rollout="churn-v3")
    with pytest.raises(RolloutError, match="endpoint 'churn' has 2 active rollouts"):
        create_app([a, b], auth=False, store=str(tmp_path / "s.db"))
    with pytest.raises(PlanError, match="both rollout 'churn-v2'"):
        create_app([a, a], auth=False, store="memory://")
    # a finished rollout beside an active one is fine: the active one serves
    store = str(tmp_path / "t.db")
    old = Rollout.from_plan(make_plan(rollout="churn-v1"), store=store)
    old.rollback(actor="ops")
    old.store.close()
    app = create_app([make_plan(rollout="churn-v1"), a], auth=False, store=store, tick_interval=3600)
    assert app.gateway.endpoints["churn"].rollout.plan.rollout == "churn-v2"
    app.gateway.store.close()


def test_bad_models_fail_create_app_with_the_rollout_named() -> None:
    plan = make_plan(baseline={"version": "v1", "model": "python:no_such_module:f"})
    with pytest.raises(ModelLoadError, match=r"rollout 'churn-v2' .* baseline model"):
        create_app([plan], auth=False, store="memory://")


def test_readyz_names_the_phase_and_a_paused_rollout_is_not_active(tmp_path: Path) -> None:
    """A rollout paused from another process (the CLI on the same store) shows as paused
    within the gateway's phase refresh (at most about 5 s), no longer as active."""
    url = sqlite_url(tmp_path / "ready.db")
    app = create_app([make_plan()], auth=False, store=url, tick_interval=3600, access_log=False)
    with running(app) as base, httpx.Client(base_url=base) as c:
        first = c.get("/readyz").json()["endpoints"]["churn"]
        assert first["phase"] == "running" and first["active"] is True
        other = Rollout.from_plan(make_plan(), store=url)
        other.pause(actor="alice", reason="checking a dashboard")
        deadline = time.monotonic() + 15
        now = first
        while now["phase"] != "paused" and time.monotonic() < deadline:
            time.sleep(0.2)
            now = c.get("/readyz").json()["endpoints"]["churn"]
        assert now["phase"] == "paused" and now["active"] is False
        other.close()
