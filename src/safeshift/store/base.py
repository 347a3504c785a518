"""The store protocol: everything durable goes through these few methods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from safeshift.audit import AuditEvent
from safeshift.auth import Denial, TokenRecord
from safeshift.state import (
    Decision,
    DecisionInputs,
    FeedbackItem,
    OutboxEntry,
    ReportText,
    RequestRecord,
    RolloutState,
    Snapshot,
)
from safeshift.telemetry import TelemetryRow

SCHEMA_VERSION = 6


class Store(Protocol):
    """Durable state for rollouts. Implementations: :class:`MemoryStore`, :class:`SQLStore`."""

    url: str

    def create_rollout(self, plan: dict[str, Any], state: RolloutState) -> RolloutState:
        """Insert a rollout; if it exists with the same plan hash, return its state."""
        ...

    def get_plan(self, name: str) -> dict[str, Any]: ...

    def get_state(self, name: str) -> RolloutState: ...

    def list_states(self) -> list[RolloutState]: ...

    def commit(self, state: RolloutState, *, expected_version: int,
               decisions: Sequence[Decision] = (), audit: Sequence[AuditEvent] = (),
               outbox: Sequence[OutboxEntry] = (),
               inputs: Sequence[DecisionInputs] = ()) -> RolloutState:
        """Atomically write the new state, decisions, audit events, the notifications they
        cause (``outbox``, due at once) and what the decisions were computed from
        (``inputs``) if the stored version is still ``expected_version`` (else
        :class:`ConcurrencyError`); seals the audit chain."""
        ...

    def decision_inputs(self, rollout: str, seq: int) -> bytes | None:
        """What decision ``seq`` was computed from (:class:`DecisionInputs`), if recorded."""
        ...

    def put_snapshot(self, snapshot: Snapshot) -> None:
        """Keep one verdict snapshot (a later one at the same time replaces it)."""
        ...

    def snapshots(self, rollout: str, *, since: float | None = None,
                  segments: bool = False) -> list[Snapshot]:
        """The rollout's verdict snapshots (taken at ``since`` or later), oldest first; the
        segment verdicts (``body["segments"]``) only with ``segments``."""
        ...

    def last_snapshot_at(self, rollout: str) -> float | None: ...

    def add_report_text(self, report: ReportText) -> None:
        """Keep a report's redacted text."""
        ...

    def report_texts(self, rollout: str, *, limit: int = 50) -> list[ReportText]:
        """The rollout's latest report texts, newest first."""
        ...

    def add_telemetry(self, rows: Sequence[TelemetryRow]) -> None: ...

    def telemetry(self, rollout: str, stage: int | None = None) -> list[TelemetryRow]: ...

    def telemetry_totals(self, rollout: str, stage: int) -> list[TelemetryRow]:
        """The stage's telemetry summed over time windows (``window`` is 0): one row per
        (arm, cohort, segment, signal), so a controller tick costs the same on day one and on
        day thirty of a stage."""
        ...

    def put_requests(self, records: Sequence[RequestRecord]) -> None: ...

    def get_request(self, request_id: str) -> RequestRecord | None: ...

    def get_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]: ...

    def add_feedback(self, items: Sequence[FeedbackItem]) -> list[bool]:
        """Record each item once per (request, signal) and add its telemetry, all in one
        transaction. An item already recorded changes nothing and reports False."""
        ...

    def feedback_values(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """The stored value of each (request id, signal) recorded, by key."""
        ...

    def decisions(self, rollout: str) -> list[Decision]: ...

    def audit_events(self, rollout: str) -> list[AuditEvent]: ...

    def purge_expired(self, now: float) -> int: ...

    def inventory(self, rollout: str) -> dict[str, dict[str, float | None]]:
        """Per kind of record the store holds for the rollout (requests, labels, reports,
        telemetry, snapshots, decisions, audit), how many and when the oldest was written."""
        ...

    def purge_before(self, rollout: str, kind: str, cutoff: float, *,
                     stages_before: int | None = None, dry_run: bool = False) -> int:
        """Delete (or, with ``dry_run``, count) the rollout's records of ``kind`` — requests,
        reports, telemetry (with decision inputs), snapshots — older than ``cutoff``; telemetry
        only of stages below ``stages_before`` (None: every stage). Decisions and the audit log
        are never purged."""
        ...

    def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> bool:
        """Take or renew the named lease (e.g. the controller's) if free, expired or ours."""
        ...

    # -- the notification outbox -------------------------------------------------------

    def claim_outbox(self, now: float, *, limit: int, lease: float) -> list[OutboxEntry]:
        """Claim up to ``limit`` due entries (pending, ``next_attempt_at <= now``), each the
        oldest undelivered, not dead entry of its (rollout, target), by moving their
        ``next_attempt_at`` to ``now + lease``: no other process claims them meanwhile, and
        a process that dies holding them leaves them due again when the lease ends. On
        PostgreSQL the claim skips rows another replica is claiming (``SKIP LOCKED``)."""
        ...

    def settle_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        """Write back what became of claimed entries: ``attempts``, ``next_attempt_at``,
        ``delivered_at``, ``dead`` and ``last_error``, by ``id``."""
        ...

    def outbox(self, *, rollout: str | None = None, status: str | None = None,
               limit: int = 100) -> list[OutboxEntry]:
        """The latest ``limit`` entries (of one rollout, in one status: pending, delivered or
        dead), newest first."""
        ...

    def outbox_counts(self) -> dict[str, int]:
        """How many entries are pending, delivered and dead."""
        ...

    def requeue_dead(self, now: float, *, rollout: str | None = None) -> int:
        """Make dead entries pending again, due at ``now`` with no attempts; returns how many."""
        ...

    # -- access ---------------------------------------------------------------------

    def put_token(self, record: TokenRecord) -> None:
        """Insert a token record (its id is new)."""
        ...

    def get_token(self, token_id: str) -> TokenRecord | None: ...

    def list_tokens(self) -> list[TokenRecord]: ...

    def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        """Mark the token revoked (once: a revoked token keeps its first revocation time);
        None if there is no such token."""
        ...

    def add_denials(self, denials: Sequence[Denial]) -> None: ...

    def denials(self, limit: int = 100) -> list[Denial]:
        """The latest ``limit`` refused requests, newest first."""
        ...

    def close(self) -> None: ...
