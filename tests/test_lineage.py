"""Lineage: every decision names its plan, its models' fingerprints and its code, and
``safeshift lineage`` checks them against the artifacts as they are now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import yaml
from sklearn.linear_model import LogisticRegression
from tests.conftest import plan_dict
from tests.test_controller import run

from safeshift import Plan, Rollout, VirtualClock, ops
from safeshift.lineage import artifact_of, trace
from safeshift.plan import ModelSpec
from safeshift.store import SQLStore, sqlite_url


def _model_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 2))
    y = (x[:, 0] > 0).astype(int)
    joblib.dump({"model": LogisticRegression().fit(x, y), "features": ["a", "b"]},
                tmp_path / "base.joblib")
    (tmp_path / "cand_model.py").write_text(
        "def predict(rows):\n    return [1 if r['a'] > 0 else 0 for r in rows]\n")


def _rollout(tmp_path: Path) -> tuple[SQLStore, Plan, VirtualClock]:
    _model_files(tmp_path)
    data = plan_dict(baseline={"version": "v1", "model": "joblib:base.joblib"},
                     candidate={"version": "v2", "model": "python:cand_model:predict"})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    plan = Plan.load(path)
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    clock = VirtualClock()
    rollout = Rollout.from_plan(plan, store=store, clock=clock)
    run(_Shim(rollout), clock, steps=200)  # type: ignore[arg-type]
    return store, plan, clock


class _Shim:
    """The controller tests' driver sends {"x": 1}; these models read a and b."""

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout

    def predict(self, _inputs: object, **kw: object) -> object:
        return self.rollout.predict({"a": 0.5, "b": -1.0}, **kw)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.rollout, name)


def test_decisions_carry_their_lineage_and_it_is_checked(tmp_path: Path) -> None:
    store, plan, _ = _rollout(tmp_path)
    state = store.get_state(plan.rollout)
    assert state.artifacts is not None
    assert state.artifacts["baseline"]["kind"] == "file"
    assert state.artifacts["candidate"]["kind"] == "module"
    advanced = next(d for d in store.decisions(plan.rollout) if d.action == "advance")
    recorded = advanced.evidence["lineage"]
    assert recorded["plan_hash"] == plan.hash and recorded["safeshift"]
    assert recorded["models"]["baseline"]["sha256"] == state.artifacts["baseline"]["sha256"]
    assert store.snapshots(plan.rollout)[-1].body["lineage"]["plan_hash"] == plan.hash
    t = trace(store, plan.rollout, advanced.seq)
    assert t.ok and [m["status"] for m in t.models] == ["match", "match"]
    assert t.data["arms"] == ["baseline", "candidate"] and t.data["requests"]["baseline"] > 0
    assert ops.verify_audit(store, plan.rollout).ok  # the lineage is part of the audited evidence

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "safeshift.cli", "lineage",
                               f"{plan.rollout}#{advanced.seq}", "--store",
                               str(tmp_path / "s.db")], capture_output=True, text=True,
                              timeout=60)

    r = cli()
    assert r.returncode == 0 and "matches the artifact" in r.stdout, r.stderr
    (tmp_path / "cand_model.py").write_text(
        "def predict(rows):\n    return [0 for r in rows]\n")  # someone edits the candidate
    r = cli()
    assert r.returncode == 1
    assert "candidate v2" in r.stdout and "CHANGED" in r.stdout
    (tmp_path / "base.joblib").unlink()
    t = trace(store, plan.rollout, advanced.seq)
    assert [m["status"] for m in t.models] == ["missing", "changed"]
    store.close()


def test_models_served_elsewhere_are_fingerprinted_by_their_reference(tmp_path: Path) -> None:
    a = artifact_of(ModelSpec(version="v1", model="fake:base?output=1"), tmp_path)
    b = artifact_of(ModelSpec(version="v1", model="fake:base?output=2"), tmp_path)
    assert a["kind"] == b["kind"] == "reference" and a["sha256"] != b["sha256"]
    assert a["path"] is None
