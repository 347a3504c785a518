"""Models from a real MLflow model registry (a local SQLite tracking store holding the churn
example's two scikit-learn models as versions 1 and 2 of ``churn``): a rollout from
``models:/churn@challenger`` pins the version the alias points at, is promoted, and moves
``champion`` to it, recorded in the audit log; a rollback leaves every alias."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import mlflow
import pytest
import yaml
from tests.conftest import ROOT
from typer.testing import CliRunner

from safeshift import MemoryStore, Phase, Plan, Rollout, VirtualClock
from safeshift.audit import evidence_digest, verify_chain
from safeshift.cli import app as cli
from safeshift.errors import RegistryError
from safeshift.models import registry
from safeshift.models.sklearn import SklearnModel
from safeshift.state import Action
from safeshift.store import SQLStore, sqlite_url

# MLflow's own store code warns of what its SQLAlchemy and pydantic versions deprecate
pytestmark = [pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*Any type hint is inferred:UserWarning")]

FEATURES = ["mean_radius", "mean_texture", "mean_perimeter", "mean_area"]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry with churn versions 1 (the example's v1) and 2 (v2); the module's tests
    reset the aliases they move (``aliases``)."""
    import pandas as pd
    from mlflow.models import infer_signature

    where = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{where / 'mlflow.db'}"  # an absolute path: four slashes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # for this fixture only: safeshift reads the plan's
        experiment = mlflow.create_experiment("churn", artifact_location=(where / "a").as_uri())
        for v in ("v1", "v2"):
            saved = joblib.load(ROOT / "examples" / "churn" / "models" / f"churn_{v}.joblib")
            x = pd.DataFrame([[14.0, 19.0, 92.0, 650.0]], columns=saved["features"])
            with mlflow.start_run(experiment_id=experiment):
                mlflow.sklearn.log_model(
                    saved["model"], name="model", registered_model_name="churn",
                    signature=infer_signature(x, saved["model"].predict(x.to_numpy())),
                    pip_requirements=["scikit-learn"])
    yield uri


@pytest.fixture
def aliases(tracking: str) -> Iterator[Any]:
    c = registry.client(tracking)
    c.set_registered_model_alias("churn", "champion", "1")
    c.set_registered_model_alias("churn", "challenger", "2")
    yield c


def plan_for(uri: str, **registry_: Any) -> Plan:
    return Plan.from_dict({
        "rollout": "churn-registry", "endpoint": "churn",
        "baseline": {"model": "models:/churn@champion"},
        "candidate": {"model": "models:/churn@challenger"},
        "change": {"summary": "retrained on Q3 data", "owner": "ml-platform"},
        "registry": {"uri": uri, **registry_},
        "unit": "user_id",
        "stages": [{"name": "canary", "traffic": "10%", "min_duration": "1m", "min_samples": 200},
                   {"name": "full", "traffic": "100%"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.02}],
        "analysis": {"alpha": 0.05, "expected_samples": 1000},
    })


def row(rng: random.Random) -> dict[str, float]:
    return {"mean_radius": rng.uniform(8, 25), "mean_texture": rng.uniform(10, 30),
            "mean_perimeter": rng.uniform(50, 160), "mean_area": rng.uniform(200, 2000)}


def drive(rollout: Rollout, clock: VirtualClock, steps: int = 200) -> None:
    rng = random.Random(3)
    for _ in range(steps):
        for _ in range(50):
            rollout.predict(row(rng), unit=f"u{rng.randrange(10**6)}")
        clock.advance(10)
        rollout.tick()
        if rollout.state().phase.terminal:
            return


