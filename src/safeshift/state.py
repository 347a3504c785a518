"""The persistent state of a rollout and the records it leaves: decisions and audit events."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar

_T = TypeVar("_T")


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
    REVIEW = "review"  # a review role signed off the stage awaiting it
    REGISTRY = "registry"  # after promotion, the plan's registry alias moved to the candidate


@dataclass(slots=True)
class AuditSeal:
    """The audit chain's length and head as the store sealed them into the state at its last
    commit, and the MAC over them and the state (:func:`safeshift.audit.seal_state`). All
    None in a state last written by a release before the keyed audit log."""

    seq: int | None = None  # events in the chain; stored as "audit_seq"
    head: str | None = None  # the last event's hash, GENESIS for none; "audit_head"
    key_id: str | None = None  # id of the key the MAC is under; "audit_key_id"
    mac: str | None = None  # the state's MAC; "audit_state_mac"


@dataclass(slots=True)
class StageApprovals:
    """The approvals recorded so far for a stage that needs several approvers."""

    stage: int  # the stage approved (votes for another stage do not count)
    by: list[str] = field(default_factory=list)  # the approvers' actors, in order


@dataclass(slots=True)
class StageReviews:
    """The reviews signed so far for the stage awaiting them: review role -> who signed."""

    stage: int
    by: dict[str, str] = field(default_factory=dict)


_EXTRA_FIELDS = {
    "created_by": "created_by", "salt_seed": "salt_seed", "audit_seq": "audit.seq",
    "audit_head": "audit.head", "audit_key_id": "audit.key_id",
    "audit_state_mac": "audit.mac", "seq": "seq", "paused_from": "paused_from",
    "approvals": "approvals", "allocation": "allocation", "winner": "winner",
    "dropped": "dropped", "srm_min_p": "srm_min_p", "artifacts": "artifacts",
    "reviews": "reviews",
}
"""The keys of the stores' ``extra`` JSON that :class:`RolloutState` types, and the field
each is (in the order they are written)."""


@dataclass(slots=True)
class RolloutState:
    """Everything the controller needs to continue after a restart.

    The stores keep the fields after ``reason`` as one JSON object, their ``extra`` column
    (:meth:`extra_json`, :meth:`from_row`); a field at its default writes no key."""

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
    created_by: str | None = None  # the actor who registered it (approval may exclude them)
    salt_seed: str = ""  # the secret salting the assignment hash (ops.assignment_seed)
    seq: int = 0  # decisions made so far: the number of the last one
    paused_from: Phase | None = None  # the phase the last pause left, where resume returns
    approvals: StageApprovals | None = None  # votes so far on the stage awaiting approval
    reviews: StageReviews | None = None  # sign-offs so far on the stage awaiting them
    # an experiment stage's (safeshift.experiment): the share of the candidate traffic per
    # arm (None: equal shares), the arm it chose, and the arms removed for harm
    allocation: dict[str, float] | None = None
    winner: str | None = None
    dropped: list[str] = field(default_factory=list)
    srm_min_p: float | None = None  # the sample-ratio check's running minimum p-value
    # arm -> the fingerprint of its model artifact at registration (safeshift.lineage)
    artifacts: dict[str, dict[str, Any]] | None = None
    audit: AuditSeal = field(default_factory=AuditSeal)
    # keys of a stored ``extra`` this release does not know (written by a newer one), kept to
    # be written back unchanged
    unknown_extra: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> RolloutState:
        """A copy that shares nothing mutable with this state (the stores hand out copies)."""
        approvals = self.approvals
        reviews = self.reviews
        return replace(
            self, audit=replace(self.audit),
            approvals=None if approvals is None else StageApprovals(approvals.stage,
                                                                    list(approvals.by)),
            reviews=None if reviews is None else StageReviews(reviews.stage, dict(reviews.by)),
            allocation=None if self.allocation is None else dict(self.allocation),
            dropped=list(self.dropped),
            artifacts=copy.deepcopy(self.artifacts) if self.artifacts is not None else None,
            unknown_extra=copy.deepcopy(self.unknown_extra) if self.unknown_extra else {})

    def extra_json(self) -> dict[str, Any]:
        """The fields after ``reason`` as the stores keep them, in their ``extra`` JSON: the
        keys of earlier releases, one per field not at its default, then the unknown keys
        read with the state, unchanged. A known key in :attr:`unknown_extra` is a
        ValueError: set its field instead."""
        out: dict[str, Any] = {}
        if self.created_by is not None:
            out["created_by"] = self.created_by
        if self.salt_seed:
            out["salt_seed"] = self.salt_seed
        for key, value in (("audit_seq", self.audit.seq), ("audit_head", self.audit.head),
                           ("audit_key_id", self.audit.key_id),
                           ("audit_state_mac", self.audit.mac)):
            if value is not None:
                out[key] = value
        if self.seq:
            out["seq"] = self.seq
        if self.paused_from is not None:
            out["paused_from"] = str(self.paused_from)
        if self.approvals is not None:
            out["approvals"] = {"stage": self.approvals.stage, "by": list(self.approvals.by)}
        if self.reviews is not None:
            out["reviews"] = {"stage": self.reviews.stage, "by": dict(self.reviews.by)}
        if self.allocation is not None:
            out["allocation"] = dict(self.allocation)
        if self.winner is not None:
            out["winner"] = self.winner
        if self.dropped:
            out["dropped"] = list(self.dropped)
        if self.srm_min_p is not None:
            out["srm_min_p"] = self.srm_min_p
        if self.artifacts is not None:
            out["artifacts"] = copy.deepcopy(self.artifacts)
        for key, value in self.unknown_extra.items():
            if key in _EXTRA_FIELDS:
                raise ValueError(f"{key!r} in the unknown_extra of rollout {self.name!r} is "
                                 f"a field: set state.{_EXTRA_FIELDS[key]} instead")
            out[key] = value
        return out

    @classmethod
    def from_row(cls, *, name: str, plan_hash: str, phase: Phase, stage_index: int,
                 stage_started_at: float, pending_stage: int | None, version: int,
                 created_at: float, updated_at: float, reason: str,
                 extra: object) -> RolloutState:
        """A state as a store reads it back: its columns, and its ``extra`` JSON as parsed
        (:meth:`extra_json` in reverse; a null value counts as absent). A value of the
        wrong type, which safeshift cannot have written, is a TypeError or ValueError."""
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra is an object, not {type(extra).__name__}")
        approvals = _typed(extra, "approvals", dict)
        reviews = _typed(extra, "reviews", dict)
        paused_from = _typed(extra, "paused_from", str)
        return cls(
            name, plan_hash, phase, stage_index, stage_started_at, pending_stage, version,
            created_at, updated_at, reason,
            created_by=_typed(extra, "created_by", str),
            salt_seed=_typed(extra, "salt_seed", str) or "",
            seq=_typed(extra, "seq", int) or 0,
            paused_from=None if paused_from is None else Phase(paused_from),
            approvals=None if approvals is None else StageApprovals(
                _required(approvals, "approvals.stage", "stage", int),
                _strings(approvals, "approvals.by", "by")),
            reviews=None if reviews is None else StageReviews(
                _required(reviews, "reviews.stage", "stage", int),
                {str(k): str(v) for k, v in _required(reviews, "reviews.by", "by", dict).items()}),
            allocation=_shares(extra),
            winner=_typed(extra, "winner", str),
            dropped=_strings(extra, "dropped", "dropped"),
            srm_min_p=_number(extra, "srm_min_p"),
            artifacts=_typed(extra, "artifacts", dict),
            audit=AuditSeal(_typed(extra, "audit_seq", int), _typed(extra, "audit_head", str),
                            _typed(extra, "audit_key_id", str),
                            _typed(extra, "audit_state_mac", str)),
            unknown_extra={k: v for k, v in extra.items() if k not in _EXTRA_FIELDS},
        )


def _typed(data: Mapping[str, Any], key: str, kind: type[_T], where: str = "") -> _T | None:
    """``data[key]`` if it is a ``kind`` (an int is not a bool), None if absent or null."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"extra {where or key!r} is {type(value).__name__}, not "
                        f"{kind.__name__}")
    return value


