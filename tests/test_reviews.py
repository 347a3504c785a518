"""Stage reviews: sign-offs by review role before a stage starts; a stage waits for them, never
skips; a sign-off by the wrong role is refused."""

from __future__ import annotations

import random

import httpx
import pytest
from tests.conftest import plan_dict
from tests.gateway.gateway_helpers import running

from safeshift import FakeModel, Phase, Plan, Rollout, VirtualClock, ops
from safeshift.auth import AuthError, Principal, Role
from safeshift.errors import InvalidTransitionError, PlanValidationError
from safeshift.gateway import create_app
from safeshift.state import Action
from safeshift.store import SQLStore, Store, sqlite_url

REVIEWED = [{"name": "canary", "traffic": "10%", "min_duration": "5m", "min_samples": 300},
            {"name": "half", "traffic": "50%", "min_duration": "5m", "min_samples": 300,
             "reviews": [{"role": "privacy"}, {"role": "product", "note": "copy checked"}]},
            {"name": "full", "traffic": "100%"}]


def _tokens(store: Store, clock: VirtualClock) -> dict[str, Principal]:
    out = {}
    for name, role, reviews in (("pat", Role.VIEWER, ["privacy"]),
                                ("quinn", Role.VIEWER, ["product"]),
                                ("otto", Role.OPERATOR, [])):
        _, record = ops.create_token(store, clock, name=name, role=role, expires_in=None,
                                     rights={"reviews": reviews} if reviews else {})
        out[name] = record.principal()
    return out


def test_a_stage_waits_for_two_reviews_and_refuses_the_wrong_role(store: Store) -> None:
    clock = VirtualClock()
    plan = Plan.from_dict(plan_dict(stages=REVIEWED))
    rollout = Rollout.from_plan(plan, store=store, clock=clock, models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    people = _tokens(store, clock)
    rng = random.Random(4)
    for _ in range(300):
        for _ in range(60):
            rollout.predict({"x": 1}, unit=f"u{rng.randrange(10**6)}")
        clock.advance(10)
        rollout.tick()
        if rollout.state().phase is Phase.AWAITING_APPROVAL:
            break
    state = rollout.state()
    assert state.phase is Phase.AWAITING_APPROVAL and state.pending_stage == 1
    waiting = ops.status(store, plan.rollout, clock).approval
    assert waiting is not None and [r["signed_by"] for r in waiting["reviews"]] == [None, None]
    for _ in range(30):  # it waits; it never skips
        clock.advance(60)
        rollout.tick()
    assert rollout.state().phase is Phase.AWAITING_APPROVAL
    name = plan.rollout
    with pytest.raises(AuthError, match="holds product") as refused:
        ops.review(store, name, "privacy", clock, reason="looks fine", principal=people["quinn"])
    assert refused.value.status == 403
    with pytest.raises(AuthError, match="holds none"):
        ops.review(store, name, "privacy", clock, reason="ok", principal=people["otto"])
    with pytest.raises(InvalidTransitionError, match="waits for its reviews first"):
        ops.act(store, name, Action.APPROVE, clock, reason="ship it")
    ops.review(store, name, "privacy", clock, reason="data collection checked",
               principal=people["pat"])
    status = ops.status(store, name, clock)
    assert status.phase is Phase.AWAITING_APPROVAL
    assert status.approval is not None and status.approval["reviews"] == [
        {"role": "privacy", "note": None, "signed_by": "pat"},
        {"role": "product", "note": "copy checked", "signed_by": None}]
    with pytest.raises(InvalidTransitionError, match="signed by pat already"):
        ops.review(store, name, "privacy", clock, reason="again", principal=people["pat"])
    ops.review(store, name, "product", clock, reason="copy checked", principal=people["quinn"])
    state = rollout.state()
    assert state.phase is Phase.RUNNING and state.stage_index == 1 and state.reviews is None
    reviews = [d for d in store.decisions(name) if d.action is Action.REVIEW]
    assert [d.actor for d in reviews] == ["pat", "quinn"]
    assert "the stage starts" in reviews[-1].reason
    assert [e.action for e in store.audit_events(name)].count("review") == 2
    assert ops.verify_audit(store, name).ok


def test_reviews_and_an_approval_both_gate_a_stage() -> None:
    from safeshift import MemoryStore

    store, clock = MemoryStore(), VirtualClock()
    stages = [{"name": "canary", "traffic": "10%", "approval": "required",
               "reviews": [{"role": "privacy"}]}, {"name": "full", "traffic": "100%"}]
    plan = Plan.from_dict(plan_dict(stages=stages))
    rollout = Rollout.from_plan(plan, store=store, clock=clock, models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    assert rollout.state().phase is Phase.AWAITING_APPROVAL
    assert "reviews (privacy) and approval" in rollout.state().reason
    ops.review(store, plan.rollout, "privacy", clock, reason="checked")
    assert rollout.state().phase is Phase.AWAITING_APPROVAL  # the approval is still due
    ops.act(store, plan.rollout, Action.APPROVE, clock, reason="go")
    assert rollout.state().phase is Phase.RUNNING and rollout.state().stage_index == 0


def test_duplicate_review_roles_are_refused() -> None:
    stages = [{"name": "canary", "traffic": "10%",
               "reviews": [{"role": "privacy"}, {"role": "privacy"}]},
              {"name": "full", "traffic": "100%"}]
    with pytest.raises(PlanValidationError, match="listed twice"):
        Plan.from_dict(plan_dict(stages=stages))
    assert "reviews" not in Plan.from_dict(plan_dict()).canonical()["stages"][0]


def test_reviews_over_http(tmp_path: object) -> None:
    from pathlib import Path

    db = Path(str(tmp_path)) / "s.db"
    clock = VirtualClock()
    store = SQLStore(sqlite_url(db))
    stages = [{"name": "canary", "traffic": "10%", "reviews": [{"role": "privacy"}]},
              {"name": "full", "traffic": "100%"}]
    plan = Plan.from_dict(plan_dict(stages=stages))
    tokens = {}
    for name, reviews in (("pat", ["privacy"]), ("quinn", ["product"])):
        tokens[name], _ = ops.create_token(store, clock, name=name, role=Role.VIEWER,
                                           expires_in=None, rights={"reviews": reviews})
    app = create_app([plan], store=store, clock=clock, tick_interval=3600)
    with running(app) as url:
        def sign(who: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/rollouts/{plan.rollout}/reviews/privacy",
                              json={"reason": "checked"},
                              headers={"authorization": f"Bearer {tokens[who]}"})
        wrong = sign("quinn")
        assert wrong.status_code == 403 and "privacy review role" in wrong.json()["error"]
        right = sign("pat")
        assert right.status_code == 200 and right.json()["action"] == "review"
        assert right.json()["phase"] == "running"
        again = sign("pat")
        assert again.status_code == 409
    store.close()
