"""Retention: records past their age are purged, the evidence of a running stage stays, and the
audit log still verifies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import plan_dict
from tests.test_controller import make

from safeshift import FakeModel, Plan, VirtualClock, ops
from safeshift.explain import explain, explain_lines
from safeshift.rollout import PURGE_EVERY
from safeshift.state import Phase
from safeshift.store import SQLStore, Store, sqlite_url

DAY = 86400.0


def _drive(store: Store, plan: Plan, clock: VirtualClock) -> list[str]:
    """The canary passes and the rollout runs in its second stage; returns request ids."""
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    ids = []
    for step in range(400):
        for i in range(60):
            ids.append(rollout.predict({"x": 1}, unit=f"u{step}-{i}",
                                       context={"country": "BR"}).id)
        clock.advance(10)
        rollout.tick()
        if store.get_state(plan.rollout).stage_index == 1:
            break
    for i in range(50):  # some traffic in the second stage too
        ids.append(rollout.predict({"x": 1}, unit=f"h{i}", context={"country": "BR"}).id)
    for request_id in ids[:5]:
        rollout.report(request_id, "wrong", "call me on +1 415 555 0100")
    rollout.flush()
    assert store.get_state(plan.rollout).stage_index == 1  # in "half" now
    return ids


def test_purge_removes_old_records_and_keeps_the_running_stage(store: Store) -> None:
    clock = VirtualClock()
    plan = Plan.from_dict(plan_dict(guardrails=[{"metric": "error_rate", "tolerance": 0.02},
                                                {"metric": "report_rate", "tolerance": 0.5}]))
    ids = _drive(store, plan, clock)
    name = plan.rollout
    half = store.telemetry_totals(name, 1)
    assert store.telemetry_totals(name, 0) and half and store.report_texts(name)
    advanced = next(d for d in store.decisions(name) if d.action == "advance")
    assert store.decision_inputs(name, advanced.seq) is not None
    clock.advance(40 * DAY)
    counted = ops.purge(store, clock, older_than=30 * DAY, dry_run=True)[name]
    assert counted["requests"] == len(ids) and counted["reports"] == 5
    assert counted["snapshots"] > 0 and counted["telemetry"] > 0
    assert store.get_request(ids[0]) is not None  # a dry run deletes nothing
    done = ops.purge(store, clock, older_than=30 * DAY)[name]
    assert done == counted
    assert store.get_request(ids[0]) is None and store.get_request(ids[-1]) is None
    assert store.report_texts(name) == [] and store.snapshots(name) == []
    assert store.telemetry_totals(name, 0) == []  # the canary ended: its windows went
    assert store.telemetry_totals(name, 1) == half  # the running stage keeps its evidence
    assert store.decision_inputs(name, advanced.seq) is None
    assert ops.verify_audit(store, name).ok  # decisions and the audit log stay
    e = explain(store, name, advanced.seq)
    assert e.kind == "purged" and "purged by retention" in "\n".join(explain_lines(e))
    assert ops.purge(store, clock, older_than=30 * DAY)[name] == {
        "requests": 0, "reports": 0, "telemetry": 0, "snapshots": 0}


def test_the_controller_applies_the_plan_s_retention(tmp_path: Path) -> None:
    clock = VirtualClock()
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    plan = Plan.from_dict(plan_dict(retention={"snapshots": "1d", "reports": "2d"},
                                    guardrails=[{"metric": "error_rate", "tolerance": 0.02},
                                                {"metric": "report_rate", "tolerance": 0.5}]))
    assert plan.retention.snapshots == DAY and plan.canonical()["retention"]
    assert "retention" not in Plan.from_dict(plan_dict()).canonical()  # unset: hash unchanged
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    ids = [rollout.predict({"x": 1}, unit=f"u{i}").id for i in range(200)]
    rollout.flush()
    rollout.report(ids[0], "wrong", "nothing personal here")
    clock.advance(60)
    rollout.tick()
    assert store.snapshots(plan.rollout) and store.report_texts(plan.rollout)
    clock.advance(1.5 * DAY + PURGE_EVERY)
    rollout.tick()  # the snapshots are past a day; the report is not past two
    kept = store.snapshots(plan.rollout)
    assert kept and min(s.at for s in kept) >= clock.now() - DAY
    assert store.report_texts(plan.rollout)
    clock.advance(DAY)
    rollout.tick()
    assert store.report_texts(plan.rollout) == []
    assert store.get_state(plan.rollout).phase is Phase.RUNNING
    store.close()


def test_cli_purge(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = VirtualClock()
    store = SQLStore(sqlite_url(db))
    plan = Plan.from_dict(plan_dict())
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    for i in range(50):
        rollout.predict({"x": 1}, unit=f"u{i}")
    rollout.flush()
    store.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "safeshift.cli", "purge", *args,
                               "--store", str(db)], capture_output=True, text=True, timeout=60)

    # the virtual clock starts in 2026-01: today, every record is months old
    dry = cli("--older-than", "30d", "--dry-run")
    assert dry.returncode == 0 and "would delete 50 requests" in dry.stdout, dry.stdout
    assert cli("--older-than", "30d").returncode == 0
    again = cli("--older-than", "30d", "--dry-run")
    assert "would delete 0 requests" in again.stdout
    assert "nothing (no retention)" in cli("--dry-run").stdout
    bad = cli("--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def test_privacy_report_lists_what_the_store_holds(store: Store) -> None:
    clock = VirtualClock()
    plan = Plan.from_dict(plan_dict(segments=["country", "email"], personal=["email"],
                                    consent={"attribute": "analytics"},
                                    retention={"reports": "30d"},
                                    guardrails=[{"metric": "error_rate", "tolerance": 0.02},
                                                {"metric": "report_rate", "tolerance": 0.5}]))
    rollout = make(plan, store, clock, candidate=FakeModel(output=1))
    ids = [rollout.predict({"x": 1}, unit=f"u{i}", context={
        "country": "BR", "email": f"p{i}@example.org", "analytics": "yes"}).id for i in range(30)]
    rollout.flush()
    rollout.report(ids[0], "wrong", "")
    clock.advance(60)
    rollout.tick()
    [report] = ops.privacy_report(store, rollout=plan.rollout)
    assert report["attributes"] == [
        {"attribute": "country", "pseudonymised": False,
         "stored_as": "as sent (cut to 64 characters)"},
        {"attribute": "email", "pseudonymised": True, "stored_as": "keyed pseudonym (p:…)"}]
    assert report["consent"]["attribute"] == "analytics"
    records = report["records"]
    assert records["requests"]["count"] == 30 and records["telemetry"]["count"] > 0
    assert records["decisions"]["count"] >= 1 and records["audit"]["count"] >= 1
    assert records["requests"]["oldest"] is not None
    assert report["retention"]["reports"] == 30 * DAY
    assert report["retention"]["requests"] == plan.serving.label_window
    assert "example.org" not in str(report)
