"""The operations on rollouts, one function per verb: what the CLI, the HTTP API and the
dashboard all call, so that each verb means one thing whichever front end a person uses.

Every function takes the store (and a clock where time matters) and returns plain data
(:class:`~safeshift.state.RolloutState`, :class:`Status`, decisions, audit events); the front
ends only parse arguments and render. A rollout's plan is rebuilt from the store by
:func:`stored_plan` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from safeshift._units import BASIS_POINTS
from safeshift.analysis import StageAnalysis, analyse
from safeshift.audit import AuditEvent, verify_rollout
from safeshift.clock import Clock
from safeshift.controller import Controller, split_for
from safeshift.errors import RolloutError
from safeshift.experiment import allocation, current_variants
from safeshift.plan import Plan
from safeshift.serving import REQUEST_FAULT
from safeshift.state import Action, Decision, Phase, RolloutState
from safeshift.store.base import Store
from safeshift.telemetry import Summary, TelemetryRow

__all__ = ["Status", "act", "audit_events", "create", "history", "list_rollouts", "register",
           "stage_analysis", "status", "statuses", "stored_plan", "verify_audit"]


@dataclass(slots=True)
class Status:
    """A rollout at a glance."""

    rollout: str
    endpoint: str
    phase: Phase
    stage: str | None
    stage_index: int
    traffic: int  # basis points to the candidate
    shadow: int
    stage_elapsed: float
    reason: str
    pending_stage: str | None
    analysis: StageAnalysis | None
    variants: dict[str, float] = field(default_factory=dict)  # candidate variant -> share of it
    # arm -> {"count", "share"}: requests that failed through their own fault in the stage
    # (inputs the baseline rejects), counted against neither model
    request_faults: dict[str, dict[str, float]] = field(default_factory=dict)
    # the watch after promotion, while it runs: holdback (basis points on the baseline),
    # watch and remaining (seconds)
    watch: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout": self.rollout, "endpoint": self.endpoint, "phase": str(self.phase),
            "stage": self.stage, "stage_index": self.stage_index,
            "traffic": self.traffic / BASIS_POINTS, "shadow": self.shadow / BASIS_POINTS,
            "stage_elapsed": self.stage_elapsed, "reason": self.reason,
            "pending_stage": self.pending_stage, "variants": self.variants,
            "request_faults": self.request_faults,
            "watch": None if self.watch is None else {
                "holdback": self.watch["holdback"] / BASIS_POINTS, "watch": self.watch["watch"],
                "remaining": self.watch["remaining"]},
            "analysis": self.analysis.to_json() if self.analysis else None,
        }



# -- plans and rollouts -------------------------------------------------------------------------


def stored_plan(store: Store, name: str) -> Plan:
    """The plan rollout ``name`` was registered with, validated again (a damaged stored plan
    is a :class:`~safeshift.errors.PlanValidationError` naming the rollout, not a traceback)."""
    return Plan.from_dict(store.get_plan(name), source=f"stored plan of {name}")


def register(store: Store, plan: Plan, clock: Clock) -> RolloutState:
    """Register ``plan`` in the store, or find it there: a rollout name already used by a
    different plan is an error."""
    now = clock.now()
    state = store.create_rollout(
        plan.canonical(), RolloutState(plan.rollout, plan.hash, created_at=now, updated_at=now))
    if state.plan_hash != plan.hash:
        raise RolloutError(
            f"rollout {plan.rollout!r} already exists in {store.url} with a different plan "
            f"({state.phase}); give the new plan another rollout name")
    return state


def create(store: Store, plan: Plan, clock: Clock, *, start: bool = True) -> RolloutState:
    """Register ``plan`` and, with ``start``, begin its first stage (or wait for its
    approval). Creating the same plan again changes nothing."""
    state = register(store, plan, clock)
    if start and state.phase is Phase.PENDING:
        Controller(plan, store, clock).tick()
        state = store.get_state(plan.rollout)
    return state


def list_rollouts(store: Store, *, phase: Phase | None = None) -> list[RolloutState]:
    """Every rollout in the store (in one phase, given ``phase``), by name."""
    states = sorted(store.list_states(), key=lambda s: s.name)
    return [s for s in states if phase is None or s.phase is phase]


# -- reading ------------------------------------------------------------------------------------


def _totals(store: Store, plan: Plan, state: RolloutState) -> list[TelemetryRow]:
    return store.telemetry_totals(plan.rollout, state.stage_index) if state.stage_index >= 0 else []


def stage_analysis(plan: Plan, store: Store, state: RolloutState,
                   rows: Sequence[TelemetryRow] | None = None) -> StageAnalysis | None:
    """The current stage's analysis as the controller's next tick computes it; None before
    the first stage."""
    if state.stage_index < 0:
        return None
    rows = _totals(store, plan, state) if rows is None else rows
    return analyse(plan, state.stage_index, Summary.from_rows(rows),
                   current_variants(plan, state))


def _request_faults(rows: Sequence[TelemetryRow]) -> dict[str, dict[str, float]]:
    """Per arm, the stage's request faults and their share of the arm's requests."""
    faults: dict[str, float] = {}
    requests: dict[str, float] = {}
    for row in rows:
        if row.signal == REQUEST_FAULT:
            faults[row.arm] = faults.get(row.arm, 0.0) + row.n
        elif row.signal == "requests":
            requests[row.arm] = requests.get(row.arm, 0.0) + row.n
    return {arm: {"count": n, "share": n / (n + requests.get(arm, 0.0))}
            for arm, n in sorted(faults.items())}


def _watch(plan: Plan, state: RolloutState, now: float) -> dict[str, float] | None:
    watching = state.phase is Phase.WATCHING or (
        state.phase is Phase.PAUSED and state.extra.get("paused_from") == Phase.WATCHING)
    if not watching:
        return None
    stage = plan.stages[state.stage_index]
    watch = stage.watch or 0.0
    return {"holdback": float(stage.holdback or 0), "watch": watch,
            "remaining": max(watch - (now - state.stage_started_at), 0.0)}


def status(store: Store, rollout: Plan | str, clock: Clock) -> Status:
    """Where ``rollout`` (a name, or its plan) is and what its guardrails say."""
    plan = rollout if isinstance(rollout, Plan) else stored_plan(store, rollout)
    state = store.get_state(plan.rollout)
    split = split_for(plan, state)
    pending = plan.stages[state.pending_stage].name if state.pending_stage is not None else None
    rows = _totals(store, plan, state)
    analysis = stage_analysis(plan, store, state, rows) if not state.phase.terminal else None
    # a finished rollout's last stage ended with its last decision, not now
    now = clock.now()
    until = state.updated_at if state.phase.terminal else now
    return Status(plan.rollout, plan.endpoint, state.phase,
                  split.stage if state.stage_index >= 0 else None, state.stage_index,
                  split.traffic, split.shadow, max(until - state.stage_started_at, 0.0),
                  state.reason, pending, analysis, allocation(plan, state),
                  _request_faults(rows), _watch(plan, state, now))


def statuses(store: Store, clock: Clock, names: Sequence[str] | None = None) -> list[Status]:
    """:func:`status` of each named rollout, or of every rollout in the store."""
    names = [s.name for s in list_rollouts(store)] if names is None else names
    return [status(store, name, clock) for name in names]


def history(store: Store, name: str) -> list[Decision]:
    """Every decision of rollout ``name``, oldest first (an unknown name is an error)."""
    store.get_state(name)
    return store.decisions(name)


def audit_events(store: Store, name: str) -> list[AuditEvent]:
    """Rollout ``name``'s audit log, oldest first."""
    store.get_state(name)
    return store.audit_events(name)


def verify_audit(store: Store, name: str) -> tuple[bool, str]:
    """Whether rollout ``name``'s audit log is complete and unaltered, and what was found."""
    state = store.get_state(name)
    return verify_rollout(state, store.audit_events(name), store.decisions(name))


# -- acting -------------------------------------------------------------------------------------


def act(store: Store, name: str, action: Action, clock: Clock, *, actor: str,
        reason: str = "") -> Decision:
    """An operator's action (approve, pause, resume, rollback, promote) on rollout ``name``,
    or :class:`~safeshift.errors.InvalidTransitionError` saying why it does not fit."""
    return Controller(stored_plan(store, name), store, clock).act(action, actor=actor,
                                                                  reason=reason)