def test_a_rollout_from_an_alias_is_promoted_and_moves_the_promote_alias(
        tracking: str, aliases: Any, tmp_path: Path) -> None:
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    clock = VirtualClock()
    rollout = Rollout.from_plan(plan_for(tracking, promote_alias="champion"), store=store,
                                clock=clock)
    # the aliases are pinned to the versions they point at now, and label the sides
    assert (rollout.plan.baseline.model, rollout.plan.baseline.version) == ("models:/churn/1",
                                                                            "churn/1")
    assert (rollout.plan.candidate.model, rollout.plan.candidate.version) == ("models:/churn/2",
                                                                              "churn/2")
    # the registry's scikit-learn model is served as one, with the signature's feature order
    candidate = rollout.model("candidate")
    assert isinstance(candidate, SklearnModel) and candidate.features == FEATURES
    local = joblib.load(ROOT / "examples" / "churn" / "models" / "churn_v2.joblib")["model"]
    rng = random.Random(0)
    rows = [row(rng) for _ in range(20)]
    assert candidate.predict(rows).outputs == local.predict(
        [[r[f] for f in FEATURES] for r in rows]).tolist()

    drive(rollout, clock)
    decisions = store.decisions("churn-registry")
    assert [d.action for d in decisions] == [Action.START, Action.PROMOTE, Action.REGISTRY]
    moved = decisions[-1]
    assert moved.phase is Phase.PROMOTED and moved.actor == "controller"
    assert moved.evidence["registry"] == {"model": "churn", "alias": "champion", "version": "2",
                                          "previous": "1"}
    assert "moved alias 'champion' of registry model 'churn' to the promoted version 2" \
        in moved.reason
    assert str(aliases.get_model_version_by_alias("churn", "champion").version) == "2"
    # recorded in the audit chain, which still verifies; later ticks move nothing again
    events = store.audit_events("churn-registry")
    assert events[-1].action == "registry" and events[-1].detail["reason"] == moved.reason
    assert events[-1].detail["evidence_sha256"] == evidence_digest(moved.evidence)
    assert verify_chain(events)[0]
    clock.advance(60)
    assert rollout.tick() is None and len(store.decisions("churn-registry")) == 3
    # the CLI's history shows it
    r = CliRunner().invoke(cli, ["history", "churn-registry", "--store", str(tmp_path / "s.db")])
    assert r.exit_code == 0 and "registry" in r.output and "champion" in r.output


def test_a_rollback_leaves_every_alias(tracking: str, aliases: Any) -> None:
    rollout = Rollout.from_plan(plan_for(tracking, promote_alias="champion"),
                                store=MemoryStore(), clock=VirtualClock())
    rollout.rollback(actor="alice", reason="not convinced")
    rollout.tick()
    assert [d.action for d in rollout.decisions()] == [Action.START, Action.ROLLBACK]
    assert str(aliases.get_model_version_by_alias("churn", "champion").version) == "1"


def test_a_promotion_by_hand_moves_the_alias_too(tracking: str, aliases: Any) -> None:
    rollout = Rollout.from_plan(plan_for(tracking, promote_alias="champion"),
                                store=MemoryStore(), clock=VirtualClock())
    rollout.promote(actor="alice", reason="ship it")
    assert [d.action for d in rollout.decisions()] == [Action.START, Action.PROMOTE,
                                                     Action.REGISTRY]
    assert str(aliases.get_model_version_by_alias("churn", "champion").version) == "2"


def test_a_simulation_moves_no_alias(tracking: str, aliases: Any) -> None:
    from safeshift.simulate import SCENARIOS, simulate

    story = simulate(plan_for(tracking, promote_alias="champion"), SCENARIOS["good"],
                     max_hours=1)
    assert story.outcome is Phase.PROMOTED
    assert str(aliases.get_model_version_by_alias("churn", "champion").version) == "1"


