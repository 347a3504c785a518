"""Replicas behind nginx sharing PostgreSQL: the short run of ``safeshift bench replicas`` (the
same code path as the 60 s benchmark), and what the shipped nginx configuration passes on.

nginx is required, never skipped: ``make nginx`` installs it in CI (``apt-get install nginx``).
The figures (lags, failover time, RSS) are the benchmark's to print; here only what must hold
whatever the machine's speed is asserted."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from tests.conftest import plan_dict
from tests.serve_process import serve_process

from safeshift.bench import replicas
from safeshift.bench._postgres import PostgresUnavailable
from safeshift.bench._procs import BenchError


def _require_nginx() -> None:
    try:
        replicas.find_nginx()
    except BenchError as exc:
        pytest.fail(str(exc))


@pytest.mark.process
def test_replicas_under_load_lose_nothing_and_fail_over() -> None:
    _require_nginx()
    out = io.StringIO()
    try:
        result = replicas.main(quick=True, console=Console(file=out, width=200))
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))
    report = out.getvalue()
    # every prediction and label through nginx was answered, none by a 5xx
    assert result["requests"] > 0, report
    assert result["status_5xx"] == 0 and result["transport_errors"] == 0, report
    assert set(result["statuses"]) == {"200"}, report
    # no feedback lost: every label sent was accepted and is in the store
    assert result["labels_sent"] > 0, report
    assert result["labels_sent"] == result["labels_accepted"] == result["labels_joined"], report
    # the controller advanced on its own during the load, then the operator rolled back; each
    # replica, polled directly, showed every one of those splits
    actions = [c["action"] for c in result["stage_changes"]]
    assert "advance" in actions and actions[-1] == "rollback", report
    assert result["all_seen"], report
    # both replicas served (nginx spread the load) and each kept a reading of its memory
    per = result["per_replica"]
    assert all(r["served"] > 0 and r["rss_end_mb"] > 0 for r in per.values()), report
    # the lease holder was killed; another replica took the lease and ticked again
    failover = result["failover"]
    assert failover["successor"] in per and failover["successor"] != failover["killed"], report
    assert failover["took_over_s"] is not None and failover["renewed_s"] is not None, report
    assert failover["renewed_s"] > failover["took_over_s"], report


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections to it are refused


@pytest.mark.process
def test_nginx_config_passes_client_address_and_request_id_and_skips_a_dead_replica(
        tmp_path: Path) -> None:
    _require_nginx()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_dict()))
    log = tmp_path / "serve.log"
    with serve_process([plan], store=str(tmp_path / "s.db"), log=log,
                       env={"SAFESHIFT_AUTH": "0"}) as url:
        live = url.removeprefix("http://")
        # the first replica is down: nginx must send even a POST to the live one (nothing of
        # it was sent), so the client never sees the dead replica
        with replicas.nginx_process([f"127.0.0.1:{_dead_port()}", live], tmp_path) as front:
            statuses = []
            for i in range(4):
                r = httpx.post(f"{front}/v1/endpoints/score/predict",
                               json={"unit": f"u{i}", "inputs": {"x": 1}},
                               headers={"x-request-id": f"client-id-{i}",
                                        "x-forwarded-for": "198.51.100.7"})
                statuses.append(r.status_code)
                assert r.headers["x-request-id"] == f"client-id-{i}"
            # a body beyond nginx's memory buffer (16 KiB) goes through its temporary files,
            # which its workers (nobody, when nginx runs as root) must be able to write
            big = httpx.post(f"{front}/v1/endpoints/score/predict",
                             json={"unit": "u-big", "inputs": [{"x": 1}] * 3000})
            assert big.status_code == 200, (big.text, (tmp_path / "error.log").read_text())
            assert len(big.json()["outputs"]) == 3000
            # the access log is written in batches; a stopped server has written it all
    assert statuses == [200] * 4
    access = [json.loads(line) for line in log.read_text().splitlines()
              if '"safeshift.access"' in line and "/predict" in line]
    assert len(access) == 5
    # uvicorn believes X-Forwarded-For from nginx on loopback: the client's network is logged
    # (truncated to its /24), not nginx's address
    assert {a["client"] for a in access[:4]} == {"198.51.100.0"}
    nginx_log = (tmp_path / "access.log").read_text()
    assert "id=client-id-3" in nginx_log  # nginx's line names the id the replica answered with


def test_safeshift_nginx_prints_the_site_and_refuses_a_bad_address(tmp_path: Path) -> None:
    from tests.test_cli import cli

    out = tmp_path / "safeshift.conf"
    r = cli("nginx", "--replica", "10.0.0.11:8000", "--replica", "10.0.0.12:8000",
            "--listen", "8080", "-o", str(out))
    assert r.returncode == 0, r.stderr
    site = out.read_text()
    assert "server 10.0.0.11:8000 " in site and "server 10.0.0.12:8000 " in site
    assert "listen 8080;" in site
    # a sent POST is never resent: only errors and timeouts move a request, never non_idempotent
    directives = [line.strip() for line in site.splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    assert "proxy_next_upstream error timeout;" in directives
    assert not any("non_idempotent" in d for d in directives)
    bad = cli("nginx", "--replica", "10.0.0.11")
    assert bad.returncode == 2 and "not host:port" in bad.stderr
