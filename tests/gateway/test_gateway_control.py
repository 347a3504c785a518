"""The control API and authentication against a real server: for every route the right role
succeeds and every lesser role gets 403 with nothing changed (state, decisions, audit log,
tokens compared before and after); no token or a bad one gets 401; refusals are logged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gateway_helpers import make_plan, plan_dict, running

from safeshift import ops
from safeshift.auth import Role
from safeshift.clock import SystemClock
from safeshift.gateway import create_app
from safeshift.store import Store, open_store

ROLES = [Role.CLIENT, Role.VIEWER, Role.OPERATOR, Role.APPROVER, Role.ADMIN]
LADDER = [Role.VIEWER, Role.OPERATOR, Role.APPROVER, Role.ADMIN]
GATED = {"stages": [{"name": "canary", "traffic": "50%", "min_duration": "1h",
                     "approval": "required"}]}


def refused_for(need: Role) -> list[Role]:
    """The roles that must get 403 on a route that needs ``need``."""
    if need is Role.CLIENT:
        return [Role.VIEWER, Role.OPERATOR, Role.APPROVER]
    return [Role.CLIENT, *LADDER[:LADDER.index(need)]]


def snapshot(store: Store) -> Any:
    """Everything a refused request must leave as it was."""
    out: list[Any] = []
    for state in sorted(store.list_states(), key=lambda s: s.name):
        out.append((state.name, state.version, str(state.phase), state.stage_index,
                    len(store.decisions(state.name)),
                    [e.hash for e in store.audit_events(state.name)]))
    out.append([(t.id, t.revoked_at) for t in store.list_tokens()])
    return out


@pytest.fixture
def server(tmp_path: Any) -> Iterator[tuple[str, Store, dict[Role, dict[str, str]]]]:
    store = open_store(str(tmp_path / "control.db"))
    clock = SystemClock()
    headers = {}
    for role in ROLES:
        token, _ = ops.create_token(store, clock, name=f"{role}-1", role=role, expires_in=None,
                                    rights={"labels": True} if role is Role.CLIENT else None)
        headers[role] = {"authorization": f"Bearer {token}"}
    app = create_app([make_plan(**GATED)], store=store, tick_interval=3600, access_log=False)
    with running(app) as url:
        yield url, store, headers
    store.close()


def check_route(url: str, store: Store, headers: dict[Role, dict[str, str]], need: Role,
                method: str, path: str, *, ok: int = 200, **kwargs: Any) -> httpx.Response:
    """Every refused role gets 403 and changes nothing; then ``need`` itself succeeds."""
    with httpx.Client(base_url=url) as c:
        for role in refused_for(need):
            before = snapshot(store)
            r = c.request(method, path, headers=headers[role], **kwargs)
            assert r.status_code == 403, (role, path, r.text)
            error = r.json()["error"]  # names the role needed and the one held
            assert "role" in error and f"holds {role}" in error, error
            assert snapshot(store) == before, (role, path)
        r = c.request(method, path, headers=headers[need], **kwargs)
        assert r.status_code == ok, (need, path, r.text)
        return r


def test_every_route_needs_its_role_and_lesser_roles_change_nothing(server: Any) -> None:
    url, store, h = server
    name = "churn-v2"
    r = check_route(url, store, h, Role.VIEWER, "GET", "/v1/rollouts")
    assert [s["rollout"] for s in r.json()] == [name]
    r = check_route(url, store, h, Role.VIEWER, "GET", f"/v1/rollouts/{name}")
    assert r.json()["phase"] == "awaiting_approval" and r.json()["pending_stage"] == "canary"
    check_route(url, store, h, Role.VIEWER, "GET", f"/v1/rollouts/{name}/history")
    r = check_route(url, store, h, Role.VIEWER, "GET", f"/v1/rollouts/{name}/audit")
    assert r.json()["events"]

    why = {"json": {"reason": "reviewed the offline evaluation"}}
    r = check_route(url, store, h, Role.APPROVER, "POST", f"/v1/rollouts/{name}/approve", **why)
    assert r.json()["phase"] == "running" and r.json()["actor"] == "approver-1"
    r = check_route(url, store, h, Role.OPERATOR, "POST", f"/v1/rollouts/{name}/pause", **why)
    assert r.json()["phase"] == "paused" and r.json()["actor"] == "operator-1"
    check_route(url, store, h, Role.OPERATOR, "POST", f"/v1/rollouts/{name}/resume", **why)
    r = check_route(url, store, h, Role.APPROVER, "POST", f"/v1/rollouts/{name}/promote", **why)
    assert r.json()["phase"] == "promoted"

    other = plan_dict(rollout="churn-v3", endpoint="churn-b")
    r = check_route(url, store, h, Role.OPERATOR, "POST", "/v1/rollouts", ok=201, json=other)
    assert r.json()["rollout"] == "churn-v3" and r.json()["phase"] == "running"
    assert store.get_state("churn-v3").created_by == "operator-1"
    r = check_route(url, store, h, Role.OPERATOR, "POST", "/v1/rollouts/churn-v3/rollback",
                    **why)
    assert r.json()["phase"] == "rolled_back"
    # every decision names the principal that took it, and the audit log agrees
    actors = {d.actor for d in store.decisions(name)} - {"controller"}
    assert actors == {"approver-1", "operator-1"}

    r = check_route(url, store, h, Role.ADMIN, "GET", "/v1/tokens")
    assert {t["name"] for t in r.json()} >= {"viewer-1", "admin-1"}
    assert all("secret" not in str(t) for t in r.json())
    r = check_route(url, store, h, Role.ADMIN, "POST", "/v1/tokens", ok=201,
                    json={"name": "dana", "role": "viewer", "expires": "1d"})
    new = r.json()
    assert new["token"].startswith("ss_") and new["expires_at"] > time.time() + 80_000
    r = check_route(url, store, h, Role.ADMIN, "DELETE", f"/v1/tokens/{new['id']}")
    assert r.json()["revoked_at"] is not None
    r = check_route(url, store, h, Role.ADMIN, "GET", "/v1/denials")
    assert any(d["status"] == 403 and d["principal"] == "viewer-1" for d in r.json())


def test_data_plane_routes_need_a_client_token(server: Any) -> None:
    url, store, h = server
    body = {"unit": "u1", "inputs": {"x": 1}}
    r = check_route(url, store, h, Role.CLIENT, "POST", "/v1/endpoints/churn/predict", json=body)
    rid = r.json()["id"]
    check_route(url, store, h, Role.CLIENT, "POST", "/v2/models/churn/infer", json={
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}]})
    check_route(url, store, h, Role.CLIENT, "POST", "/v1/feedback",
                json={"id": rid, "label": 1})
    check_route(url, store, h, Role.CLIENT, "POST", "/v1/reports", json={"id": rid, "kind": "wrong"})


def test_missing_malformed_unknown_revoked_and_expired_tokens_get_401(server: Any) -> None:
    url, store, h = server
    clock = SystemClock()
    revoked, record = ops.create_token(store, clock, name="gone", role=Role.ADMIN,
                                       expires_in=None)
    ops.revoke_token(store, clock, record.id)
    expired, _ = ops.create_token(store, clock, name="brief", role=Role.ADMIN, expires_in=0.5)
    time.sleep(0.6)
    forged = h[Role.ADMIN]["authorization"][:-4] + "AAAA"  # right id, wrong secret
    cases = {"missing": {}, "not bearer": {"authorization": "Basic YTpi"},
             "malformed": {"authorization": "Bearer hello"},
             "unknown": {"authorization": "Bearer ss_000000000000_" + "x" * 43},
             "forged": {"authorization": forged},
             "revoked": {"authorization": f"Bearer {revoked}"},
             "expired": {"authorization": f"Bearer {expired}"}}
    with httpx.Client(base_url=url) as c:
        for what, hdr in cases.items():
            for method, path in (("GET", "/v1/rollouts"), ("POST", "/v1/rollouts/churn-v2/pause"),
                                 ("POST", "/v1/endpoints/churn/predict"), ("GET", "/nope"),
                                 ("GET", "/v2/models/churn")):
                before = snapshot(store)
                r = c.request(method, path, headers=hdr, json={"reason": "x"})
                assert r.status_code == 401, (what, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]
                assert snapshot(store) == before
        # health probes and metrics stay open
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        metrics = c.get("/metrics").text
        logged = c.get("/v1/denials", params={"limit": 1000}, headers=h[Role.ADMIN]).json()
    assert 'safeshift_auth_denied_total{status="401"} 35.0' in metrics
    assert sum(d["status"] == 401 for d in logged) == 35, logged
    assert sum("was revoked" in d["reason"] for d in logged) == 5
    assert sum("expired" in d["reason"] for d in logged) == 5


def test_actions_need_a_reason_and_say_why_they_do_not_fit(server: Any) -> None:
    url, store, h = server
    with httpx.Client(base_url=url, headers=h[Role.ADMIN]) as c:
        r = c.post("/v1/rollouts/churn-v2/pause", json={"reason": "  "})
        assert r.status_code == 422 and r.json()["field"] == "reason"
        r = c.post("/v1/rollouts/churn-v2/pause", json={})
        assert r.status_code == 422
        r = c.post("/v1/rollouts/churn-v2/resume", json={"reason": "try"})
        assert r.status_code == 409 and "not paused" in r.json()["error"]
        r = c.post("/v1/rollouts/nope/pause", json={"reason": "try"})
        assert r.status_code == 404
        r = c.post("/v1/rollouts/churn-v2/explode", json={"reason": "try"})
        assert r.status_code == 404 and "actions are" in r.json()["error"]
        bad = plan_dict(rollout="bad", stages=[], guardrails=[{"metric": "error_rate",
                                                              "tolerance": -1}])
        r = c.post("/v1/rollouts", json=bad)
        assert r.status_code == 422
        fields = {p["field"] for p in r.json()["problems"]}
        assert "stages" in fields and any(f.startswith("guardrails.0") for f in fields)
        r = c.post("/v1/rollouts", content=b'{"rollout": "a", "rollout": "b"}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 422 and any("duplicate key" in p["message"]
                                            for p in r.json()["problems"])
        r = c.post("/v1/rollouts", json=plan_dict(endpoint="other"))  # name taken, other plan
        assert r.status_code == 409
    assert "bad" not in {s.name for s in store.list_states()}


def test_a_revoked_token_is_refused_within_the_cache_time(server: Any) -> None:
    url, store, _ = server
    token, record = ops.create_token(store, SystemClock(), name="temp", role=Role.VIEWER,
                                     expires_in=None)
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}) as c:
        assert c.get("/v1/rollouts").status_code == 200
        ops.revoke_token(store, SystemClock(), record.id)
        deadline = time.monotonic() + 10
        while c.get("/v1/rollouts").status_code == 200:
            assert time.monotonic() < deadline, "revocation never took effect"
            time.sleep(0.2)
        assert "revoked" in c.get("/v1/rollouts").json()["error"]


def norm(text: str) -> Any:
    """JSON output without what differs between two reads a moment apart."""
    import json

    doc = json.loads(text)
    rows = doc if isinstance(doc, list) else [doc]
    return [{k: v for k, v in r.items() if k != "stage_elapsed"} for r in rows]


def _cli(*args: str, token: str | None = None) -> Any:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SAFESHIFT_TOKEN"}
    if token:
        env["SAFESHIFT_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "safeshift.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_verbs_against_a_server_match_the_store_and_need_the_role(server: Any,
                                                                      tmp_path: Any) -> None:
    url, store, h = server
    token = {role: hdr["authorization"].split()[1] for role, hdr in h.items()}
    db = store.url.removeprefix("sqlite:///")
    for args in (["status"], ["status", "churn-v2"], ["history", "churn-v2"]):
        remote = _cli(*args, "--url", url, "--json", token=token[Role.VIEWER])
        local = _cli(*args, "--store", db, "--json")
        assert remote.returncode == local.returncode == 0, remote.stderr + local.stderr
        assert norm(remote.stdout) == norm(local.stdout), args
        text_remote = _cli(*args, "--url", url, token=token[Role.VIEWER]).stdout
        assert text_remote.split("\n")[0] == _cli(*args, "--store", db).stdout.split("\n")[0]
    # acting: a viewer is refused (exit 2, nothing changes), an approver approves
    before = snapshot(store)
    r = _cli("approve", "churn-v2", "--reason", "ok", "--url", url, token=token[Role.VIEWER])
    assert r.returncode == 2 and "needs the approver role" in r.stderr
    assert snapshot(store) == before
    r = _cli("approve", "churn-v2", "--reason", "offline eval ok", "--url", url,
             token=token[Role.APPROVER])
    assert r.returncode == 0 and "running" in r.stdout, r.stderr
    assert store.decisions("churn-v2")[-1].actor == "approver-1"
    r = _cli("status", "--url", url)
    assert r.returncode == 2 and "SAFESHIFT_TOKEN" in r.stderr
    # tokens through the server: admin only
    r = _cli("token", "create", "--role", "viewer", "--name", "erin", "--url", url,
             token=token[Role.OPERATOR])
    assert r.returncode == 2 and "admin" in r.stderr
    r = _cli("token", "create", "--role", "viewer", "--name", "erin", "--url", url,
             token=token[Role.ADMIN])
    assert r.returncode == 0 and r.stdout.startswith("ss_")
    r = _cli("status", "--url", url, token=r.stdout.strip())
    assert r.returncode == 0 and "churn-v2" in r.stdout


def test_two_person_approval_refuses_a_second_vote_and_the_creator(server: Any) -> None:
    url, store, h = server
    clock = SystemClock()
    second, _ = ops.create_token(store, clock, name="approver-2", role=Role.APPROVER,
                                 expires_in=None)
    plan = plan_dict(rollout="churn-v4", endpoint="churn-c", stages=[{
        "name": "canary", "traffic": "10%", "min_duration": "1h",
        "approval": {"approvers": 2, "creator_may_approve": False}}])
    why = {"reason": "checked the offline evaluation"}
    path = "/v1/rollouts/churn-v4/approve"
    with httpx.Client(base_url=url) as c:
        r = c.post("/v1/rollouts", json=plan, headers=h[Role.ADMIN])
        assert r.status_code == 201 and r.json()["phase"] == "awaiting_approval"
        need = r.json()["approval"]
        assert need == {"stage": "canary", "role": "approver", "approvers": 2,
                        "approved_by": [], "needed": 2, "excluded_creator": "admin-1",
                        "reviews": []}
        r = c.post(path, json=why, headers=h[Role.APPROVER])
        assert r.status_code == 200 and r.json()["phase"] == "awaiting_approval"
        assert "1 of 2 approvals" in r.json()["reason"] and "1 more needed" in r.json()["reason"]
        status = c.get("/v1/rollouts/churn-v4", headers=h[Role.VIEWER]).json()
        assert status["approval"]["approved_by"] == ["approver-1"]
        assert status["approval"]["needed"] == 1
        before = snapshot(store)
        r = c.post(path, json=why, headers=h[Role.APPROVER])  # the same person again
        assert r.status_code == 409 and "already approved" in r.json()["error"]
        r = c.post(path, json=why, headers=h[Role.ADMIN])  # the creator
        assert r.status_code == 409 and "creator" in r.json()["error"]
        r = c.post(path, json=why, headers=h[Role.OPERATOR])  # a lesser role
        assert r.status_code == 403
        assert snapshot(store) == before
        r = c.post(path, json=why, headers={"authorization": f"Bearer {second}"})
        assert r.status_code == 200 and r.json()["phase"] == "running"
        assert "2 of 2 approvals" in r.json()["reason"]
    approvals = [d.actor for d in store.decisions("churn-v4") if str(d.action) == "approve"]
    assert approvals == ["approver-1", "approver-2"]
    assert ops.verify_audit(store, "churn-v4").ok


def test_targeting_attributes_count_only_from_clients_with_the_right(tmp_path: Any) -> None:
    """The abuse: ``{"plan": "internal"}`` in the context opted anyone into the candidate.
    Now a targeting rule reads an attribute only from a client whose token may assert it."""
    store = open_store(str(tmp_path / "t.db"))
    clock = SystemClock()
    anyone, _ = ops.create_token(store, clock, name="public-app", role=Role.CLIENT,
                                 expires_in=None)
    internal, _ = ops.create_token(store, clock, name="internal-app", role=Role.CLIENT,
                                   expires_in=None, rights={"attributes": ["plan"]})
    plan = make_plan(segments=["plan"], targeting={"always_candidate": {"plan": ["internal"]}},
                     stages=[{"name": "canary", "traffic": "1%", "min_duration": "1h"}])
    app = create_app([plan], store=store, tick_interval=3600, access_log=False)
    shares = {}
    with running(app) as url, httpx.Client(base_url=url) as c:
        for who, token in (("public", anyone), ("internal", internal)):
            arms = [c.post("/v1/endpoints/churn/predict",
                           headers={"authorization": f"Bearer {token}"},
                           json={"unit": f"{who}-{i}", "context": {"plan": "internal"},
                                 "inputs": {"x": i}}).json()["arm"] for i in range(300)]
            shares[who] = arms.count("candidate") / len(arms)
    store.close()
    assert shares["public"] < 0.05, shares  # the 1 % hash share, not the opt-in
    assert shares["internal"] == 1.0, shares


def test_labels_need_the_right_and_each_client_writes_its_own_first_label(tmp_path: Any) -> None:
    """The abuse: anyone labelled their own requests first and a genuine later label was a
    "duplicate". Now an app's client token cannot label at all; among labelling clients each
    writes its own first label, and a disagreement is counted and shown, not swallowed."""
    store = open_store(str(tmp_path / "l.db"))
    clock = SystemClock()
    app_token, _ = ops.create_token(store, clock, name="app", role=Role.CLIENT,
                                    expires_in=None)
    first, _ = ops.create_token(store, clock, name="labeller-a", role=Role.CLIENT,
                                expires_in=None, rights={"labels": True})
    second, _ = ops.create_token(store, clock, name="labeller-b", role=Role.CLIENT,
                                 expires_in=None, rights={"labels": True})
    plan = make_plan(guardrails=[{"metric": "accuracy", "tolerance": 0.05}])
    app = create_app([plan], store=store, tick_interval=3600, access_log=False)

    def auth(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    with running(app) as url, httpx.Client(base_url=url) as c:
        rid = c.post("/v1/endpoints/churn/predict", headers=auth(app_token),
                     json={"unit": "u1", "inputs": {"x": 1}}).json()["id"]
        before = sum(r.n for r in store.telemetry("churn-v2") if r.signal == "accuracy")
        r = c.post("/v1/feedback", headers=auth(app_token), json={"id": rid, "label": 0})
        assert r.status_code == 403 and "labels right" in r.json()["error"]
        r = c.post("/v1/feedback", headers=auth(first), json={"id": rid, "label": 1})
        assert r.json()["accepted"] == ["accuracy"]
        r = c.post("/v1/feedback", headers=auth(first), json={"id": rid, "label": 0})
        assert r.json()["duplicate"] == ["accuracy"] and r.json()["conflict"] == []
        r = c.post("/v1/feedback", headers=auth(second), json={"id": rid, "label": 0})
        assert r.json()["conflict"] == ["accuracy"] and r.json()["accepted"] == []
        r = c.post("/v1/feedback", headers=auth(second), json={"id": rid, "label": 0})
        assert r.json()["duplicate"] == ["accuracy"] and r.json()["conflict"] == []
        admin, _ = ops.create_token(store, clock, name="boss", role=Role.ADMIN, expires_in=None)
        c.get("/v1/denials", headers=auth(admin))  # flushes the denial log
        status = c.get("/v1/rollouts/churn-v2", headers=auth(admin)).json()
    after = sum(r.n for r in store.telemetry("churn-v2") if r.signal == "accuracy")
    assert after - before == 1  # one label counted: the first labeller's
    assert status["label_conflicts"] == {"accuracy": 1.0}
    assert any("labels right" in d.reason for d in store.denials())
    store.close()


def test_reports_count_once_per_unit_and_stage(tmp_path: Any) -> None:
    """The abuse: 56 reports on one's own requests rolled back an identical candidate. A
    unit's reports now count once per stage, however many requests it reports on."""
    store = open_store(str(tmp_path / "r.db"))
    token, _ = ops.create_token(store, SystemClock(), name="app", role=Role.CLIENT,
                                expires_in=None)
    plan = make_plan(guardrails=[{"metric": "report_rate", "tolerance": 0.01}])
    app = create_app([plan], store=store, tick_interval=3600, access_log=False)
    auth = {"authorization": f"Bearer {token}"}
    with running(app) as url, httpx.Client(base_url=url, headers=auth) as c:
        ids = [c.post("/v1/endpoints/churn/predict",
                      json={"unit": "mallory", "inputs": {"x": i}}).json()["id"]
               for i in range(56)]
        answers = [c.post("/v1/reports", json={"id": rid, "kind": "wrong"}).json()
                   for rid in ids]
        others = [c.post("/v1/endpoints/churn/predict",
                         json={"unit": f"user-{i}", "inputs": {"x": i}}).json()["id"]
                  for i in range(3)]
        for rid in others:
            assert c.post("/v1/reports", json={"id": rid, "kind": "wrong"}).json()["accepted"]
    counted = sum(r.s for r in store.telemetry("churn-v2") if r.signal == "report_rate")
    store.close()
    assert [a["accepted"] for a in answers] == [True] + [False] * 55
    assert counted == 4  # mallory once, and each of the three other users
