"""Reports (HTML, Markdown, JSON) from one view, and the standalone dashboard over a store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.conftest import plan_dict
from tests.test_controller import make, run

from safeshift import FakeModel, Plan, VirtualClock, ops
from safeshift.auth import Role
from safeshift.dashboard.app import create_dashboard_app
from safeshift.report import render_report
from safeshift.store import SQLStore, sqlite_url
from safeshift.view import rollout_view


@pytest.fixture
def rolled_back(tmp_path: Path) -> tuple[Path, Plan, VirtualClock]:
    clock = VirtualClock()
    db = tmp_path / "s.db"
    store = SQLStore(sqlite_url(db))
    plan = Plan.from_dict(plan_dict(change={"summary": "a <b>bold</b> change", "owner": "ml",
                                            "why": "faster", "validation": "offline AUC"}))
    rollout = make(plan, store, clock, candidate=FakeModel(output=2, error_rate=0.3))
    run(rollout, clock)
    store.close()
    return db, plan, clock


def test_reports_state_what_was_tested_how_much_and_why_it_ended(
        rolled_back: tuple[Path, Plan, VirtualClock]) -> None:
    db, plan, clock = rolled_back
    store = SQLStore(sqlite_url(db))
    view = rollout_view(store, plan.rollout, clock)
    store.close()
    assert view["phase"] == "rolled_back" and view["verdicts_from"].startswith("decision")
    md = render_report(view, "md")
    assert "# Rollout report: test-rollout" in md
    assert "a \\<b\\>bold\\</b\\> change" in md  # operator text cannot inject markup
    assert "**rolled_back**" in md and "harm proven" in md
    assert re.search(r"canary: baseline [\d,]+, candidate [\d,]+", md)
    assert "| error rate | harm |" in md
    assert f"safeshift explain {plan.rollout}#2" in md
    doc = json.loads(render_report(view, "json"))
    assert doc["phase"] == "rolled_back"
    assert doc["guardrails"][0]["class"] == "harm"
    assert doc["counts"]["fallbacks"] > 0  # the failing candidate's users got the baseline
    html = render_report(view, "html")
    assert "<script" not in html and "<link" not in html and html.count("<svg") >= 3
    assert "a &lt;b&gt;bold&lt;/b&gt; change" in html
    with pytest.raises(ValueError, match="unknown report format"):
        render_report(view, "pdf")


def test_cli_report_writes_files_and_refuses_bad_input(
        rolled_back: tuple[Path, Plan, VirtualClock], tmp_path: Path) -> None:
    db, plan, _ = rolled_back

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "safeshift.cli", "report", *args,
                               "--store", str(db)], capture_output=True, text=True, timeout=120)

    out = tmp_path / "r.md"
    r = cli(plan.rollout, "--format", "md", "-o", str(out))
    assert r.returncode == 0 and "wrote" in r.stderr
    assert out.read_text().startswith("# Rollout report")
    assert cli(plan.rollout, "--format", "pdf").returncode == 2
    missing = cli("nope")
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_standalone_dashboard_needs_a_token_and_serves_the_pages(
        rolled_back: tuple[Path, Plan, VirtualClock]) -> None:
    from tests.gateway.gateway_helpers import running

    db, plan, clock = rolled_back
    store = SQLStore(sqlite_url(db))
    token, _ = ops.create_token(store, clock, name="vic", role=Role.VIEWER, expires_in=None)
    client_token, _ = ops.create_token(store, clock, name="app", role=Role.CLIENT,
                                       expires_in=None)
    try:
        with running(create_dashboard_app(store, clock=clock, access_log=False)) as url:
            anonymous = httpx.get(f"{url}/ui/rollouts/{plan.rollout}")
            assert anonymous.status_code == 303 and anonymous.headers["location"] == "/ui/login"
            assert httpx.get(f"{url}/ui/login").status_code == 200
            assert httpx.get(f"{url}/favicon.ico").status_code == 204
            bad = httpx.post(f"{url}/ui/login", data={"token": "ss_nope"})
            assert bad.status_code == 401 and "Sign-in refused" in bad.text
            good = httpx.post(f"{url}/ui/login", data={"token": token})
            assert good.status_code == 303
            cookie = good.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
            with httpx.Client(base_url=url, cookies={"safeshift_session": token}) as c:
                page = c.get(f"/ui/rollouts/{plan.rollout}")
                assert page.status_code == 200 and "rolled_back" in page.text
                assert "script-src 'self'" in page.headers["content-security-policy"]
                assert c.get("/").status_code == 200
                report = c.get(f"/ui/rollouts/{plan.rollout}/report?format=md")
                assert report.status_code == 200 and report.text.startswith("# Rollout report")
                assert c.get("/ui/rollouts/nope").status_code == 404
                live = c.get(f"/ui/rollouts/{plan.rollout}/live?version=0&rendered=0")
                assert live.status_code == 200 and "html" in live.json()
                version = live.json()["version"]
                assert c.get(f"/ui/rollouts/{plan.rollout}/live", params={
                    "version": version, "rendered": clock.now()}).status_code == 204
            # a client token (the data plane's) may not read the dashboard
            with httpx.Client(base_url=url, cookies={"safeshift_session": client_token}) as c:
                refused = c.get("/")
                assert refused.status_code == 403 and "viewer role" in refused.text
    finally:
        store.close()


def test_personal_segments_show_pseudonyms_and_an_operator_finds_one(tmp_path: Path) -> None:
    from tests.gateway.gateway_helpers import running

    from safeshift import Rollout
    from safeshift.pseudonym import pseudonymizer

    clock = VirtualClock()
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    plan = Plan.from_dict(plan_dict(segments=["email"], personal=["email"]))
    rollout = Rollout.from_plan(plan, store=store, clock=clock, models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    emails = [f"person{i}@example.org" for i in range(5)]
    for i in range(400):
        rollout.predict({"x": 1}, unit=f"u{i}", context={"email": emails[i % 5]})
    rollout.flush()
    viewer, _ = ops.create_token(store, clock, name="vic", role=Role.VIEWER, expires_in=None)
    operator, _ = ops.create_token(store, clock, name="olga", role=Role.OPERATOR,
                                   expires_in=None)
    pseudonym = pseudonymizer().pseudonym("email", emails[2])
    try:
        with running(create_dashboard_app(store, clock=clock, access_log=False)) as url:
            for token in (viewer, operator):
                with httpx.Client(base_url=url, cookies={"safeshift_session": token}) as c:
                    page = c.get(f"/ui/rollouts/{plan.rollout}")
                    assert page.status_code == 200
                    assert f"email={pseudonym}" in page.text
                    assert "example.org" not in page.text
                    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
                    assert csrf is not None
                    found = c.post(f"/ui/rollouts/{plan.rollout}/reveal", data={
                        "csrf": csrf.group(1), "attribute": "email", "value": emails[2]})
                    if token == viewer:
                        assert found.status_code == 403 and "operator role" in found.text
                    else:
                        assert found.status_code == 200
                        assert f"email={emails[2]} ({pseudonym})" in found.text
                        assert f"is email={pseudonym} in the grid" in found.text
    finally:
        store.close()


def test_a_reviewer_signs_off_on_the_dashboard(tmp_path: Path) -> None:
    from tests.gateway.gateway_helpers import running

    from safeshift import Rollout

    clock = VirtualClock()
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    stages = [{"name": "canary", "traffic": "10%", "reviews": [{"role": "privacy"}]},
              {"name": "full", "traffic": "100%"}]
    plan = Plan.from_dict(plan_dict(stages=stages))
    Rollout.from_plan(plan, store=store, clock=clock, models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    pat, _ = ops.create_token(store, clock, name="pat", role=Role.VIEWER, expires_in=None,
                              rights={"reviews": ["privacy"]})
    vic, _ = ops.create_token(store, clock, name="vic", role=Role.VIEWER, expires_in=None)
    try:
        with running(create_dashboard_app(store, clock=clock, access_log=False)) as url:
            with httpx.Client(base_url=url, cookies={"safeshift_session": vic}) as c:
                page = c.get(f"/ui/rollouts/{plan.rollout}")
                assert "the privacy review" in page.text  # what it waits for
                assert "Sign off the privacy review" not in page.text
            with httpx.Client(base_url=url, cookies={"safeshift_session": pat}) as c:
                page = c.get(f"/ui/rollouts/{plan.rollout}")
                assert "Sign off the privacy review" in page.text
                csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
                assert csrf is not None
                done = c.post(f"/ui/rollouts/{plan.rollout}/act", data={
                    "csrf": csrf.group(1), "action": "review", "review": "privacy",
                    "reason": "data collection checked", "confirm": "yes"},
                    headers={"accept": "application/json"})
                assert done.status_code == 200, done.text
                assert "review → running by pat" in done.json()["message"]
        assert store.get_state(plan.rollout).stage_index == 0
        assert [d.actor for d in store.decisions(plan.rollout)][-1] == "pat"
    finally:
        store.close()
