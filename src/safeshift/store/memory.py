"""An in-memory store for tests, simulations and benchmarks."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from safeshift.audit import GENESIS, AuditEvent, seal_commit, seal_state
from safeshift.auth import Denial, TokenRecord
from safeshift.errors import ConcurrencyError, UnknownRolloutError
from safeshift.pseudonym import request_key
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

_Key = tuple[str, int, str, str, str, int, int, str]


class MemoryStore:
    """Everything in dictionaries; same semantics as the SQL store, no durability."""

    url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._plans: dict[str, dict[str, Any]] = {}
        self._states: dict[str, RolloutState] = {}
        self._decisions: dict[str, list[Decision]] = {}
        self._audit: dict[str, list[AuditEvent]] = {}
        self._inputs: dict[tuple[str, int], bytes] = {}
        self._snapshots: dict[str, dict[float, Snapshot]] = {}
        self._report_texts: dict[str, list[ReportText]] = {}
        self._telemetry: dict[_Key, TelemetryRow] = {}
        self._totals: dict[tuple[str, int], dict[_Key, TelemetryRow]] = {}
        self._requests: dict[str, RequestRecord] = {}
        self._feedback: dict[tuple[str, str], float] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._denials: list[Denial] = []
        self._outbox: list[OutboxEntry] = []  # in id order

    def create_rollout(self, plan: dict[str, Any], state: RolloutState) -> RolloutState:
        with self._lock:
            existing = self._states.get(state.name)
            if existing is not None:
                return existing.copy()
            self._plans[state.name] = copy.deepcopy(plan)
            sealed = state.copy()
            seal_state(sealed, audit_seq=0, audit_head=GENESIS)  # sealed from the start
            self._states[state.name] = sealed
            return sealed.copy()

    def get_plan(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self._plans:
                raise UnknownRolloutError(f"no rollout named {name!r}")
            return copy.deepcopy(self._plans[name])

    def get_state(self, name: str) -> RolloutState:
        with self._lock:
            if name not in self._states:
                raise UnknownRolloutError(f"no rollout named {name!r}")
            return self._states[name].copy()

    def list_states(self) -> list[RolloutState]:
        with self._lock:
            return [s.copy() for s in self._states.values()]

    def commit(self, state: RolloutState, *, expected_version: int,
               decisions: Sequence[Decision] = (), audit: Sequence[AuditEvent] = (),
               outbox: Sequence[OutboxEntry] = (),
               inputs: Sequence[DecisionInputs] = ()) -> RolloutState:
        with self._lock:
            current = self.get_state(state.name)
            if current.version != expected_version:
                raise ConcurrencyError(
                    f"rollout {state.name!r} changed (version {current.version}, expected "
                    f"{expected_version}); re-read it and try again"
                )
            new = state.copy()
            new.version = expected_version + 1
            chain = self._audit.setdefault(state.name, [])
            seal_commit(new, audit, last_seq=len(chain),
                        last_hash=chain[-1].hash if chain else GENESIS)
            self._states[state.name] = new
            self._decisions.setdefault(state.name, []).extend(decisions)
            chain.extend(audit)
            for item in inputs:
                self._inputs[(item.rollout, item.seq)] = bytes(item.body)
            for entry in outbox:
                self._outbox.append(copy.deepcopy(entry))
                stored = self._outbox[-1]
                stored.id = len(self._outbox)
                stored.next_attempt_at = entry.created_at
            return new.copy()

    def add_telemetry(self, rows: Sequence[TelemetryRow]) -> None:
        with self._lock:
            for r in rows:
                _add(self._telemetry, r)
                _add(self._totals.setdefault((r.rollout, r.stage), {}),
                     TelemetryRow(r.rollout, r.stage, r.arm, r.cohort, r.segment, 0, r.signal,
                                  r.n, r.s, r.ss, r.hist, r.cluster))

    def telemetry_totals(self, rollout: str, stage: int) -> list[TelemetryRow]:
        with self._lock:
            return list(self._totals.get((rollout, stage), {}).values())

    def telemetry(self, rollout: str, stage: int | None = None) -> list[TelemetryRow]:
        with self._lock:
            return [r for r in self._telemetry.values()
                    if r.rollout == rollout and (stage is None or r.stage == stage)]

    def put_requests(self, records: Sequence[RequestRecord]) -> None:
        with self._lock:
            for rec in records:  # the first record of an id stays, as in SQLStore
                key = request_key(rec.id)
                if key not in self._requests:
                    self._requests[key] = replace(rec, id=key)

    def get_request(self, request_id: str) -> RequestRecord | None:
        return self.get_requests([request_id]).get(request_id)

    def get_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        with self._lock:
            out = {}
            for i in request_ids:
                rec = self._requests.get(request_key(i))
                if rec is not None:
                    out[i] = replace(rec, id=i)
            return out

    def add_feedback(self, items: Sequence[FeedbackItem]) -> list[bool]:
        out = []
        with self._lock:
            for item in items:
                key = (request_key(item.request_id), item.signal)
                if key in self._feedback:
                    out.append(False)
                    continue
                self._feedback[key] = item.value
                self.add_telemetry(item.rows)
                out.append(True)
        return out

    def feedback_values(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        with self._lock:
            out = {}
            for rid, signal in keys:
                value = self._feedback.get((request_key(rid), signal))
                if value is not None:
                    out[(rid, signal)] = value
            return out

    def decisions(self, rollout: str) -> list[Decision]:
        with self._lock:
            return list(self._decisions.get(rollout, []))

    def decision_inputs(self, rollout: str, seq: int) -> bytes | None:
        with self._lock:
            return self._inputs.get((rollout, seq))

    def put_snapshot(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots.setdefault(snapshot.rollout, {})[snapshot.at] = copy.deepcopy(snapshot)

    def snapshots(self, rollout: str, *, since: float | None = None,
                  segments: bool = False) -> list[Snapshot]:
        with self._lock:
            kept = self._snapshots.get(rollout, {})
            out = [copy.deepcopy(kept[at]) for at in sorted(kept) if since is None or at >= since]
        if not segments:
            for snap in out:
                snap.body.pop("segments", None)
        return out

    def add_report_text(self, report: ReportText) -> None:
        with self._lock:
            self._report_texts.setdefault(report.rollout, []).append(report)

    def report_texts(self, rollout: str, *, limit: int = 50) -> list[ReportText]:
        with self._lock:
            return list(reversed(self._report_texts.get(rollout, [])))[:limit]

    def last_snapshot_at(self, rollout: str) -> float | None:
        with self._lock:
            return max(self._snapshots.get(rollout, {}), default=None)

    def audit_events(self, rollout: str) -> list[AuditEvent]:
        with self._lock:
            return list(self._audit.get(rollout, []))

    def purge_expired(self, now: float) -> int:
        with self._lock:
            expired = [k for k, r in self._requests.items() if r.expires_at <= now]
            for k in expired:
                del self._requests[k]
            # a unit's report marks (unit:<hash>) outlive its requests: it reported this stage
            self._feedback = {f: v for f, v in self._feedback.items()
                              if f[0] in self._requests or f[0].startswith("unit:")}
            return len(expired)

    def inventory(self, rollout: str) -> dict[str, dict[str, float | None]]:
        with self._lock:
            records = [r for r in self._requests.values() if r.rollout == rollout]
            ids = {r.id for r in records}
            times: dict[str, list[float]] = {
                "requests": [r.created_at for r in records],
                "labels": [0.0 for (rid, _) in self._feedback if rid in ids],
                "reports": [r.at for r in self._report_texts.get(rollout, [])],
                "telemetry": [float(k[5]) for k in self._telemetry if k[0] == rollout],
                "snapshots": list(self._snapshots.get(rollout, {})),
                "decisions": [d.at for d in self._decisions.get(rollout, [])],
                "audit": [e.at for e in self._audit.get(rollout, [])],
            }
        # the memory store does not keep when a label came: its count, without a time
        return {kind: {"count": float(len(ts)),
                       "oldest": (min(ts) if ts and kind != "labels" else None)}
                for kind, ts in times.items()}

    def purge_before(self, rollout: str, kind: str, cutoff: float, *,
                     stages_before: int | None = None, dry_run: bool = False) -> int:
        with self._lock:
            if kind == "requests":
                gone = [rid for rid, r in self._requests.items()
                        if r.rollout == rollout and r.created_at < cutoff]
                if not dry_run:
                    for rid in gone:
                        del self._requests[rid]
                    self._feedback = {f: v for f, v in self._feedback.items()
                                      if f[0] in self._requests or f[0].startswith("unit:")}
                return len(gone)
            if kind == "reports":
                kept = self._report_texts.get(rollout, [])
                stale = [r for r in kept if r.at < cutoff]
                if not dry_run:
                    self._report_texts[rollout] = [r for r in kept if r.at >= cutoff]
                return len(stale)
            if kind == "snapshots":
                snaps = self._snapshots.get(rollout, {})
                old_at = [at for at in snaps if at < cutoff]
                if not dry_run:
                    for at in old_at:
                        del snaps[at]
                return len(old_at)
            if kind == "telemetry":
                def aged(key: _Key) -> bool:
                    return (key[0] == rollout and key[5] < cutoff
                            and (stages_before is None or key[1] < stages_before))
                gone_keys = [key for key in self._telemetry if aged(key)]
                old_seqs = {d.seq for d in self._decisions.get(rollout, []) if d.at < cutoff}
                inputs = [ik for ik in self._inputs if ik[0] == rollout and ik[1] in old_seqs]
                if not dry_run:
                    touched = {key[1] for key in gone_keys}
                    for key in gone_keys:
                        del self._telemetry[key]
                    for stage in touched:  # the stage's totals again, from what is left
                        totals: dict[_Key, TelemetryRow] = {}
                        for key, row in self._telemetry.items():
                            if key[0] == rollout and key[1] == stage:
                                _add(totals, replace(row, window=0))
                        self._totals[(rollout, stage)] = totals
                    for ik in inputs:
                        del self._inputs[ik]
                return len(gone_keys) + len(inputs)
            raise ValueError(f"unknown record kind {kind!r}")

    def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> bool:
        with self._lock:
            current = self._leases.get(name)
            if current is None or current[0] == holder or current[1] <= now:
                self._leases[name] = (holder, now + ttl)
                return True
            return False

    def claim_outbox(self, now: float, *, limit: int, lease: float) -> list[OutboxEntry]:
        with self._lock:
            claimed: list[OutboxEntry] = []
            heads: set[tuple[str, str]] = set()
            for entry in self._outbox:
                if entry.status != "pending":
                    continue
                queue = (entry.rollout, entry.target)
                if queue in heads:
                    continue  # an earlier entry of its queue is undelivered
                heads.add(queue)
                if entry.next_attempt_at <= now and len(claimed) < limit:
                    entry.next_attempt_at = now + lease
                    claimed.append(copy.deepcopy(entry))
            return claimed

    def settle_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        with self._lock:
            for e in entries:
                stored = self._outbox[e.id - 1]
                stored.attempts, stored.next_attempt_at = e.attempts, e.next_attempt_at
                stored.delivered_at, stored.dead, stored.last_error = (e.delivered_at, e.dead,
                                                                       e.last_error)

    def outbox(self, *, rollout: str | None = None, status: str | None = None,
               limit: int = 100) -> list[OutboxEntry]:
        with self._lock:
            found = [copy.deepcopy(e) for e in reversed(self._outbox)
                     if (rollout is None or e.rollout == rollout)
                     and (status is None or e.status == status)]
            return found[:limit]

    def outbox_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(("pending", "delivered", "dead"), 0)
            for e in self._outbox:
                counts[e.status] += 1
            return counts

    def requeue_dead(self, now: float, *, rollout: str | None = None) -> int:
        with self._lock:
            n = 0
            for e in self._outbox:
                if e.status == "dead" and (rollout is None or e.rollout == rollout):
                    e.dead, e.attempts, e.next_attempt_at = False, 0, now
                    n += 1
            return n

    def put_token(self, record: TokenRecord) -> None:
        with self._lock:
            if record.id in self._tokens:
                raise ValueError(f"token id {record.id} exists")
            self._tokens[record.id] = copy.deepcopy(record)

    def get_token(self, token_id: str) -> TokenRecord | None:
        with self._lock:
            record = self._tokens.get(token_id)
            return None if record is None else copy.deepcopy(record)

    def list_tokens(self) -> list[TokenRecord]:
        with self._lock:
            return [copy.deepcopy(t) for t in sorted(self._tokens.values(),
                                                     key=lambda t: (t.created_at, t.id))]

    def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        with self._lock:
            record = self._tokens.get(token_id)
            if record is None:
                return None
            if record.revoked_at is None:
                record.revoked_at = at
            return copy.deepcopy(record)

    def add_denials(self, denials: Sequence[Denial]) -> None:
        with self._lock:
            self._denials.extend(denials)

    def denials(self, limit: int = 100) -> list[Denial]:
        with self._lock:
            return sorted(self._denials, key=lambda d: -d.at)[:limit]

    def close(self) -> None:
        return None


def _add(table: dict[_Key, TelemetryRow], r: TelemetryRow) -> None:
    key = (r.rollout, r.stage, r.arm, r.cohort, r.segment, r.window, r.cluster, r.signal)
    old = table.get(key)
    if old is None:
        table[key] = r
        return
    hist = dict(old.hist or {})
    for b, c in (r.hist or {}).items():
        hist[b] = hist.get(b, 0) + c
    table[key] = TelemetryRow(r.rollout, r.stage, r.arm, r.cohort, r.segment, r.window, r.signal,
                              old.n + r.n, old.s + r.s, old.ss + r.ss, hist or None, r.cluster)
