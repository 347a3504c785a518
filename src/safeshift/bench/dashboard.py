"""``safeshift bench dashboard``: what the rollout page weighs and how fast it follows the store.

A rollout with 5 guardrails and 10 segment values (country 6, device 4), 24 hours of verdict
snapshots (one a minute, 1,440, each with 55 verdicts) and real telemetry from a real model
call path (``Rollout.predict``), in a SQLite store, behind the standalone dashboard app
(``safeshift dashboard``) on a loopback port. Figures:

- **page weight**: bytes of the rollout page's HTML, its stylesheet and its script (the charts
  are inline SVG: there is nothing else to fetch);
- **server time**: median wall time of ``GET /ui/rollouts/NAME`` over several requests;
- **load time** in Debian's Chromium (when Playwright and ``/usr/bin/chromium`` are present):
  the median of navigation start to the load event;
- **follow time**: from a commit that changes the rollout's phase in the store (a pause or a
  resume, through :func:`safeshift.ops.act`) to the open page showing the new phase without a
  reload — the median and the largest of 20.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from safeshift import ops
from safeshift.auth import Role
from safeshift.clock import SystemClock
from safeshift.models import FakeModel
from safeshift.plan import Plan
from safeshift.rollout import Rollout
from safeshift.snapshots import snapshot_of
from safeshift.state import Action
from safeshift.store import SQLStore, sqlite_url

__all__ = ["bench_plan", "main"]

HOURS = 24.0
FOLLOW_RUNS = 20
CHROMIUM = Path("/usr/bin/chromium")
COUNTRIES = ["US", "BR", "IN", "GB", "DE", "JP"]
DEVICES = ["ios", "android", "web", "tv"]


def bench_plan() -> Plan:
    return Plan.from_dict({
        "rollout": "bench-dashboard", "endpoint": "bench",
        "baseline": {"version": "v1", "model": "fake:base?output=1"},
        "candidate": {"version": "v2", "model": "fake:cand?output=1"},
        "change": {"summary": "dashboard benchmark", "owner": "bench"},
        "unit": "user_id", "segments": ["country", "device"],
        "stages": [{"name": "canary", "traffic": "10%", "min_duration": "48h"},
                   {"name": "full", "traffic": "100%"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.01},
                       {"metric": "latency_ms", "above": 250, "tolerance": 0.02},
                       {"metric": "latency_ms", "above": 1000, "tolerance": 0.01},
                       {"metric": "latency_ms", "tolerance": 20},
                       {"metric": "report_rate", "tolerance": 0.01}],
        "analysis": {"alpha": 0.05, "expected_samples": 5000},
    })


def stages_plan() -> Plan:
    """A rollout of 21 stages, to time the page following real stage changes."""
    return Plan.from_dict({
        "rollout": "bench-stages", "endpoint": "bench-stages",
        "baseline": {"version": "v1", "model": "fake:base?output=1"},
        "candidate": {"version": "v2", "model": "fake:cand?output=1"},
        "change": {"summary": "stage changes", "owner": "bench"},
        "stages": [{"name": f"s{i}", "traffic": f"{i}%", "min_duration": "1h"}
                   for i in range(1, 22)],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.01}],
    })


def _advance(store: SQLStore, plan: Plan, clock: SystemClock) -> str:
    """Commit a stage change exactly as the controller does when a stage passes (the same
    commit: new state, decision, audit event); returns the new stage's name."""
    from safeshift.controller import Controller, Intent
    from safeshift.state import Phase

    state = store.get_state(plan.rollout)
    to = state.stage_index + 1
    Controller(plan, store, clock)._commit(
        state, Intent(Action.ADVANCE, f"bench: stage {plan.stages[state.stage_index].name!r} "
                      "passed", to, Phase.RUNNING), "controller", clock.now())
    return plan.stages[to].name


def _build(path: Path, requests: int) -> tuple[str, str]:
    """The store: the rollout, its telemetry, 24 h of snapshots; returns (url, viewer token)."""
    plan = bench_plan()
    url = sqlite_url(path)
    store = SQLStore(url)
    clock = SystemClock()
    rollout = Rollout.from_plan(plan, store=store, clock=clock, models={
        "baseline": FakeModel(output=1, seed=1),
        "candidate": FakeModel(output=1, error_rate=0.005, seed=2)})
    rng = random.Random(5)
    for _ in range(requests):
        rollout.predict({"x": 1}, unit=f"u{rng.randrange(20_000)}",
                        context={"country": rng.choice(COUNTRIES), "device": rng.choice(DEVICES)})
    rollout.flush()
    analysis = ops.stage_analysis(plan, store, store.get_state(plan.rollout))
    assert analysis is not None
    now = clock.now()
    start = now - HOURS * 3600
    for minute in range(int(HOURS * 60)):
        at = start + minute * 60.0
        snap = snapshot_of(plan.rollout, analysis, at)
        shrink = (minute + 1) / (HOURS * 60)  # bands that narrow over the day
        for row in [*snap.body["verdicts"], *snap.body["segments"]]:
            if row[5] is not None and row[6] is not None and row[4] is not None:
                half = (row[6] - row[5]) / 2 / shrink ** 0.5
                row[5], row[6] = row[4] - half, row[4] + half
        store.put_snapshot(snap)
    ops.create(store, stages_plan(), clock)
    token, _ = ops.create_token(store, clock, name="bench-viewer", role=Role.VIEWER,
                                expires_in=None)
    store.close()
    return url, token


@contextmanager
def _serving(url: str) -> Iterator[tuple[str, SQLStore]]:
    import uvicorn

    from safeshift.dashboard.app import create_dashboard_app

    store = SQLStore(url)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_dashboard_app(store, access_log=False), log_config=None,
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", store
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        store.close()


