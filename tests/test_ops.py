"""The operations layer: one function per verb, the same for every front end."""

from __future__ import annotations

from typing import Any

import pytest
from tests.conftest import plan_dict

from safeshift import InvalidTransitionError, MemoryStore, Phase, Plan, Rollout, VirtualClock, ops
from safeshift.auth import AuthError, Principal, Role
from safeshift.errors import (
    PlanValidationError,
    RejectedInputError,
    RolloutError,
    SafeshiftError,
    UnknownRolloutError,
)
from safeshift.models.python import PythonModel
from safeshift.state import Action


def _plan(name: str = "ops-a", **changes: object) -> Plan:
    return Plan.from_dict(plan_dict(rollout=name, **changes))


def test_create_registers_and_starts_once() -> None:
    store, clock = MemoryStore(), VirtualClock()
    state = ops.create(store, _plan(), clock)
    assert state.phase is Phase.RUNNING and state.stage_index == 0
    again = ops.create(store, _plan(), clock)  # the same plan: nothing changes
    assert again.version == state.version and len(ops.history(store, "ops-a")) == 1
    pending = ops.create(store, _plan("ops-b"), clock, start=False)
    assert pending.phase is Phase.PENDING
    other = plan_dict(rollout="ops-a")
    other["guardrails"][0]["tolerance"] = 0.05
    with pytest.raises(RolloutError, match=r"already exists .* with a different plan"):
        ops.create(store, Plan.from_dict(other), clock)


def test_list_status_history_and_audit() -> None:
    store, clock = MemoryStore(), VirtualClock()
    ops.create(store, _plan("ops-b"), clock)
    ops.create(store, _plan("ops-a"), clock)
    assert [s.name for s in ops.list_rollouts(store)] == ["ops-a", "ops-b"]
    ops.act(store, "ops-b", Action.PAUSE, clock, actor="alice", reason="looking")
    assert [s.name for s in ops.list_rollouts(store, phase=Phase.PAUSED)] == ["ops-b"]
    st = ops.status(store, "ops-b", clock)
    assert st.phase is Phase.PAUSED and st.stage == "canary" and st.traffic == 1_000
    assert st.reason == "paused by local:alice (looking)"
    assert [s.rollout for s in ops.statuses(store, clock)] == ["ops-a", "ops-b"]
    assert [d.action for d in ops.history(store, "ops-b")] == [Action.START, Action.PAUSE]
    assert [e.action for e in ops.audit_events(store, "ops-b")] == ["start", "pause"]
    assert ops.verify_audit(store, "ops-b")[0]
    for verb in (ops.history, ops.audit_events, ops.verify_audit):
        with pytest.raises(UnknownRolloutError):
            verb(store, "nope")
    with pytest.raises(UnknownRolloutError):
        ops.status(store, "nope", clock)


def test_act_refuses_what_does_not_fit() -> None:
    store, clock = MemoryStore(), VirtualClock()
    ops.create(store, _plan(), clock)
    with pytest.raises(InvalidTransitionError, match="not awaiting approval"):
        ops.act(store, "ops-a", Action.APPROVE, clock, actor="alice", reason="ok")
    with pytest.raises(SafeshiftError, match="needs a reason"):
        ops.act(store, "ops-a", Action.ROLLBACK, clock, actor="bob", reason="  ")
    d = ops.act(store, "ops-a", Action.ROLLBACK, clock, actor="bob", reason="tickets")
    assert d.phase is Phase.ROLLED_BACK and d.actor == "local:bob"
    with pytest.raises(InvalidTransitionError, match="already rolled_back"):
        ops.act(store, "ops-a", Action.RESUME, clock, actor="bob", reason="again")


