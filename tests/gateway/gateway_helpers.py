"""Helpers for the gateway tests: real uvicorn servers on free loopback ports, plan builders.

(A plain module, not conftest: the test folders have no ``__init__.py``.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from safeshift.plan import Plan


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(app: Any, *, timeout: float = 10.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields its base URL; stops it (lifespan
    shutdown included) on exit."""
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="auto", ws="none",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def plan_dict(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rollout": "churn-v2",
        "endpoint": "churn",
        "baseline": {"version": "v1", "model": "fake:base?output=1"},
        "candidate": {"version": "v2", "model": "fake:cand?output=2"},
        "change": {"summary": "a test change"},
        "stages": [{"name": "canary", "traffic": "50%", "min_duration": "1h"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.01}],
    }
    base.update(overrides)
    return base


def make_plan(tmp_path: Path | None = None, **overrides: Any) -> Plan:
    return Plan.from_dict(plan_dict(**overrides), base_dir=tmp_path)


def write_plan(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump(plan_dict(**overrides)))
    return path


def units_for(app: Any, endpoint: str, arm: str, n: int, prefix: str = "u") -> list[str]:
    """``n`` unit ids that the endpoint's current split assigns to ``arm``."""
    rollout = app.gateway.endpoints[endpoint].rollout
    out = []
    i = 0
    while len(out) < n:
        unit = f"{prefix}{i}"
        if rollout.assign(unit, None).arm == arm:
            out.append(unit)
        i += 1
        assert i < 100_000
    return out
