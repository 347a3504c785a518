"""The persistent state of a rollout and the records it leaves: decisions and audit events."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """Where a rollout is in its life."""

    PENDING = "pending"  # created, no stage started
    RUNNING = "running"  # in a stage
    AWAITING_APPROVAL = "awaiting_approval"  # next stage needs a person; current stage continues
    PAUSED = "paused"  # no automatic decisions; traffic split frozen
    WATCHING = "watching"  # promoted; a holdback stays on the baseline and is still compared
    PROMOTED = "promoted"  # candidate serves everyone
    ROLLED_BACK = "rolled_back"  # baseline serves everyone

    @property
    def terminal(self) -> bool:
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK)


class Action(StrEnum):
    """What a decision did."""

    START = "start"
    ADVANCE = "advance"
    AWAIT_APPROVAL = "await_approval"
    APPROVE = "approve"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    END_WATCH = "end_watch"  # the watch after promotion ended with no regression proven
    DROP_ARM = "drop_arm"  # an experiment arm with proven harm leaves the experiment
    REALLOCATE = "reallocate"  # bandit allocation update (state only, not a decision)


@dataclass(slots=True)
class RolloutState:
    """Everything the controller needs to continue after a restart."""

    name: str
    plan_hash: str
    phase: Phase = Phase.PENDING
    stage_index: int = -1  # -1: before the first stage
    stage_started_at: float = 0.0
    pending_stage: int | None = None  # the stage awaiting approval
    version: int = 0  # compare-and-set counter
    created_at: float = 0.0
    updated_at: float = 0.0
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. srm running min p

    def copy(self) -> RolloutState:
        return RolloutState(**{**asdict(self), "extra": dict(self.extra)})


@dataclass(slots=True)
class Decision:
    """A change of phase or stage, with the evidence that caused it."""

    rollout: str
    seq: int
    at: float
    action: Action
    from_stage: int
    to_stage: int
    phase: Phase
    reason: str
    actor: str = "controller"
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "action": str(self.action), "phase": str(self.phase)}


GENESIS = "0" * 64


@dataclass(slots=True)
class AuditEvent:
    """One entry of a rollout's hash-chained audit log."""

    rollout: str
    seq: int
    at: float
    actor: str
    action: str
    detail: dict[str, Any]
    prev_hash: str = GENESIS
    hash: str = ""

    def compute_hash(self) -> str:
        body = json.dumps(
            {"rollout": self.rollout, "seq": self.seq, "at": round(self.at, 6), "actor": self.actor,
             "action": self.action, "detail": self.detail, "prev": self.prev_hash},
            sort_keys=True, separators=(",", ":"), default=str,
        )
        return hashlib.sha256(body.encode()).hexdigest()

    def seal(self, prev_hash: str) -> AuditEvent:
        self.prev_hash = prev_hash
        self.hash = self.compute_hash()
        return self


def verify_rollout(state: RolloutState, events: list[AuditEvent],
                   decisions: list[Decision]) -> tuple[bool, str]:
    """The chain itself, its length against the state's decision counter (an event removed
    from the end), and every decision record against the event that sealed it."""
    ok, message = verify_chain(events)
    if not ok:
        return ok, message
    expected = int(state.extra.get("seq", len(events)))
    if len(events) < expected:
        return False, (f"{expected - len(events)} event(s) missing after event {len(events)}: "
                       f"the rollout has made {expected} decisions")
    by_seq = {e.seq: e for e in events}
    for d in decisions:
        e = by_seq.get(d.seq)
        if e is None:
            return False, f"decision {d.seq} has no audit event"
        if (e.actor, e.action, e.detail.get("reason")) != (d.actor, str(d.action), d.reason):
            return False, f"decision {d.seq} does not match its audit event (altered)"
    return True, message


def verify_chain(events: list[AuditEvent]) -> tuple[bool, str]:
    """Check a rollout's audit events link up and are unaltered; says where it breaks."""
    prev = GENESIS
    for i, e in enumerate(events):
        if e.seq != i + 1:
            return False, f"event {i + 1}: sequence number {e.seq}, a gap or reordering"
        if e.prev_hash != prev:
            return False, f"event {e.seq}: does not link to the previous event"
        if e.compute_hash() != e.hash:
            return False, f"event {e.seq}: content does not match its hash (altered)"
        prev = e.hash
    return True, f"{len(events)} events, chain intact"


@dataclass(slots=True)
class RequestRecord:
    """The compact, expiring record that lets late feedback find the arm that served."""

    id: str
    rollout: str
    stage: int
    arm: str
    cohort: str
    segment: str
    created_at: float
    expires_at: float
    outputs: dict[str, Any]  # arm -> first output (both arms in shadow)
    cluster: int = -1  # the unit's cluster (see safeshift.telemetry), that labels count in


@dataclass(slots=True)
class FeedbackItem:
    """One piece of feedback to record once per (request, signal), with its telemetry."""

    request_id: str
    signal: str
    value: float
    at: float
    rows: list[Any]  # TelemetryRow: added only when the feedback is new
