"""The persistent state of a rollout and the records it leaves: decisions and audit events."""

from __future__ import annotations

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
    unit_hash: int = -1  # the unit's 32-bit hash (reports count once per unit), -1: none


@dataclass(slots=True)
class FeedbackItem:
    """One piece of feedback to record once per (request, signal), with its telemetry."""

    request_id: str
    signal: str
    value: float
    at: float
    rows: list[Any]  # TelemetryRow: added only when the feedback is new


@dataclass(slots=True)
class OutboxEntry:
    """A notification waiting to be sent to one webhook, written in the transaction of the
    decision that caused it, so that neither exists without the other (delivery is
    at-least-once: a receiver deduplicates on ``id``).

    ``target`` is the webhook's URL: entries of one (rollout, target) are sent in ``id`` order,
    an undelivered earlier one holding back the later ones. ``payload`` holds the format, the
    name of the secret's environment variable and the body data (:mod:`safeshift.notify`)."""

    rollout: str
    seq: int  # the decision's
    event: str  # stage_change, awaiting_approval, rollback, pause, promotion
    target: str
    payload: dict[str, Any]
    created_at: float
    id: int = 0  # given by the store
    attempts: int = 0
    next_attempt_at: float = 0.0
    delivered_at: float | None = None
    dead: bool = False
    last_error: str = ""

    @property
    def status(self) -> str:
        """``delivered``, ``dead`` (given up: ``safeshift notify retry-dead``) or ``pending``."""
        if self.delivered_at is not None:
            return "delivered"
        return "dead" if self.dead else "pending"
