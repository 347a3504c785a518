"""The operations on rollouts, one function per verb: what the CLI, the HTTP API and the
dashboard all call, so that each verb means one thing whichever front end a person uses.

Every function takes the store (and a clock where time matters) and returns plain data
(:class:`~safeshift.state.RolloutState`, :class:`Status`, decisions, audit events); the front
ends only parse arguments and render. A rollout's plan is rebuilt from the store by
:func:`stored_plan` alone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshift._units import BASIS_POINTS
from safeshift.analysis import StageAnalysis, analyse
from safeshift.audit import (
    GENESIS,
    AuditEvent,
    AuditKey,
    AuditReport,
    Checkpoint,
    audit_key,
    export_lines,
    verify_rollout,
)
from safeshift.auth import LOCAL, AuthError, Denial, Principal, Role, TokenRecord, allows, new_token
from safeshift.clock import Clock
from safeshift.controller import Controller, approvals_of, reviews_of, split_for
from safeshift.errors import RolloutError, SafeshiftError, UnknownRolloutError, UnknownTokenError
from safeshift.experiment import allocation, current_variants
from safeshift.plan import Plan
from safeshift.recorder import REQUEST_FAULT
from safeshift.state import Action, Decision, Phase, RolloutState
from safeshift.store.base import Store
from safeshift.telemetry import Summary, TelemetryRow

__all__ = ["ACTION_ROLES", "LOCAL", "Status", "act", "audit_events", "create", "create_token",
           "denials", "export_audit", "history", "list_rollouts", "list_tokens", "privacy_report",
           "purge", "register", "release_notes", "require", "review", "revoke_token",
           "stage_analysis", "status", "statuses", "stored_plan", "verify_audit"]

ACTION_ROLES: dict[Action, Role] = {
    Action.PAUSE: Role.OPERATOR, Action.RESUME: Role.OPERATOR, Action.ROLLBACK: Role.OPERATOR,
    Action.APPROVE: Role.APPROVER, Action.PROMOTE: Role.APPROVER,
}
"""The least role each operator action needs (see :mod:`safeshift.auth`)."""
CREATE_ROLE = Role.OPERATOR
READ_ROLE = Role.VIEWER
ADMIN_ROLE = Role.ADMIN


def require(principal: Principal, need: Role, what: str) -> None:
    """:class:`~safeshift.auth.AuthError` (403) unless ``principal`` may do ``what``."""
    if not allows(principal.role, need):
        raise AuthError(403, f"{what} needs the {need} role (or higher); {principal.name} holds "
                             f"{principal.role}: ask an admin for a token with that role")


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
    # while a stage awaits approval: its role, how many approvers it needs, who approved, and
    # the creator when the creator may not approve
    approval: dict[str, Any] | None = None
    # signal -> requests whose labels from two clients disagree (the first label counts)
    label_conflicts: dict[str, float] = field(default_factory=dict)

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
            "approval": self.approval, "label_conflicts": self.label_conflicts,
        }



# -- plans and rollouts -------------------------------------------------------------------------


def stored_plan(store: Store, name: str) -> Plan:
    """The plan rollout ``name`` was registered with, validated again (a damaged stored plan
    is a :class:`~safeshift.errors.PlanValidationError` naming the rollout, not a traceback)."""
    return Plan.from_dict(store.get_plan(name), source=f"stored plan of {name}")


def pinned(store: Store, plan: Plan) -> Plan:
    """``plan`` with its registry aliases pinned to versions: those its rollout in ``store``
    was pinned to, when the store has this plan already, else those they point at now
    (:func:`safeshift.models.registry.pin`)."""
    from safeshift.models.registry import has_registry_refs, pin

    if not has_registry_refs(plan):
        return plan
    try:
        stored = store.get_plan(plan.rollout)
    except UnknownRolloutError:
        stored = None
    return pin(plan, stored=stored)


def assignment_seed(plan: Plan) -> str:
    """The secret that salts a new rollout's assignment hash, so that unit ids cannot be
    chosen to land on one arm: derived from the deployment's audit key (held outside the
    store, the same on every replica), so replicas registering the plan together agree."""
    message = f"safeshift assignment seed/{plan.rollout}/{plan.hash}".encode()
    return hmac.new(audit_key().secret, message, hashlib.sha256).hexdigest()[:32]


def register(store: Store, plan: Plan, clock: Clock, *, principal: Principal = LOCAL,
             salt_seed: str | None = None) -> RolloutState:
    """Register ``plan`` in the store, or find it there: a rollout name already used by a
    different plan is an error. The state records who created it (approvals may exclude the
    creator) and the assignment seed (:func:`assignment_seed`, or ``salt_seed``: simulations
    pass their own, to be reproducible anywhere)."""
    require(principal, CREATE_ROLE, f"creating rollout {plan.rollout!r}")
    from safeshift.lineage import artifacts

    now = clock.now()
    state = store.create_rollout(
        plan.canonical(), RolloutState(plan.rollout, plan.hash, created_at=now, updated_at=now,
                                       created_by=principal.actor,
                                       salt_seed=salt_seed or assignment_seed(plan),
                                       artifacts=artifacts(plan)))
    if state.plan_hash != plan.hash:
        raise RolloutError(
            f"rollout {plan.rollout!r} already exists in {store.url} with a different plan "
            f"({state.phase}); give the new plan another rollout name")
    return state


def create(store: Store, plan: Plan, clock: Clock, *, start: bool = True,
           principal: Principal = LOCAL) -> RolloutState:
    """Register ``plan`` and, with ``start``, begin its first stage (or wait for its
    approval). Creating the same plan again changes nothing. A registry alias is pinned to the
    version it points at now (:func:`safeshift.models.registry.pin`)."""
    require(principal, CREATE_ROLE, f"creating rollout {plan.rollout!r}")  # before the registry
    plan = pinned(store, plan)
    state = register(store, plan, clock, principal=principal)
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


def _label_conflicts(rows: Sequence[TelemetryRow]) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in rows:
        if row.signal.startswith("conflicts:"):
            signal = row.signal.removeprefix("conflicts:")
            out[signal] = out.get(signal, 0.0) + row.n
    return dict(sorted(out.items()))


def _watch(plan: Plan, state: RolloutState, now: float) -> dict[str, float] | None:
    watching = state.phase is Phase.WATCHING or (
        state.phase is Phase.PAUSED and state.paused_from is Phase.WATCHING)
    if not watching:
        return None
    stage = plan.stages[state.stage_index]
    watch = stage.watch or 0.0
    return {"holdback": float(stage.holdback or 0), "watch": watch,
            "remaining": max(watch - (now - state.stage_started_at), 0.0)}


def _approval(plan: Plan, state: RolloutState) -> dict[str, Any] | None:
    if state.pending_stage is None or state.phase is not Phase.AWAITING_APPROVAL:
        return None
    stage = plan.stages[state.pending_stage]
    rule = stage.approval_rule
    if rule is None and not stage.reviews:
        return None
    signed = reviews_of(state, state.pending_stage)
    reviews = [{"role": r.role, "note": r.note, "signed_by": signed.get(r.role)}
               for r in stage.reviews]
    if rule is None:
        return {"stage": stage.name, "role": None, "approvers": 0, "approved_by": [],
                "needed": 0, "excluded_creator": None, "reviews": reviews}
    votes = approvals_of(state, state.pending_stage)
    return {"stage": stage.name, "role": rule.role,
            "approvers": rule.approvers, "approved_by": votes,
            "needed": max(rule.approvers - len(votes), 0),
            "excluded_creator": (None if rule.creator_may_approve
                                 else state.created_by), "reviews": reviews}


def status(store: Store, rollout: Plan | str, clock: Clock, *,
           rows: Sequence[TelemetryRow] | None = None,
           state: RolloutState | None = None) -> Status:
    """Where ``rollout`` (a name, or its plan) is and what its guardrails say (``rows``: the
    current stage's totals, ``state``: its state, when the caller has read them already)."""
    plan = rollout if isinstance(rollout, Plan) else stored_plan(store, rollout)
    state = store.get_state(plan.rollout) if state is None else state
    split = split_for(plan, state)
    pending = plan.stages[state.pending_stage].name if state.pending_stage is not None else None
    rows = _totals(store, plan, state) if rows is None else rows
    analysis = stage_analysis(plan, store, state, rows) if not state.phase.terminal else None
    # a finished rollout's last stage ended with its last decision, not now
    now = clock.now()
    until = state.updated_at if state.phase.terminal else now
    return Status(plan.rollout, plan.endpoint, state.phase,
                  split.stage if state.stage_index >= 0 else None, state.stage_index,
                  split.traffic, split.shadow, max(until - state.stage_started_at, 0.0),
                  state.reason, pending, analysis, allocation(plan, state),
                  _request_faults(rows), _watch(plan, state, now), _approval(plan, state),
                  _label_conflicts(rows))


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


def verify_audit(store: Store, name: str, *, checkpoint: Checkpoint | None = None,
                 allow_unkeyed: bool = False, key: AuditKey | None = None) -> AuditReport:
    """Whether rollout ``name``'s audit log is complete, unaltered and signed with the audit
    key (by default the process's, :func:`~safeshift.audit.audit_key`), and what was found:
    the report's ``code`` is 0 (intact), 1 (tampered with: the first bad event is named) or 2
    (cannot be verified: no key, or another key). Given an exported ``checkpoint``, the chain
    must still hold its head at its sequence number (the store was not put back to an older
    copy). Events of an older release, hashed without a key, fail unless ``allow_unkeyed``."""
    state = store.get_state(name)
    return verify_rollout(state, store.audit_events(name), store.decisions(name), key=key,
                          allow_unkeyed=allow_unkeyed, checkpoint=checkpoint)


def export_audit(store: Store, name: str, clock: Clock, path: Path, *,
                 allow_unkeyed: bool = False,
                 key: AuditKey | None = None) -> tuple[AuditReport, Checkpoint | None]:
    """Write rollout ``name``'s audit events to ``path`` (JSON lines) followed by a signed
    :class:`~safeshift.audit.Checkpoint` of the chain's length and head, to keep outside the
    store for :func:`verify_audit`. The log is verified first and nothing is written unless it
    is intact (a checkpoint vouches for what it covers): the report says what was found, the
    checkpoint is None when nothing was written. The file is replaced atomically."""
    state = store.get_state(name)
    events = store.audit_events(name)
    report = verify_rollout(state, events, store.decisions(name), key=key,
                            allow_unkeyed=allow_unkeyed)
    if not report.ok:
        return report, None
    key = key or audit_key(create=False)
    head = events[-1].hash if events else GENESIS
    checkpoint = Checkpoint.sign(name, len(events), head, clock.now(), key)
    text = "".join(line + "\n" for line in export_lines(events, checkpoint))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return report, checkpoint


# -- acting -------------------------------------------------------------------------------------


def act(store: Store, name: str, action: Action, clock: Clock, *, reason: str,
        principal: Principal = LOCAL, actor: str | None = None) -> Decision:
    """An operator's action (approve, pause, resume, rollback, promote) on rollout ``name`` by
    ``principal`` (its role must allow it: :data:`ACTION_ROLES`), with the reason recorded in
    the audit log; :class:`~safeshift.errors.InvalidTransitionError` says why it does not fit.

    The decision's actor is the principal's name; ``actor`` is only a label shown beside it
    (``local:alice`` for someone acting on the store directly)."""
    need = ACTION_ROLES.get(action)
    if need is None:
        raise SafeshiftError(f"{action} is not an operator action; actions are "
                             f"{', '.join(str(a) for a in ACTION_ROLES)}")
    plan = stored_plan(store, name)
    if action is Action.APPROVE:  # the stage names the role its approvers hold
        pending = store.get_state(name).pending_stage
        rule = plan.stages[pending].approval_rule if pending is not None else None
        if rule is not None:
            need = Role(rule.role)
    require(principal, need, f"{action} of rollout {name!r}")
    if not reason.strip():
        raise SafeshiftError(f"{action} needs a reason (it is recorded in the audit log), e.g. "
                             "--reason 'error budget spent'")
    who = principal.actor if not actor else f"{principal.actor}:{actor}"
    return Controller(plan, store, clock).act(action, actor=who, reason=reason.strip())


def review(store: Store, name: str, role: str, clock: Clock, *, reason: str,
           principal: Principal = LOCAL, actor: str | None = None) -> Decision:
    """Sign off the ``role`` review of the stage rollout ``name`` awaits, as ``principal``,
    whose token must hold that review role (``safeshift token create --reviews ROLE``); the
    last review starts the stage unless it also needs an approval."""
    require(principal, READ_ROLE, f"the {role} review of rollout {name!r}")
    if not principal.may_review(role):
        held = ", ".join(sorted(principal.reviews or ())) or "none"
        raise AuthError(403, f"the {role} review needs a token holding the {role} review role; "
                             f"{principal.name} holds {held}: an admin creates one with "
                             f"safeshift token create --reviews {role}")
    if not reason.strip():
        raise SafeshiftError("a review needs a reason (it is recorded in the audit log), e.g. "
                             "--reason 'data collection checked'")
    plan = stored_plan(store, name)
    who = principal.actor if not actor else f"{principal.actor}:{actor}"
    return Controller(plan, store, clock).act(Action.REVIEW, actor=who, reason=reason.strip(),
                                              review=role)


# -- tokens and access ------------------------------------------------------------------------


def create_token(store: Store, clock: Clock, *, name: str, role: Role, expires_in: float | None,
                 principal: Principal = LOCAL, rights: dict[str, Any] | None = None,
                 ) -> tuple[str, TokenRecord]:
    """A new token for ``name`` holding ``role``: the token (shown once, never stored) and
    its record. A name already held by a valid token is refused, so that each name in the
    audit log means one credential."""
    require(principal, ADMIN_ROLE, "creating a token")
    now = clock.now()
    for other in store.list_tokens():
        if other.name == name and other.problem(now) is None:
            raise SafeshiftError(f"a valid token named {name!r} exists (id {other.id}); revoke "
                                 "it first (safeshift token revoke) or choose another name")
    token, record = new_token(name, role, created_by=principal.actor, now=now,
                              expires_in=expires_in, rights=rights)
    store.put_token(record)
    return token, record


def list_tokens(store: Store, *, principal: Principal = LOCAL) -> list[TokenRecord]:
    """Every token record (never a secret), oldest first."""
    require(principal, ADMIN_ROLE, "listing tokens")
    return store.list_tokens()


def revoke_token(store: Store, clock: Clock, token_id: str, *,
                 principal: Principal = LOCAL) -> TokenRecord:
    """Revoke a token by id: every gateway refuses it within
    :data:`~safeshift.auth.TOKEN_CACHE_SECONDS`."""
    require(principal, ADMIN_ROLE, "revoking a token")
    record = store.revoke_token(token_id, clock.now())
    if record is None:
        raise UnknownTokenError(f"no token with id {token_id!r}; safeshift token list shows "
                                "them")
    return record


def denials(store: Store, *, limit: int = 100, principal: Principal = LOCAL) -> list[Denial]:
    """The latest requests refused for want of a token or a role, newest first."""
    require(principal, ADMIN_ROLE, "reading the access-denial log")
    return store.denials(limit)


# -- retention ----------------------------------------------------------------------------------


def purge(store: Store, clock: Clock, *, older_than: float | None = None,
          rollout: str | None = None, dry_run: bool = False,
          principal: Principal = LOCAL) -> dict[str, dict[str, int]]:
    """Delete (or count, with ``dry_run``) records past their age: ``older_than`` seconds for
    every kind, or else each plan's ``retention``. Per rollout, the records of each kind
    removed. Telemetry (and decision inputs) only of stages that ended: a running stage keeps
    its evidence. Decisions and the audit log are never purged, so ``audit verify`` still
    passes; a decision whose inputs were purged keeps their SHA-256 in its audited evidence."""
    from safeshift.plan import RETENTION_KINDS

    require(principal, ADMIN_ROLE, "purging records")
    now = clock.now()
    names = [rollout] if rollout is not None else [s.name for s in list_rollouts(store)]
    out: dict[str, dict[str, int]] = {}
    for name in names:
        plan = stored_plan(store, name)
        state = store.get_state(name)
        running = not state.phase.terminal
        counts: dict[str, int] = {}
        for kind in RETENTION_KINDS:
            age = older_than if older_than is not None else getattr(plan.retention, kind)
            if age is None:
                continue
            before = state.stage_index if kind == "telemetry" and running else None
            counts[kind] = store.purge_before(name, kind, now - age, stages_before=before,
                                              dry_run=dry_run)
        out[name] = counts
    return out


def privacy_report(store: Store, *, rollout: str | None = None,
                   principal: Principal = LOCAL) -> list[dict[str, Any]]:
    """What the store holds per rollout, for a privacy reviewer: the attributes it keeps (and
    whether each is pseudonymised), the unit (never stored), consent, each kind of record with
    its count and oldest time, and the retention that applies."""
    require(principal, READ_ROLE, "reading the data inventory")
    names = [rollout] if rollout is not None else [s.name for s in list_rollouts(store)]
    out = []
    for name in names:
        plan = stored_plan(store, name)
        personal = set(plan.personal)
        from safeshift.plan import RETENTION_KINDS

        retention = {kind: getattr(plan.retention, kind) for kind in RETENTION_KINDS}
        retention["requests"] = retention["requests"] or plan.serving.label_window
        out.append({
            "rollout": name, "phase": str(store.get_state(name).phase),
            "unit": {"attribute": plan.unit, "stored": "never (a salted hash's bucket only)"},
            "attributes": [{"attribute": a, "pseudonymised": a in personal,
                            "stored_as": "keyed pseudonym (p:…)" if a in personal
                            else "as sent (cut to 64 characters)"} for a in plan.segments],
            "consent": None if plan.consent is None else plan.consent.model_dump(),
            "request_ids": "HMAC (r:…), never as sent",
            "report_text": "redacted (e-mail, card, IP, phone, long numbers), once per unit "
                           "and stage",
            "records": store.inventory(name),
            "retention": retention,
        })
    return out


# -- release notes ------------------------------------------------------------------------------

def _md(text: Any) -> str:
    from safeshift._units import markdown_text

    return markdown_text(text)


def release_notes(store: Store, name: str) -> str:
    """Rollout ``name`` as Markdown a team can paste for its users: what changed, why, who
    owns it, how it was validated, the stages it went through, every decision with its
    evidence and who took it, and how it ended."""
    from datetime import UTC, datetime

    plan = stored_plan(store, name)
    state = store.get_state(name)
    decisions = store.decisions(name)

    def when(at: float) -> str:
        return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")

    change = plan.change
    lines = [f"# {_md(plan.rollout)}: {_md(plan.endpoint)} {_md(plan.baseline.version)} → "
             f"{_md(plan.candidate.version)}", "", f"**{_md(change.summary)}**", ""]
    for label, value in (("Why", change.why), ("Owner", change.owner),
                         ("Validated offline", change.validation), ("Link", change.link)):
        if value:
            lines.append(f"- {label}: {_md(value)}")
    lines += [f"- Outcome: **{state.phase}** ({_md(state.reason)})",
              f"- Plan: `{plan.hash[:12]}`", "", "## Stages", "",
              "| stage | traffic | shadow | min duration | approval |", "|---|---|---|---|---|"]
    from safeshift._units import format_duration, format_share

    for stage in plan.stages:
        rule = stage.approval_rule
        approval = "-" if rule is None else (
            f"{rule.approvers} × {rule.role}" + ("" if rule.creator_may_approve
                                                 else ", not the creator"))
        lines.append(f"| {_md(stage.name)} | {format_share(stage.traffic)} | "
                     f"{format_share(stage.shadow)} | {format_duration(stage.min_duration)} | "
                     f"{approval} |")
    lines += ["", "## Decisions", ""]
    for d in decisions:
        lines.append(f"{d.seq}. {when(d.at)} — **{d.action}** → {d.phase} by {_md(d.actor)}: "
                     f"{_md(d.reason)}")
        ev = d.evidence
        if isinstance(ev.get("verdicts"), list):
            lines.append(f"   - traffic judged: {ev.get('n_baseline', 0):,.0f} baseline, "
                         f"{ev.get('n_candidate', 0):,.0f} candidate requests")
            for v in ev["verdicts"]:
                if isinstance(v, dict) and (v.get("segment") is None or v.get("status") == "harm"):
                    where = f" [{_md(v['segment'])}]" if v.get("segment") else ""
                    lines.append(f"   - {_md(v.get('guardrail'))}{where}: {v.get('status')} — "
                                 f"{_md(v.get('sentence', ''))}")
    return "\n".join(lines) + "\n"