def test_roles_decide_who_may_act_and_nothing_changes_when_refused() -> None:
    store, clock = MemoryStore(), VirtualClock()
    ops.create(store, _plan(), clock)
    viewer = Principal("vic", Role.VIEWER, "t1")
    operator = Principal("olga", Role.OPERATOR, "t2")
    client = Principal("app", Role.CLIENT, "t3")
    before = store.get_state("ops-a").version
    for who, action in ((viewer, Action.PAUSE), (client, Action.PAUSE),
                        (operator, Action.PROMOTE), (operator, Action.APPROVE)):
        with pytest.raises(AuthError, match=f"needs the .* role .* holds {who.role}"):
            ops.act(store, "ops-a", action, clock, reason="x", principal=who)
    assert store.get_state("ops-a").version == before
    with pytest.raises(AuthError, match="admin"):
        ops.create_token(store, clock, name="x", role=Role.ADMIN, expires_in=None,
                         principal=operator)
    with pytest.raises(AuthError, match="operator"):
        ops.create(store, _plan("ops-z"), clock, principal=viewer)
    d = ops.act(store, "ops-a", Action.PAUSE, clock, reason="x", principal=operator)
    assert d.actor == "olga"
    # a name held by a valid token is not issued twice; after revocation it is
    _, first = ops.create_token(store, clock, name="dana", role=Role.VIEWER, expires_in=None)
    with pytest.raises(SafeshiftError, match="valid token named 'dana' exists"):
        ops.create_token(store, clock, name="dana", role=Role.VIEWER, expires_in=None)
    ops.revoke_token(store, clock, first.id)
    ops.create_token(store, clock, name="dana", role=Role.VIEWER, expires_in=None)
    with pytest.raises(SafeshiftError, match="not allowed"):
        ops.create_token(store, clock, name="bad\nname", role=Role.VIEWER, expires_in=None)


def test_a_damaged_stored_plan_is_a_clear_error() -> None:
    store, clock = MemoryStore(), VirtualClock()
    ops.create(store, _plan(), clock)
    store._plans["ops-a"]["stages"][0]["traffic"] = "150%"  # as a corrupted row would read
    with pytest.raises(PlanValidationError, match="stored plan of ops-a"):
        ops.stored_plan(store, "ops-a")


def test_status_is_the_library_status_and_counts_request_faults() -> None:
    store, clock = MemoryStore(), VirtualClock()
    def needs_x(rows: list[Any]) -> list[Any]:
        return [row["x"] for row in rows]

    rollout = Rollout.from_plan(_plan(), store=store, clock=clock,
                                models={"baseline": PythonModel(needs_x),
                                        "candidate": PythonModel(needs_x)})
    for i in range(50):
        rollout.predict({"x": 1}, unit=f"u{i}")
    for i in range(3):
        with pytest.raises(RejectedInputError):
            rollout.predict({"y": 1}, unit=f"u{i}")
    rollout.flush()
    st = ops.status(store, "ops-a", clock)
    assert st == rollout.status()
    assert sum(f["count"] for f in st.request_faults.values()) == 3
    assert st.analysis is not None and st.analysis.n_baseline + st.analysis.n_candidate == 50
    rollout.close()


def test_release_notes_tell_the_change_and_every_decision_escaped() -> None:
    store, clock = MemoryStore(), VirtualClock()
    data = plan_dict(rollout="notes")
    data["change"] = {"summary": "New tenure feature", "why": "AUC 0.81 -> 0.84",
                      "owner": "ml-platform", "validation": "September holdout"}
    ops.create(store, Plan.from_dict(data), clock)
    ops.act(store, "notes", Action.PAUSE, clock, actor="eve", reason="line one\n| x | <script>")
    text = ops.release_notes(store, "notes")
    assert text.startswith("# notes:") and "**New tenure feature**" in text
    assert "- Owner: ml-platform" in text and "- Validated offline: September holdout" in text
    assert "## Stages" in text and "## Decisions" in text
    decisions = [line for line in text.splitlines() if line[:2] in ("1.", "2.")]
    assert len(decisions) == 2 and "**pause**" in decisions[1]
    assert "local:eve" in decisions[1]
    # a hostile reason stays on its line and cannot open a table row or a tag
    assert "\\n" in decisions[1] and "\\| x \\|" in decisions[1] and "\\<script\\>" in decisions[1]
