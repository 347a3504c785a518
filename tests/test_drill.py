"""Rollback drills (safeshift drill) on the churn example plan, through the real serving path
and controller on the wall clock: each fault rolled back with no user-visible error, in the
right order, recorded in the audit log as a drill; faults the plan cannot catch skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safeshift import ops
from safeshift.cli import app
from safeshift.drill import FaultInjector, drill_plan, run_drill
from safeshift.errors import PlanValidationError
from safeshift.models import FakeModel
from safeshift.plan import DRILL_MARK, Plan
from safeshift.store import open_store

CHURN = Path(__file__).resolve().parents[1] / "examples" / "churn" / "plan.yaml"


def test_each_fault_is_rolled_back_without_user_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'drill.db'}"
    report = run_drill(Plan.load(CHURN), ["errors", "wrong-segment", "hang", "latency"],
                       store=url, warmup=1.0, bound=30.0)
    assert report.ok, report.to_json()
    assert report.stage == "half" and report.traffic == 0.5
    drilled = {r.fault: r for r in report.faults}
    # the example's latency threshold equals its timeout: slow calls time out instead
    assert drilled["latency"].skipped is not None and "timeout" in drilled["latency"].skipped
    store = open_store(url)
    try:
        for fault in ("errors", "wrong-segment", "hang"):
            r = drilled[fault]
            assert r.rolled_back and r.user_errors == 0 and r.early is None
            assert r.decision_s is not None and r.decision_s > 0  # the fault came first
            assert r.last_candidate_s is not None and r.last_candidate_s <= r.decision_s + 1.0
            assert r.requests > 0 and r.candidate_answers > 0
            assert DRILL_MARK in r.rollout and r.rollout.endswith(fault)
            events = ops.audit_events(store, r.rollout)
            assert events[-1].action == "rollback" and events[-1].detail["drill"] is True
            assert ops.verify_audit(store, r.rollout).ok
            assert ops.stored_plan(store, r.rollout).rollout == r.rollout  # reads back
        assert "error_rate" in drilled["errors"].caught_by
        assert drilled["errors"].breaker_opened
        assert "accuracy" in drilled["wrong-segment"].caught_by
        assert "churn-v2" not in {s.name for s in store.list_states()}  # never the real one
    finally:
        store.close()


def test_drill_copy_starts_in_the_widest_stage_ungated() -> None:
    copy, stage = drill_plan(Plan.load(CHURN), "churn-v2" + DRILL_MARK + "t1")
    assert stage == "half" and len(copy.stages) == 1
    assert copy.stages[0].approval_rule is None and copy.stages[0].traffic == 5000
    assert all(g.metric != "disagreement" for g in copy.guardrails)  # shadow only: left out


def test_plan_files_cannot_take_a_drill_name(tmp_path: Path) -> None:
    data = yaml.safe_load(CHURN.read_text())
    data["rollout"] = "churn-v2~drill-20260101t000000-errors"
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanValidationError, match="safeshift drill"):
        Plan.load(path)


def test_wrong_segment_is_skipped_without_a_label_guardrail(tmp_path: Path) -> None:
    data = yaml.safe_load(CHURN.read_text())
    data["guardrails"] = [g for g in data["guardrails"] if g["metric"] != "accuracy"]
    data["baseline"]["model"] = "joblib:" + str(CHURN.parent / "models/churn_v1.joblib")
    data["candidate"]["model"] = "joblib:" + str(CHURN.parent / "models/churn_v2.joblib")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    report = run_drill(Plan.load(path), ["wrong-segment"])
    assert report.faults[0].skipped is not None and "label" in report.faults[0].skipped
    assert not report.ok  # nothing was drilled


def test_injector_passes_through_until_a_fault() -> None:
    inj = FaultInjector(FakeModel(output=1))
    assert inj.predict([{}]).outputs == [1]
    inj.inject("errors")
    assert inj.predict([{}]).error is not None
    inj.release()
    assert inj.predict([{}]).ok


def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["drill", str(CHURN), "--fault", "meteor"])
    assert bad.exit_code == 2 and "unknown fault" in bad.output
    missing = runner.invoke(app, ["drill", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2


def test_cli_drill_json_exit_0(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["drill", str(CHURN), "--fault", "errors", "--json",
                                      "--store", str(tmp_path / "d.db")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] and data["faults"][0]["user_visible_errors"] == 0
    assert data["faults"][0]["fault_to_decision_s"] > 0