def _browser_figures(base: str, token: str, store: SQLStore, name: str,
                     console: Console, screenshots: Path | None = None) -> dict[str, Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"browser": "playwright is not installed (pip install 'safeshift[dev]')"}
    if not CHROMIUM.exists():
        return {"browser": f"no {CHROMIUM} (apt-get install chromium)"}
    out: dict[str, Any] = {}
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        # the page's policy forbids evaluated strings, which Playwright's waiting uses: the
        # bench measures time, not the policy (the browser tests run with it)
        page = browser.new_context(viewport={"width": 1280, "height": 900},
                                   bypass_csp=True).new_page()
        page.goto(base + "/ui/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        loads = []
        for _ in range(5):
            page.goto(f"{base}/ui/rollouts/{name}")
            loads.append(page.evaluate(
                "() => { const t = performance.getEntriesByType('navigation')[0];"
                " return t.loadEventEnd - t.startTime; }"))
        out["load_ms"] = statistics.median(loads)
        if screenshots is not None:
            screenshots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshots / "rollout-24h.png"), full_page=True)
        clock = SystemClock()
        jitter = random.Random(11)
        follow = []
        for i in range(FOLLOW_RUNS):
            if i % 5 == 0:
                console.print(f"  ... follow {i + 1}/{FOLLOW_RUNS}", markup=False)
            action = Action.PAUSE if i % 2 == 0 else Action.RESUME
            want = "paused" if action is Action.PAUSE else "running"
            page.wait_for_timeout(jitter.uniform(200, 700))  # not in step with the polling
            t0 = time.perf_counter()
            ops.act(store, name, action, clock, reason="bench: follow time")
            page.wait_for_function("(want) => document.getElementById('phase').textContent"
                                   ".trim() === want", arg=want, timeout=10_000, polling=10)
            follow.append((time.perf_counter() - t0) * 1000)
        out["follow_ms"] = follow
        # real stage changes, on a page without telemetry (so lighter to render)
        plan = stages_plan()
        page.goto(f"{base}/ui/rollouts/{plan.rollout}")
        stages = []
        for i in range(FOLLOW_RUNS):
            page.wait_for_timeout(jitter.uniform(200, 700))
            t0 = time.perf_counter()
            want = _advance(store, plan, clock)
            page.wait_for_function("(want) => document.getElementById('stage').textContent"
                                   ".trim() === want", arg=want, timeout=10_000, polling=10)
            stages.append((time.perf_counter() - t0) * 1000)
            if i % 5 == 0:
                console.print(f"  ... stage change {i + 1}/{FOLLOW_RUNS}", markup=False)
        out["stage_follow_ms"] = stages
        browser.close()
    return out


def main(*, quick: bool, json_path: Path | None, console: Console,
         screenshots: Path | None = None) -> dict[str, Any]:
    requests = 5_000 if quick else 30_000
    with TemporaryDirectory() as tmp:
        console.print(f"  ... building the store: {requests:,} requests, "
                      f"{int(HOURS * 60):,} snapshots", markup=False)
        url, token = _build(Path(tmp) / "bench.db", requests)
        name = bench_plan().rollout
        with _serving(url) as (base, store):
            cookies = {"safeshift_session": token}
            with httpx.Client(base_url=base, cookies=cookies, timeout=60) as client:
                page = client.get(f"/ui/rollouts/{name}")
                page.raise_for_status()
                css = client.get("/ui/static/dashboard.css").content
                js = client.get("/ui/static/dashboard.js").content
                times = []
                for _ in range(3 if quick else 7):
                    t0 = time.perf_counter()
                    client.get(f"/ui/rollouts/{name}").raise_for_status()
                    times.append((time.perf_counter() - t0) * 1000)
            last = store.snapshots(name, segments=True)[-1].body
            verdicts = len(last["verdicts"]) + len(last["segments"])
            figures = _browser_figures(base, token, store, name, console, screenshots)
    result: dict[str, Any] = {
        "snapshots": int(HOURS * 60), "verdicts_per_snapshot": verdicts, "requests": requests,
        "html_bytes": len(page.content), "css_bytes": len(css), "js_bytes": len(js),
        "server_ms": statistics.median(times), **figures}
    table = Table(title="dashboard: the rollout page (5 guardrails × 10 segment values, 24 h of "
                        "snapshots)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("HTML (charts inline)", f"{result['html_bytes'] / 1024:,.0f} KiB")
    table.add_row("stylesheet + script", f"{(len(css) + len(js)) / 1024:,.1f} KiB")
    table.add_row("server time, median", f"{result['server_ms']:,.0f} ms")
    if "load_ms" in result:
        follow = result["follow_ms"]
        table.add_row("browser load (navigation → load event), median", f"{result['load_ms']:,.0f} ms")
        table.add_row(f"phase change (pause/resume) → this page shows it, median of "
                      f"{len(follow)}", f"{statistics.median(follow):,.0f} ms")
        table.add_row("  largest", f"{max(follow):,.0f} ms")
        stages = result["stage_follow_ms"]
        table.add_row(f"stage change → a rollout's page shows it, median of {len(stages)}",
                      f"{statistics.median(stages):,.0f} ms")
        table.add_row("  largest", f"{max(stages):,.0f} ms")
    else:
        table.add_row("browser", str(result.get("browser")))
    console.print(table)
    console.print("Wall times on a shared machine. The page polls every 0.5 s and re-renders when "
                  "the rollout's state version moved (or every 5 s).", markup=False)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    return result
