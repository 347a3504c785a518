"""The gateway sends the outbox's notifications in the background (a dead receiver does not
hold back a live one), publishes their metrics, and asks confirm hooks without blocking the
requests it serves."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from gateway_helpers import make_plan, running
from tests.notify_receiver import Receiver

from safeshift.gateway import create_app
from safeshift.state import Phase

pytestmark = pytest.mark.timeout(60)


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in /metrics"
    return float(found.group(1))


def test_the_gateway_delivers_notifications_and_counts_them(tmp_path: Path) -> None:
    with Receiver() as receiver, Receiver(listening=False) as down:
        plan = make_plan(tmp_path, notifications=[{"url": f"{receiver.url}/hook"},
                                                  {"url": f"{down.url}/hook"}])
        app = create_app([plan], auth=False, store=str(tmp_path / "s.db"), tick_interval=3600,
                         notify_interval=0.05, notify_backoff=0.01, notify_max_attempts=2)
        rollout = app.gateway.rollouts[plan.rollout]  # create_app started it: one event
        with running(app) as url, httpx.Client(base_url=url) as c:
            rollout.pause(actor="alice", reason="drill")
            wait_for(lambda: len(receiver.accepted()) == 2)
            assert [r.json()["action"] for r in receiver.accepted()] == ["start", "pause"]

            def settled() -> bool:
                text = c.get("/metrics").text
                return metric(text, "safeshift_notifications_dead_letter") == 2
            wait_for(settled)  # the closed port's two entries, after two attempts each
            text = c.get("/metrics").text
            assert metric(text, 'safeshift_notifications_total{outcome="delivered"}') == 2
            assert metric(text, 'safeshift_notifications_total{outcome="failed"}') == 2
            assert metric(text, 'safeshift_notifications_total{outcome="dead"}') == 2
            assert metric(text, "safeshift_notifications_pending") == 0
        assert len(receiver.accepted()) == 2  # once each


def test_a_slow_confirm_hook_holds_the_start_without_blocking_requests(tmp_path: Path) -> None:
    with Receiver() as hook:
        hook.delay = 0.5
        hook.confirm = [{"go": False}]
        plan = make_plan(tmp_path, stages=[{
            "name": "canary", "traffic": "50%", "min_duration": "1h",
            "confirm": {"url": f"{hook.url}/confirm", "timeout": "2s"}}])
        app = create_app([plan], auth=False, store=str(tmp_path / "s.db"), tick_interval=0.05)
        rollout = app.gateway.rollouts[plan.rollout]
        with running(app) as url, httpx.Client(base_url=url) as c:
            wait_for(lambda: len(hook.on("/confirm")) >= 3)  # asked on every tick
            for _ in range(5):  # served while a tick waits for the hook in its thread
                started = time.monotonic()
                assert c.get("/healthz").status_code == 200
                assert time.monotonic() - started < 0.3
            state = rollout.state()
            assert state.phase is Phase.PENDING
            assert "waiting for confirm hook" in state.reason and "go: false" in state.reason
            hook.confirm = [{"go": True}]
            wait_for(lambda: rollout.state().phase is Phase.RUNNING)
            assert rollout.decisions()[-1].reason.endswith(f"confirmed by hook {hook.url}/confirm")
