"""Bandit experiment stages: several candidates, one winner, decisions on valid tests."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from tests.conftest import plan_dict

from safeshift import MemoryStore, Phase, Plan, PlanValidationError, Rollout, VirtualClock
from safeshift.assign import Assigner, Split
from safeshift.experiment import allocation, current_variants, variant_split
from safeshift.models import FakeModel
from safeshift.simulate import get_scenario, simulate
from safeshift.state import Action, RolloutState


def experiment_plan(**stage_changes: object) -> Plan:
    data = plan_dict(rollout="pick", segments=["country"])
    data["challengers"] = [{"name": "b", "version": "v2b", "model": "fake:b"},
                           {"name": "c", "version": "v2c", "model": "fake:c"}]
    pick = {"name": "pick", "traffic": "40%", "min_duration": "10m", "min_samples": 300,
            "experiment": {"objective": "accuracy", "floor": "5%", "min_units": 100}}
    pick.update(stage_changes)
    data["stages"] = [pick, {"name": "half", "traffic": "50%", "min_duration": "10m",
                             "min_samples": 300}, {"name": "full", "traffic": "100%"}]
    data["guardrails"] = [{"metric": "error_rate", "tolerance": 0.01},
                          {"metric": "accuracy", "tolerance": 0.03}]
    return Plan.from_dict(data)


def test_validation_of_experiments() -> None:
    data = plan_dict()
    data["stages"][0]["experiment"] = {"objective": "accuracy"}
    with pytest.raises(PlanValidationError, match="needs challengers"):
        Plan.from_dict(data)
    data = plan_dict(challengers=[{"name": "candidate", "version": "x", "model": "fake:x"}])
    with pytest.raises(PlanValidationError) as info:
        Plan.from_dict(data)
    paths = {p.path for p in info.value.problems}
    assert {"challengers", "challengers.0.name"} <= paths


def test_variants_split_the_candidate_traffic_only() -> None:
    plan = experiment_plan()
    state = RolloutState("pick", plan.hash, phase=Phase.RUNNING, stage_index=0,
                         allocation={"candidate": 0.2, "b": 0.5, "c": 0.3})
    variants = variant_split(plan, state)
    assert [v[0] for v in variants] == ["candidate", "b", "c"]
    assert variants[-1][2] == 10_000
    split = Split("pick", 0, 4000, 0, "v2", "v1", active=True, variants=variants)
    assigner = Assigner(plan)
    seen = Counter()
    for i in range(20_000):
        a = assigner.assign(f"u{i}", {}, split)
        seen[a.telemetry_arm] += 1
        if a.is_candidate:
            assert a.version == plan.variant(a.variant).version
            assert assigner.assign(f"u{i}", {}, split) == a  # sticky for a fixed allocation
    total = sum(v for k, v in seen.items() if k != "baseline")
    assert total / 20_000 == pytest.approx(0.4, abs=0.015)
    assert seen["b"] / total == pytest.approx(0.5, abs=0.03)
    assert seen["c"] / total == pytest.approx(0.3, abs=0.03)


def test_dropped_arms_and_winner_change_the_variants() -> None:
    plan = experiment_plan()
    state = RolloutState("pick", plan.hash, phase=Phase.RUNNING, stage_index=0,
                         dropped=["c"])
    assert current_variants(plan, state) == ["candidate", "b"]
    assert allocation(plan, state) == {"candidate": 0.5, "b": 0.5}
    state = RolloutState("pick", plan.hash, phase=Phase.RUNNING, stage_index=1,
                         winner="b")
    assert current_variants(plan, state) == ["b"]
    assert variant_split(plan, state) == (("b", "v2b", 10_000),)


def test_bandit_picks_the_best_and_drops_the_harmful() -> None:
    plan = experiment_plan()
    story = simulate(plan, get_scenario("bandit"), seed=4, rate=60.0, max_hours=6)
    actions = [d.action for d in story.decisions]
    assert Action.DROP_ARM in actions
    dropped = next(d for d in story.decisions if d.action is Action.DROP_ARM)
    assert dropped.reason.startswith("c dropped") and "error rate" in dropped.reason
    chosen = next(d for d in story.decisions if "chose" in d.reason)
    assert "chose b (v2b)" in chosen.reason
    assert chosen.evidence["probability_best"]["b"] >= 0.95
    assert story.outcome is Phase.PROMOTED


def test_allocation_moves_towards_the_better_arm() -> None:
    plan = experiment_plan(min_duration="3h")  # long enough to watch the allocation
    clock = VirtualClock()
    models = {"baseline": FakeModel(output=1), "candidate": FakeModel(output=1),
              "b": FakeModel(output=1), "c": FakeModel(output=1)}
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=clock, models=models)
    accuracy = {"candidate": 0.80, "b": 0.92, "c": 0.80, "baseline": 0.85}
    rng = random.Random(9)
    for _ in range(60):
        due = []
        for _ in range(200):
            # every model answers 1; the label says whether that was right, at the arm's rate
            p = rollout.predict({"x": 1}, unit=f"u{rng.randrange(10**6)}")
            arm = p.arm if p.arm == "baseline" else next(
                v for v in plan.variants if plan.variant(v).version == p.version)
            due.append({"id": p.id, "label": 1 if rng.random() < accuracy[arm] else 0})
        clock.advance(30)
        rollout.flush()
        rollout.feedback_many(due)
        rollout.tick()
    shares = rollout.status().variants
    assert shares["b"] > 0.6, shares
    assert min(shares.values()) >= 0.05 - 1e-9  # the floor