def test_an_unreachable_registry_is_tried_again_until_the_alias_moves(
        tracking: str, aliases: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = VirtualClock()
    rollout = Rollout.from_plan(plan_for(tracking, promote_alias="champion"), store=MemoryStore(),
                                clock=clock)
    real = registry.move_alias
    calls: list[float] = []

    def down_once(*args: Any) -> str | None:  # the registry is down for the first attempt
        calls.append(clock.now())
        if len(calls) == 1:
            raise RegistryError("cannot move alias 'champion' of 'churn' (connection refused)")
        return real(*args)

    monkeypatch.setattr(registry, "move_alias", down_once)
    rollout.promote(actor="alice")
    assert rollout.state().phase is Phase.PROMOTED and len(calls) == 1
    clock.advance(10)
    assert rollout.tick() is None and len(calls) == 1  # not before the retry interval
    clock.advance(30)
    moved = rollout.tick()
    assert moved is not None and moved.action is Action.REGISTRY and len(calls) == 2
    assert str(aliases.get_model_version_by_alias("churn", "champion").version) == "2"


def test_the_pinned_version_is_kept_when_the_alias_moves(
        tracking: str, aliases: Any, tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    plan = plan_for(tracking)
    first = Rollout.from_plan(plan, store=SQLStore(sqlite_url(path)), clock=VirtualClock())
    assert first.plan.candidate.model == "models:/churn/2"
    aliases.set_registered_model_alias("churn", "challenger", "1")  # someone moves it meanwhile
    again = Rollout.from_plan(plan, store=SQLStore(sqlite_url(path)), clock=VirtualClock())
    assert again.plan.candidate.model == "models:/churn/2"  # a restart serves what it started
    assert again.plan.hash == first.plan.hash
    fresh = Rollout.from_plan(plan, store=MemoryStore(), clock=VirtualClock())  # a new rollout pins it anew
    assert fresh.plan.candidate.model == "models:/churn/1"


def test_an_explicit_version_label_is_kept_and_a_missing_alias_is_a_clear_error(
        tracking: str, aliases: Any) -> None:
    data = plan_for(tracking).canonical()
    data["candidate"] = {"model": "models:/churn/2", "version": "v2-q3"}
    rollout = Rollout.from_plan(Plan.from_dict(data), store=MemoryStore(), clock=VirtualClock())
    assert rollout.plan.candidate.version == "v2-q3"
    data["candidate"] = {"model": "models:/churn@nobody"}
    with pytest.raises(RegistryError, match="nobody"):
        Rollout.from_plan(Plan.from_dict(data), store=MemoryStore(), clock=VirtualClock())
    data["candidate"] = {"model": "models:/churn/9"}
    with pytest.raises(RegistryError, match="9"):
        Rollout.from_plan(Plan.from_dict(data), store=MemoryStore(), clock=VirtualClock()).load_models()


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_parses_references_without_the_registry(tmp_path: Path) -> None:
    data = plan_for("sqlite:////nonexistent/mlflow.db", promote_alias="champion").canonical()
    r = CliRunner().invoke(cli, ["validate", str(write(tmp_path, data))])
    assert r.exit_code == 0, r.output
    for field, model, needle in [
            ("candidate.model", "models:/churn", "models:/NAME/VERSION"),
            ("candidate.model", "models:/churn@latest", "reserved"),
            ("candidate.model", "models:/churn/0", "models:/NAME/VERSION")]:
        bad = {**data, "candidate": {"model": model}}
        r = CliRunner().invoke(cli, ["validate", str(write(tmp_path, bad))])
        assert r.exit_code == 2 and field in r.output and needle in r.output, (model, r.output)
    bad = {**data, "registry": {"promote_alias": "v3"}}
    r = CliRunner().invoke(cli, ["validate", str(write(tmp_path, bad))])
    assert r.exit_code == 2 and "registry.promote_alias" in r.output and "reserved" in r.output
    bad = {**data, "candidate": {"version": "v2", "model": "fake:c?output=1"}}
    r = CliRunner().invoke(cli, ["validate", str(write(tmp_path, bad))])
    assert r.exit_code == 2 and "only a registry model has an alias" in r.output


def test_the_old_scoring_server_name_is_accepted_and_flagged(tmp_path: Path) -> None:
    data = plan_for("sqlite:////nonexistent/mlflow.db").canonical()
    data["candidate"] = {"version": "v2", "model": "mlflow:http://127.0.0.1:9"}
    r = CliRunner().invoke(cli, ["validate", str(write(tmp_path, data))])
    assert r.exit_code == 0 and "candidate.model: mlflow: is the older name of mlflow-server:" \
        in " ".join(r.output.split()), r.output
    data["candidate"]["model"] = "mlflow-server:http://127.0.0.1:9"
    r = CliRunner().invoke(cli, ["validate", str(write(tmp_path, data))])
    assert r.exit_code == 0 and "older name" not in r.output
