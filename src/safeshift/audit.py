"""The audit log: one hash-chained event per decision, sealed by the store as it commits the
decision (each event's hash covers its content and the previous event's hash), and the checks
that find an event altered, removed, reordered or missing.

The controller asks :func:`decision_event` for the event of each decision it commits; nothing
else builds audit events, so what the chain covers is decided here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safeshift.state import Decision, RolloutState

__all__ = ["GENESIS", "AuditEvent", "decision_event", "verify_chain", "verify_rollout"]


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


def decision_event(decision: Decision, *, plan_hash: str) -> AuditEvent:
    """The audit event that records ``decision`` (sealed by the store when it commits)."""
    return AuditEvent(decision.rollout, 0, decision.at, decision.actor, str(decision.action),
                      {"reason": decision.reason, "from_stage": decision.from_stage,
                       "to_stage": decision.to_stage, "phase": str(decision.phase),
                       "plan_hash": plan_hash})
