"""Drills against a running gateway (safeshift drill PLAN --against URL): the drill copy runs
on the server, on routes of its own, is decided by the server's controller task and recorded
in its audit log as a drill, while the real users' rollout, assignment and metrics stay as
they were; only an admin may run one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_helpers import running
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from safeshift import ops
from safeshift.assign import BASELINE
from safeshift.auth import Role
from safeshift.cli import app as cli
from safeshift.clock import SystemClock
from safeshift.drill import run_drill
from safeshift.gateway import create_app
from safeshift.plan import DRILL_MARK, Plan
from safeshift.state import Phase
from safeshift.store import Store, open_store

CHURN = Path(__file__).resolve().parents[2] / "examples" / "churn" / "plan.yaml"
ROW = {"mean_radius": 14.0, "mean_texture": 19.0, "mean_perimeter": 92.0, "mean_area": 650.0}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, Store, Any, dict[Role, str]]]:
    store = open_store(str(tmp_path / "drills.db"))
    tokens = {}
    for role in (Role.CLIENT, Role.OPERATOR, Role.ADMIN):
        tokens[role], _ = ops.create_token(store, SystemClock(), name=f"{role}-1", role=role,
                                           expires_in=None)
    app = create_app([Plan.load(CHURN)], store=store, tick_interval=0.25, access_log=False)
    with running(app) as url:
        yield url, store, app, tokens
    store.close()


def real_rollout(store: Store) -> tuple[Any, ...]:
    state = store.get_state("churn-v2")
    return (str(state.phase), state.stage_index, state.salt_seed,
            len(store.decisions("churn-v2")), [e.hash for e in store.audit_events("churn-v2")])


def test_a_drill_on_the_server_rolls_back_and_real_users_never_see_it(gateway: Any) -> None:
    url, store, app, tokens = gateway
    before = real_rollout(store)
    codes: list[int] = []
    arms: list[str] = []
    stop = threading.Event()

    def users() -> None:  # real traffic on the real endpoint during the drill
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {tokens[Role.CLIENT]}"},
                          timeout=10) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/endpoints/churn/predict",
                           json={"unit": f"real-{i % 100}", "inputs": ROW,
                                 "context": {"country": "US"}})
                codes.append(r.status_code)
                arms.append(r.json().get("arm", ""))
                i += 1
                stop.wait(0.02)

    thread = threading.Thread(target=users, daemon=True)
    thread.start()
    try:
        report = run_drill(Plan.load(CHURN), ["errors", "hang"], against=url,
                           token=tokens[Role.ADMIN], seed=3)
    finally:
        stop.set()
        thread.join(10)
    assert report.ok, report.to_json()
    for r in report.faults:
        assert r.rolled_back and r.user_errors == 0 and r.audit_ok, r.to_json()
        assert r.decision_s is not None and 0 < r.decision_s < 15
        assert DRILL_MARK in r.rollout
        assert store.get_state(r.rollout).phase is Phase.ROLLED_BACK
        events = store.audit_events(r.rollout)
        assert events and all(e.detail.get("drill") is True for e in events)
    assert "error_rate" in report.faults[0].caught_by
    # the real rollout: same phase, stage, salt, decisions and audit chain; its users were
    # all answered, by its own baseline (its shadow stage), never by a drill copy
    assert real_rollout(store) == before
    assert codes and set(codes) == {200} and set(arms) == {BASELINE}
    assert app.gateway.drills == {}  # every drill ended
    # the copy serves under the endpoint's name, so were its metrics exported they would be
    # counted as the endpoint's: the endpoint counted exactly the real users' requests
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    served = sum(s.value for f in families if f.name == "safeshift_requests"
                 for s in f.samples if s.name == "safeshift_requests_total"
                 and s.labels.get("endpoint") == "churn")
    assert served == len(codes)


def test_only_an_admin_drills_and_bad_requests_are_named(gateway: Any) -> None:
    url, store, _, tokens = gateway
    plan = Plan.load(CHURN)
    body = {"endpoint": "churn", "plan": plan.hash, "fault": "errors", "seed": 1}
    for role, needed in ((Role.CLIENT, "viewer"), (Role.OPERATOR, "admin")):
        r = httpx.post(f"{url}/v1/drills", json=body,
                       headers={"authorization": f"Bearer {tokens[role]}"})
        assert r.status_code == 403 and f"needs the {needed} role" in r.json()["error"], r.text
    assert httpx.post(f"{url}/v1/drills", json=body).status_code == 401
    admin = {"authorization": f"Bearer {tokens[Role.ADMIN]}"}
    cases = [({**body, "plan": "0" * 64}, 409, "serves rollout 'churn-v2' with plan"),
             ({**body, "fault": "fire"}, 422, "unknown fault 'fire'"),
             ({**body, "fault": "latency"}, 422, "cannot be drilled"),
             ({**body, "endpoint": "nope"}, 404, "unknown endpoint 'nope'"),
             ({"endpoint": "churn"}, 422, '"fault"')]
    for sent, status, words in cases:
        r = httpx.post(f"{url}/v1/drills", json=sent, headers=admin)
        assert r.status_code == status and words in r.json()["error"], r.text
    r = httpx.post(f"{url}/v1/drills/churn-v2~drill-x/fault", headers=admin)
    assert r.status_code == 404 and "no drill" in r.json()["error"]
    assert [s.name for s in store.list_states()] == ["churn-v2"]  # nothing was made


def test_the_cli_names_what_against_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFESHIFT_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["drill", str(CHURN), "--against", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "admin token in SAFESHIFT_TOKEN" in result.output
    monkeypatch.setenv("SAFESHIFT_TOKEN", "x")
    result = CliRunner().invoke(cli, ["drill", str(CHURN), "--against", "http://127.0.0.1:9",
                                      "--store", str(tmp_path / "d.db")])
    assert result.exit_code == 2 and "--store is for drills in this process" in result.output