def _required(data: Mapping[str, Any], where: str, key: str, kind: type[_T]) -> _T:
    value = _typed(data, key, kind, where)
    if value is None:
        raise KeyError(f"extra {where!r} is missing")
    return value


def _strings(data: Mapping[str, Any], where: str, key: str) -> list[str]:
    values = _typed(data, key, list, where) or []
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"extra {where!r} holds a value that is not a string")
    return [str(v) for v in values]


def _number(data: Mapping[str, Any], key: str, where: str = "") -> float | None:
    """``data[key]`` if it is a number, kept as stored (an int stays an int), None if absent."""
    value: float | None = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise TypeError(f"extra {where or key!r} is {type(value).__name__}, not a number")
    return value


def _shares(data: Mapping[str, Any]) -> dict[str, float] | None:
    shares = _typed(data, "allocation", dict)
    if shares is None:
        return None
    out: dict[str, float] = {}
    for arm in shares:
        share = _number(shares, arm, f"allocation.{arm}")
        if share is None:
            raise TypeError(f"extra 'allocation.{arm}' is null, not a number")
        out[arm] = share
    return out


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


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    """What a controller decision was computed from — the stage's summary as the analysis read
    it, the state before, the time and the variants judged — compressed JSON written with the
    decision (:mod:`safeshift.snapshots`); the decision's evidence holds its SHA-256, so the
    audit chain covers it. ``safeshift explain`` judges it again."""

    rollout: str
    seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The guardrails' verdicts at one moment of a stage, compact (:mod:`safeshift.snapshots`):
    the dashboard's bands over time. At most one a minute per rollout, and one per decision."""

    rollout: str
    stage: int
    at: float
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReportText:
    """The free text of a user's report, after :func:`safeshift.redact.redact` (never as sent),
    with how many details of each kind were taken out. Kept once per unit and stage, like the
    report's count."""

    rollout: str
    stage: int
    arm: str
    kind: str
    at: float
    text: str
    redactions: dict[str, int] = field(default_factory=dict)
