"""The dashboard in a real browser against a real ``safeshift serve`` (a subprocess on a loopback
port, SQLite store, real tokens) while traffic drives its rollouts."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import Page, expect
from tests.dashboard.browser import axe_violations, format_violations, screenshot
from tests.serve_process import serve_process

from safeshift import ops
from safeshift.auth import Role
from safeshift.clock import SystemClock
from safeshift.store import open_store

pytestmark = pytest.mark.process

COUNTRIES = ["US", "BR", "IN", "GB", "DE"]


def _plan(rollout: str, endpoint: str, *, candidate: str) -> dict[str, object]:
    return {
        "rollout": rollout, "endpoint": endpoint,
        "baseline": {"version": "v1", "model": "fake:base?output=1"},
        "candidate": {"version": "v2", "model": candidate},
        "change": {"summary": f"a new {endpoint} model", "why": "better offline",
                   "owner": "ml-team", "validation": "holdout AUC +0.02"},
        "unit": "user_id", "segments": ["country"],
        "stages": [{"name": "canary", "traffic": "20%", "min_duration": "2s", "min_samples": 60},
                   {"name": "half", "traffic": "50%", "min_duration": "1h"},
                   {"name": "full", "traffic": "100%"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.05},
                       {"metric": "latency_ms", "above": 250, "tolerance": 0.05}],
        "analysis": {"alpha": 0.05, "expected_samples": 300},
    }


@dataclass
class Server:
    url: str
    store: str
    tokens: dict[str, str]

    def send(self, endpoint: str, n: int, seed: int = 1) -> None:
        rng = random.Random(seed)
        auth = {"authorization": f"Bearer {self.tokens['client']}"}
        with httpx.Client(base_url=self.url, headers=auth, timeout=10) as client:
            for _ in range(n):
                r = client.post(f"/v1/endpoints/{endpoint}/predict", json={
                    "unit": f"u{rng.randrange(10**6)}", "inputs": {"x": 1},
                    "context": {"country": rng.choice(COUNTRIES)}})
                assert r.status_code == 200, r.text

    def state(self, rollout: str) -> str:
        st = open_store(self.store)
        try:
            return str(st.get_state(rollout).phase), st.get_state(rollout).stage_index
        finally:
            st.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("dashboard")
    plans = []
    for rollout, endpoint, candidate in (("checkout-v2", "checkout", "fake:cand?output=1"),
                                         ("search-v2", "search", "fake:cand?output=1")):
        path = tmp / f"{rollout}.yaml"
        path.write_text(yaml.safe_dump(_plan(rollout, endpoint, candidate=candidate)))
        plans.append(str(path))
    store = str(tmp / "store.db")
    st = open_store(store)
    tokens = {}
    for name, role in (("ci-client", Role.CLIENT), ("vera", Role.VIEWER),
                       ("olga", Role.OPERATOR)):
        tokens[role.value], _ = ops.create_token(st, SystemClock(), name=name, role=role,
                                                 expires_in=None)
    st.close()
    log = tmp / "serve.log"
    with serve_process(plans, store=store, log=log) as url:
        yield Server(url, store, {"client": tokens["client"], "viewer": tokens["viewer"],
                                  "operator": tokens["operator"]})
    stderr = log.read_text()
    assert "Traceback" not in stderr, stderr[-3000:]
    # the tokens never reached a log line (they travel in a form body and a cookie only)
    assert not any(t in stderr for t in tokens.values())


def sign_in(page: Page, server: Server, role: str) -> None:
    page.goto(server.url + "/")
    expect(page).to_have_url(server.url + "/ui/login")
    page.get_by_label("Token").fill(server.tokens[role])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Rollouts")).to_be_visible()
    assert server.tokens[role] not in page.url


def assert_accessible(page: Page) -> None:
    violations = axe_violations(page)
    assert not violations, format_violations(violations)


def test_sign_in_is_needed_and_a_bad_token_is_refused(page: Page, server: Server) -> None:
    page.goto(server.url + "/ui/rollouts/checkout-v2")
    expect(page).to_have_url(server.url + "/ui/login")
    assert_accessible(page)
    page.get_by_label("Token").fill("ss_forged_token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Sign-in refused")
    cookies = page.context.cookies()
    assert not [c for c in cookies if c["name"] == "safeshift_session"]


def test_list_loads_and_filters(page: Page, server: Server) -> None:
    sign_in(page, server, "viewer")
    table = page.get_by_role("table")
    expect(table).to_contain_text("checkout-v2")
    expect(table).to_contain_text("search-v2")
    expect(table).to_contain_text("running")
    cookie = next(c for c in page.context.cookies() if c["name"] == "safeshift_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert_accessible(page)
    screenshot(page, "list")
    page.get_by_label("Phase", exact=True).select_option("rolled_back")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("No rollouts in phase rolled_back")).to_be_visible()


def test_page_updates_on_a_stage_change_without_reload(page: Page, server: Server) -> None:
    sign_in(page, server, "viewer")
    page.goto(server.url + "/ui/rollouts/checkout-v2")
    expect(page.locator("#stage")).to_have_text("canary")
    page.evaluate("window.__loaded_once = true")
    server.send("checkout", 900)
    # the controller advances once the canary's guardrails pass; the page follows by itself
    expect(page.locator("#stage")).to_have_text("half", timeout=30_000)
    assert page.evaluate("window.__loaded_once === true")  # the same document: no reload
    expect(page.locator("#decisions")).to_contain_text("advance")
    expect(page.locator(".guardrail svg").first).to_be_visible()
    expect(page.locator("table.grid")).to_contain_text("country=BR")
    server.send("checkout", 600, seed=2)
    page.wait_for_timeout(6_000)  # the numbers move: re-rendered within REFRESH_SECONDS
    assert_accessible(page)
    screenshot(page, "rollout-running")


def test_viewer_sees_no_actions_and_a_forged_action_is_refused(page: Page, server: Server) -> None:
    sign_in(page, server, "viewer")
    page.goto(server.url + "/ui/rollouts/search-v2")
    expect(page.locator("#phase")).to_have_text("running")
    assert page.locator("details.action").count() == 0
    assert page.get_by_role("heading", name="Actions").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    # the viewer's own session, the page's own anti-forgery field: still the wrong role
    forged = page.request.post(server.url + "/ui/rollouts/search-v2/act", form={
        "action": "rollback", "reason": "forged", "confirm": "yes", "csrf": csrf},
        headers={"accept": "application/json"})
    assert forged.status == 403
    assert "operator role" in forged.json()["error"]
    # and without the anti-forgery field (a request made elsewhere)
    no_csrf = page.request.post(server.url + "/ui/rollouts/search-v2/act", form={
        "action": "rollback", "reason": "forged", "confirm": "yes"},
        headers={"accept": "application/json"})
    assert no_csrf.status == 403 and "anti-forgery" in no_csrf.json()["error"]
    # the control API says the same to the viewer's token
    api = httpx.post(server.url + "/v1/rollouts/search-v2/rollback", json={"reason": "forged"},
                     headers={"authorization": f"Bearer {server.tokens['viewer']}"})
    assert api.status_code == 403
    assert server.state("search-v2")[0] == "running"


def test_operator_rolls_back_and_the_page_shows_it_within_a_second(page: Page,
                                                                  server: Server) -> None:
    sign_in(page, server, "operator")
    server.send("search", 300, seed=3)
    page.goto(server.url + "/ui/rollouts/search-v2")
    expect(page.get_by_role("heading", name="Actions")).to_be_visible()
    page.locator("summary", has_text="Roll back").click()
    form = page.locator("form.act[data-action=rollback]")
    form.get_by_label("Reason for roll back").fill("checkout latency complaints from support")
    form.get_by_label("I confirm", exact=False).check()
    started = time.monotonic()
    form.get_by_role("button", name="Roll back now").click()
    expect(page.locator("#phase")).to_have_text("rolled_back", timeout=1_000)
    expect(page.locator("#audit")).to_contain_text("rollback", timeout=1_000)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, elapsed
    expect(page.locator("#notice")).to_contain_text("rolled_back by olga")
    expect(page.locator("#decisions")).to_contain_text("checkout latency complaints")
    assert server.state("search-v2")[0] == "rolled_back"
    assert_accessible(page)
    screenshot(page, "rollout-rolled-back")
    # the decision page explains a person's action
    page.goto(server.url + "/ui/rollouts/search-v2/decisions/2")
    expect(page.locator("pre.explain")).to_contain_text("a person's action")
    assert_accessible(page)


def test_actions_work_from_the_keyboard(page: Page, server: Server) -> None:
    sign_in(page, server, "operator")
    page.goto(server.url + "/ui/rollouts/checkout-v2")
    for _ in range(60):  # Tab through the page to the pause action
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent.trim()") == "Pause":
            break
    else:
        pytest.fail("the Pause action cannot be reached with the keyboard")
    page.keyboard.press("Enter")
    reason = page.get_by_label("Reason for pause")
    expect(reason).to_be_visible()
    page.keyboard.press("Tab")
    expect(reason).to_be_focused()
    page.keyboard.type("keyboard check")
    page.keyboard.press("Tab")
    page.keyboard.press("Space")  # the confirmation box
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#phase")).to_have_text("paused", timeout=2_000)
    page.locator("summary", has_text="Resume").click()
    form = page.locator("form.act[data-action=resume]")
    form.get_by_label("Reason for resume").fill("keyboard check done")
    form.get_by_label("I confirm", exact=False).check()
    form.get_by_role("button", name="Resume now").click()
    expect(page.locator("#phase")).to_have_text("running", timeout=2_000)


def test_decision_page_re_derives_and_runs_a_what_if(page: Page, server: Server) -> None:
    sign_in(page, server, "viewer")
    page.goto(server.url + "/ui/rollouts/checkout-v2/decisions/2")
    expect(page.get_by_role("status")).to_contain_text("matches the stored decision exactly")
    page.get_by_label("What if").fill("tolerance.error_rate=0.0001")
    page.get_by_role("button", name="Re-run").click()
    expect(page.locator("pre.explain")).to_contain_text("WOULD HAVE CHANGED")
    assert_accessible(page)
    screenshot(page, "decision")


def test_report_is_one_self_contained_file(page: Page, server: Server, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "safeshift.cli", "report", "search-v2", "-o",
                        str(out), "--store", server.store], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert html.count("<svg") >= 3 and "rolled_back" in html
    page.goto(out.as_uri())
    expect(page.get_by_role("heading", name="search-v2")).to_be_visible()
    assert_accessible(page)
    screenshot(page, "report")
