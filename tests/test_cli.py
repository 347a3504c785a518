"""The command line as a user meets it: exit codes, one clear line per problem."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from tests.conftest import ROOT, plan_dict


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "safeshift.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def write(tmp_path: Path, data: object, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_reports_all_three_mistakes(tmp_path: Path) -> None:
    data = plan_dict()
    data["stages"][0]["traffic"] = "150%"
    data["stages"][1]["min_duration"] = "soon"
    del data["change"]
    r = cli("validate", str(write(tmp_path, data)))
    assert r.returncode == 2
    assert "3 problem(s)" in r.stderr
    for path in ("stages.0.traffic", "stages.1.min_duration", "change"):
        assert f"  {path}:" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("content", "expected"), [
    (None, "no such file"),
    ("rollout: [oops\n", "not valid YAML at line"),
])
def test_validate_file_problems_are_one_line(tmp_path: Path, content: str | None,
                                             expected: str) -> None:
    path = tmp_path / "plan.yaml"
    if content is not None:
        path.write_text(content)
    r = cli("validate", str(path))
    assert r.returncode == 2
    assert expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_validate_reports_plan_and_model_problems_together(tmp_path: Path) -> None:
    data = plan_dict()
    data["stages"][0]["traffic"] = "150%"
    data["candidate"]["model"] = "joblib:models/missing.joblib"
    data["baseline"] = {"version": "v1"}  # no model: a plan problem, not also a load problem
    r = cli("validate", str(write(tmp_path, data)))
    assert r.returncode == 2
    assert "3 problem(s)" in r.stderr, r.stderr
    for path in ("stages.0.traffic", "baseline.model", "candidate.model"):
        assert f"  {path}:" in r.stderr
    assert "no such file" in r.stderr


def test_validate_unknown_model_reference(tmp_path: Path) -> None:
    data = plan_dict()
    data["candidate"]["model"] = "joblib:models/missing.joblib"
    r = cli("validate", str(write(tmp_path, data)))
    assert r.returncode == 2
    assert "candidate.model" in r.stderr and "no such file" in r.stderr
    data["candidate"]["model"] = "torch:whatever"
    r = cli("validate", str(write(tmp_path, data)))
    assert r.returncode == 2 and "unknown model reference" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_ok_and_json(tmp_path: Path) -> None:
    path = write(tmp_path, plan_dict())
    r = cli("validate", str(path))
    assert r.returncode == 0 and "ok:" in r.stdout
    r = cli("validate", "--json", str(path))
    assert json.loads(r.stdout)["valid"] is True


def test_schema_is_json() -> None:
    r = cli("schema")
    assert r.returncode == 0
    assert json.loads(r.stdout)["title"] == "safeshift rollout plan"


def test_control_commands_on_a_store(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    r = cli("simulate", str(write(tmp_path, plan_dict())), "--scenario", "identical",
            "--hours", "0.1", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    name = json.loads(r.stdout)["rollout"]
    r = cli("status", name, "--store", store)
    assert r.returncode == 0 and name in r.stdout
    r = cli("pause", name, "--store", store, "--actor", "dana", "--reason", "checking")
    assert r.returncode == 0 and "paused" in r.stdout
    r = cli("pause", name, "--store", store, "--reason", "again")
    assert r.returncode == 2 and "already paused" in r.stderr
    r = cli("rollback", name, "--store", store, "--actor", "dana")
    assert r.returncode == 2 and "needs --reason" in r.stderr
    r = cli("rollback", name, "--store", store, "--actor", "dana", "--reason", "tickets")
    assert r.returncode == 0
    r = cli("history", name, "--store", store)
    # acting on the store directly is local access: the label stands beside it
    assert "local:dana" in r.stdout and "rollback" in r.stdout
    r = cli("audit", "verify", name, "--store", store)
    assert r.returncode == 0 and "chain intact" in r.stdout
    r = cli("status", "nope", "--store", store)
    assert r.returncode == 2 and "no rollout named 'nope'" in r.stderr


def test_simulate_tells_a_segment_fault_story(tmp_path: Path) -> None:
    plan = ROOT / "examples" / "churn" / "plan.yaml"
    r = cli("simulate", str(plan), "--scenario", "segment-fault", "--seed", "3", "--rate", "40")
    assert r.returncode == 0, r.stderr
    assert "rolled_back" in r.stdout
    assert "country=BR" in r.stdout
    r = cli("simulate", str(plan), "--scenario", "nope")
    assert r.returncode == 2 and "unknown scenario" in r.stderr


def test_new_user_rough_edges(tmp_path: Path) -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("safeshift ")
    r = cli("simulate", "--list")
    assert r.returncode == 0 and "segment-fault" in r.stdout
    r = cli("status", "--store", str(tmp_path / "typo.db"))
    assert r.returncode == 2 and "no store at" in r.stderr
    assert not (tmp_path / "typo.db").exists()
    data = plan_dict()
    data["candidate"]["model"] = "fake:x?error_rate=abc"
    r = cli("validate", str(write(tmp_path, data)))
    assert r.returncode == 2 and "error_rate must be a number" in r.stderr
    assert "Traceback" not in r.stderr
    data = plan_dict(challengers=[{"name": "b", "version": "v2b", "model": "joblib:missing.joblib"}])
    data["stages"][0]["experiment"] = {"objective": "accuracy"}
    r = cli("validate", str(write(tmp_path, data)))
    assert r.returncode == 2 and "challengers.0.model" in r.stderr


def test_readme_python_snippet_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## In Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = snippet.replace('store="safeshift.db"', f'store=r"{tmp_path / "s.db"}"')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_validate_duplicate_keys_exit_2_naming_key_and_path(tmp_path: Path) -> None:
    text = yaml.safe_dump(plan_dict()).replace("traffic: 10%\n", "traffic: 10%\n  traffic: 90%\n")
    assert text.count("traffic: 90%") == 1
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    r = cli("validate", str(path))
    assert r.returncode == 2, r.stdout
    assert "  stages.0.traffic: duplicate key 'traffic'" in r.stderr
    assert "Traceback" not in r.stderr
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict()).replace('"unit": "user_id"',
                                                    '"unit": "user_id", "unit": "account_id"'))
    r = cli("validate", "--json", str(path))
    assert r.returncode == 2
    problems = json.loads(r.stdout)["problems"]
    assert any(p["path"] == "unit" and "duplicate key 'unit'" in p["message"] for p in problems)


@pytest.mark.parametrize("name", ["plan.yaml", "plan.json"])
def test_validate_nan_and_infinity_exit_2_naming_the_field(tmp_path: Path, name: str) -> None:
    data = plan_dict()
    data["guardrails"][0]["tolerance"] = float("nan")
    data["stages"][0]["min_duration"] = float("inf")
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    assert ("NaN" if name.endswith(".json") else ".nan") in path.read_text()
    r = cli("validate", str(path))
    assert r.returncode == 2
    assert "2 problem(s)" in r.stderr, r.stderr
    for field in ("guardrails.0.tolerance", "stages.0.min_duration"):
        assert f"  {field}: " in r.stderr and "NaN and infinity" in r.stderr


def test_validate_refuses_code_tags_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    text = yaml.safe_dump(plan_dict()).replace(
        "summary: a test change", f"summary: !!python/object/apply:os.system ['touch {marker}']")
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    r = cli("validate", str(path))
    assert r.returncode == 2
    assert "!!python/object/apply:os.system is not allowed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_validate_a_stage_without_guardrails_exits_2(tmp_path: Path) -> None:
    data = plan_dict()
    data["guardrails"][0]["stage"] = "canary"
    r = cli("validate", str(write(tmp_path, data)))
    assert r.returncode == 2
    assert "  stages.1: no guardrail judges stage 'half'" in r.stderr


def test_help_shows_flags_without_a_type() -> None:
    r = cli("status", "--help")
    assert r.returncode == 0
    lines = {line.split()[1]: line for line in r.stdout.splitlines()
             if line.strip().startswith("│ --")}
    assert "<bool>" not in lines["--json"] and "<bool>" not in lines["--help"]
    assert "<str>" in lines["--store"]  # options that take a value still say what


def test_status_says_which_stage_awaits_approval(tmp_path: Path) -> None:
    from safeshift import FakeModel, Plan, Rollout
    from safeshift.store import sqlite_url

    data = plan_dict(stages=[{"name": "canary", "traffic": "10%", "approval": "required"},
                             {"name": "full", "traffic": "100%"}])
    url = sqlite_url(tmp_path / "s.db")
    Rollout.from_plan(Plan.from_dict(data), store=url,
                      models={"baseline": FakeModel(), "candidate": FakeModel()}).close()
    r = cli("status", "--store", url)
    assert r.returncode == 0, r.stderr
    assert ("awaiting approval of stage 'canary' by an approver with role approver or higher: "
            "safeshift approve test-rollout") in r.stdout


@pytest.mark.parametrize(("column", "value", "words"), [
    ("plan_json", "{not json", "the stored plan of rollout 'test-rollout' in the store cannot be read"),
    ("plan_json", "[1, 2]", "a plan is an object, not list"),
    ("phase", "exploded", "'exploded' is not a valid Phase"),
    ("extra", "{", "the state of rollout 'test-rollout' in the store cannot be read"),
])
def test_a_damaged_store_is_a_clear_error_not_a_traceback(tmp_path: Path, column: str,
                                                           value: str, words: str) -> None:
    from safeshift import FakeModel, Plan, Rollout

    db = tmp_path / "s.db"
    Rollout.from_plan(Plan.from_dict(plan_dict()), store=str(db),
                      models={"baseline": FakeModel(), "candidate": FakeModel()}).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE rollouts SET {column} = ?", (value,))
    for verb in (["status"], ["status", "test-rollout"], ["history", "test-rollout"],
                 ["pause", "test-rollout", "--reason", "x"]):
        r = cli(*verb, "--store", str(db))
        if column == "plan_json" and verb[0] == "history":
            assert r.returncode == 0  # history needs no plan
            continue
        assert r.returncode == 2, (verb, r.stdout, r.stderr)
        assert words in r.stderr and "restore it from a backup" in r.stderr
        assert "Traceback" not in r.stderr


def test_reading_commands_never_create_nor_upgrade_a_store(tmp_path: Path) -> None:
    """status, history and audit verify open the store without migrating: a v1 store stays
    v1 (the message says how to upgrade), a file that is no store is refused and left as it
    was; `safeshift store migrate` upgrades it."""
    from tests.test_store import _V1_TABLES

    path = tmp_path / "v1.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        for statement in _V1_TABLES.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    engine.dispose()
    for verb in (["status"], ["history", "r1"], ["audit", "verify", "r1"]):
        r = cli(*verb, "--store", str(path))
        assert r.returncode == 2, (verb, r.stdout, r.stderr)
        assert "schema version 1, older than this release's" in r.stderr
        assert "safeshift store migrate" in r.stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT max(version) FROM safeshift_schema").fetchone() == (1,)
    r = cli("store", "migrate", "--store", str(path))
    assert r.returncode == 0 and "schema version" in r.stdout, r.stderr
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("SELECT max(version) FROM safeshift_schema").fetchone()
    assert version > 1
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    r = cli("status", "--store", str(other))
    assert r.returncode == 2 and "is not a safeshift store" in r.stderr
    with sqlite3.connect(other) as conn:  # nothing was created in it
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert names == {"notes"}


def test_reading_commands_work_on_a_read_only_store(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """status, history and audit verify on a store in a folder nobody may write (a read-only
    mount, a backup): opened read-only and immutable, nothing is created beside the file."""
    from safeshift import FakeModel, Plan, Rollout, ops
    from safeshift.clock import SystemClock
    from safeshift.store import open_store

    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "s.db"
    r = Rollout.from_plan(Plan.from_dict(plan_dict()), store=str(db),
                          models={"baseline": FakeModel(), "candidate": FakeModel()})
    r.pause(actor="ops", reason="freeze before the backup")
    r.close()
    r.store.close()
    before = sorted(p.name for p in folder.iterdir())
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK
                        else real_access(p, mode))
    folder.chmod(0o555)
    db.chmod(0o444)
    try:
        st = open_store(str(db), read_only=True)
        status = ops.status(st, "test-rollout", SystemClock())
        assert str(status.phase) == "paused"
        assert [d.action for d in ops.history(st, "test-rollout")][-1] == "pause"
        assert ops.verify_audit(st, "test-rollout").ok
        st.close()
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)
    assert sorted(p.name for p in folder.iterdir()) == before
