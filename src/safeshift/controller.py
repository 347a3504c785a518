"""The rollout state machine and its tick.

A tick is a pipeline of small steps over a :class:`TickContext`. Steps read the state and the
stage's telemetry and add *intents* (start, advance, wait for approval, pause, roll back,
promote); the first intent by priority is committed once, in one transaction, together with
its decision record and audit event. The commit is compare-and-set on the state's version, so
a controller killed at any instant and restarted continues where it was, and two controllers
can never both act on one state.

Order of precedence: proven harm rolls back even when the split looks unhealthy (rolling back
is the safe direction); a sample-ratio mismatch blocks every advance and pauses the rollout.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from safeshift._units import BASIS_POINTS, format_duration, format_share
from safeshift.analysis import StageAnalysis, analyse, describe_harm, unexcluded_harm
from safeshift.assign import Split
from safeshift.audit import decision_event
from safeshift.clock import Clock
from safeshift.errors import ConcurrencyError, InvalidTransitionError, RegistryError
from safeshift.experiment import (
    allocation,
    best_arm,
    current_variants,
    moved,
    new_allocation,
    variant_split,
)
from safeshift.lineage import record
from safeshift.notify import ask_confirm, confirm_body, display_url, outbox_entries
from safeshift.plan import Approval, Confirm, Experiment, Plan, Stage
from safeshift.snapshots import (
    INPUTS_FORMAT,
    SNAPSHOT_EVERY,
    encode_inputs,
    freeze_inputs,
    inputs_digest,
    snapshot_of,
)
from safeshift.state import (
    Action,
    Decision,
    DecisionInputs,
    Phase,
    RolloutState,
    StageApprovals,
    StageReviews,
)
from safeshift.store.base import Store
from safeshift.telemetry import Summary

_PRIORITY = {Action.ROLLBACK: 0, Action.DROP_ARM: 1, Action.PAUSE: 2, Action.PROMOTE: 3,
             Action.END_WATCH: 3, Action.AWAIT_APPROVAL: 4, Action.ADVANCE: 5, Action.START: 6,
             Action.REALLOCATE: 7}

REGISTRY_RETRY = 30.0
"""Seconds between attempts to move a promotion's registry alias while the registry fails."""

log = logging.getLogger(__name__)

_JUDGING = (Phase.RUNNING, Phase.AWAITING_APPROVAL, Phase.WATCHING)
"""The phases in which the guardrails run: a stage, or the watch after promotion."""


StateUpdate = Callable[[RolloutState], None]
"""How an intent changes the state besides its phase and stage (an experiment's allocation,
the votes on a stage): applied to the copy of the state that the intent commits."""


@dataclass(slots=True)
class Intent:
    action: Action
    reason: str
    to_stage: int
    phase: Phase
    evidence: dict[str, Any] = field(default_factory=dict)
    update: StateUpdate | None = None  # applied to the new state before it is committed
    quiet: bool = False  # a state update only: no decision record, no audit event


@dataclass(slots=True)
class TickContext:
    """What one tick knows and wants."""

    plan: Plan
    state: RolloutState
    now: float
    store: Store
    analysis: StageAnalysis | None = None
    summary: Summary | None = None
    intents: list[Intent] = field(default_factory=list)

    @property
    def experiment(self) -> Experiment | None:
        stage = self.stage
        return stage.experiment if stage is not None and self.state.winner is None else None

    @property
    def stage(self) -> Stage | None:
        i = self.state.stage_index
        return self.plan.stages[i] if 0 <= i < len(self.plan.stages) else None

    @property
    def elapsed(self) -> float:
        return self.now - self.state.stage_started_at

    def want(self, intent: Intent) -> None:
        self.intents.append(intent)


Step = Callable[[TickContext], None]


def next_stage(plan: Plan, current: int) -> tuple[int, Action]:
    """Where a stage that passed leads: the next stage, approval first if it asks for it, or
    promotion after the last stage or on entering a 100% stage (no baseline left to compare)."""
    nxt = current + 1
    if nxt >= len(plan.stages):
        return current, Action.PROMOTE
    stage = plan.stages[nxt]
    if stage.gated:  # an approval, or reviews, come first
        return nxt, Action.AWAIT_APPROVAL
    if stage.is_full:
        return nxt, Action.PROMOTE
    return nxt, Action.ADVANCE


def approvals_of(state: RolloutState, stage: int) -> list[str]:
    """Who has approved stage ``stage`` so far (a stage needing several approvers)."""
    recorded = state.approvals
    if recorded is None or recorded.stage != stage:
        return []
    return list(recorded.by)


def reviews_of(state: RolloutState, stage: int) -> dict[str, str]:
    """The reviews signed so far for stage ``stage``: review role -> who signed."""
    recorded = state.reviews
    if recorded is None or recorded.stage != stage:
        return {}
    return dict(recorded.by)


def missing_reviews(plan: Plan, state: RolloutState, stage: int) -> list[str]:
    """The review roles stage ``stage`` still waits for."""
    signed = reviews_of(state, stage)
    return [r.role for r in plan.stages[stage].reviews if r.role not in signed]


def _record_approvals(votes: StageApprovals | None) -> StateUpdate:
    """Record the votes so far on a stage (None: forget them and the reviews: it starts)."""
    def update(state: RolloutState) -> None:
        state.approvals = votes
        if votes is None:
            state.reviews = None
    return update


def _record_reviews(signed: StageReviews | None) -> StateUpdate:
    """Record the reviews signed so far (None: forget them, the stage starts)."""
    def update(state: RolloutState) -> None:
        state.reviews = signed
        if signed is None:
            state.approvals = None
    return update


def gate_reason(stage: Stage) -> str:
    """What a gated stage waits for, in words."""
    parts = []
    if stage.reviews:
        parts.append("reviews (" + ", ".join(r.role for r in stage.reviews) + ")")
    if stage.approval_rule is not None:
        parts.append("approval")
    return " and ".join(parts)


def _drop_arm(arm: str) -> StateUpdate:
    """``arm`` leaves the experiment; the arms left share its traffic equally until the next
    re-allocation."""
    def update(state: RolloutState) -> None:
        state.dropped = [*state.dropped, arm]
        state.allocation = None
    return update


def _choose_arm(winner: str) -> StateUpdate:
    """The experiment ends with ``winner`` as the candidate for the rest of the rollout."""
    def update(state: RolloutState) -> None:
        state.winner = winner
        state.allocation = None
    return update


def _allocate(shares: dict[str, float]) -> StateUpdate:
    """The experiment's new allocation of the candidate traffic."""
    def update(state: RolloutState) -> None:
        state.allocation = dict(shares)
    return update


def promoted_phase(plan: Plan, to_stage: int) -> Phase:
    """The phase promotion into stage ``to_stage`` leads to: the watch when that stage holds
    units back on the baseline, else promoted."""
    stage = plan.stages[to_stage] if 0 <= to_stage < len(plan.stages) else None
    return Phase.WATCHING if stage is not None and stage.holdback is not None else Phase.PROMOTED


def _with_watch(plan: Plan, to_stage: int, reason: str) -> str:
    stage = plan.stages[to_stage]
    if stage.holdback is None or stage.watch is None:
        return reason
    return (f"{reason}; watching {format_share(stage.holdback)} of units held back on the "
            f"baseline for {format_duration(stage.watch)}")


def _transition(plan: Plan, current: int, reason: str, evidence: dict[str, Any],
                update: StateUpdate | None = None) -> Intent:
    to, action = next_stage(plan, current)
    if action is Action.PROMOTE:
        return Intent(action, _with_watch(plan, to, reason), to, promoted_phase(plan, to),
                      evidence, update)
    phase = {Action.AWAIT_APPROVAL: Phase.AWAITING_APPROVAL, Action.ADVANCE: Phase.RUNNING}[action]
    return Intent(action, reason, to, phase, evidence, update)


def step_start(ctx: TickContext) -> None:
    if ctx.state.phase is not Phase.PENDING:
        return
    first = ctx.plan.stages[0]
    if first.gated:
        ctx.want(Intent(Action.AWAIT_APPROVAL, f"stage {first.name!r} needs "
                        f"{gate_reason(first)} to start", 0, Phase.AWAITING_APPROVAL))
    else:
        ctx.want(Intent(Action.START, f"rollout started in stage {first.name!r}", 0,
                        Phase.RUNNING))


def step_analyse(ctx: TickContext) -> None:
    if ctx.state.phase not in _JUDGING or ctx.stage is None:
        return
    rows = ctx.store.telemetry_totals(ctx.plan.rollout, ctx.state.stage_index)
    ctx.summary = Summary.from_rows(rows)
    ctx.analysis = analyse(ctx.plan, ctx.state.stage_index, ctx.summary,
                           current_variants(ctx.plan, ctx.state))


def step_experiment(ctx: TickContext) -> None:
    """In an experiment stage: drop an arm with proven harm (roll back when none is left),
    pick a winner when one is best with the plan's confidence and passes every guardrail,
    otherwise re-allocate the candidate traffic by Thompson sampling."""
    exp, a, summary, stage = ctx.experiment, ctx.analysis, ctx.summary, ctx.stage
    if exp is None or a is None or summary is None or stage is None:
        return
    if ctx.state.phase is not Phase.RUNNING:
        return
    arms = current_variants(ctx.plan, ctx.state)
    harmed = [arm for arm in arms if any(v.arm == arm for v in a.harms)]
    if harmed:
        if len(harmed) == len(arms):
            ctx.want(Intent(Action.ROLLBACK, "harm proven for every arm of the experiment: "
                            + describe_harm(a), -1, Phase.ROLLED_BACK, a.to_json()))
            return
        arm = harmed[0]
        sentences = "; ".join(v.sentence for v in a.harms if v.arm == arm)
        ctx.want(Intent(Action.DROP_ARM, f"{arm} dropped from the experiment: {sentences}",
                        ctx.state.stage_index, Phase.RUNNING, a.to_json(), _drop_arm(arm)))
        return
    best, p_best, probs = best_arm(ctx.plan, ctx.state, summary, ctx.now)
    ready = (ctx.elapsed >= stage.min_duration and p_best >= exp.confidence
             and summary.total(best, "requests").n >= stage.min_samples
             and a.n_baseline >= stage.min_samples and a.passes(best))
    if ready:
        version = ctx.plan.variant(best).version
        named = best if version == best else f"{best} ({version})"
        reason = (f"experiment in stage {stage.name!r} chose {named}: best on {exp.objective} "
                  f"with probability {p_best:.3f}, every guardrail proven within tolerance")
        evidence = {**a.to_json(), "probability_best": probs}
        ctx.want(_transition(ctx.plan, ctx.state.stage_index, reason, evidence,
                             _choose_arm(best)))
        return
    new = new_allocation(ctx.plan, ctx.state, summary, ctx.now)
    if moved(allocation(ctx.plan, ctx.state), new):
        ctx.want(Intent(Action.REALLOCATE, "bandit re-allocation", ctx.state.stage_index,
                        Phase.RUNNING, {}, _allocate(new), quiet=True))


def step_harm(ctx: TickContext) -> None:
    if ctx.analysis is None or not ctx.analysis.harms or ctx.experiment is not None:
        return
    ctx.want(Intent(Action.ROLLBACK, "harm proven: " + describe_harm(ctx.analysis), -1,
                    Phase.ROLLED_BACK, ctx.analysis.to_json()))


def step_srm(ctx: TickContext) -> None:
    a = ctx.analysis
    if a is None or a.srm is None or not a.srm.mismatch:
        return
    srm = a.srm
    ctx.want(Intent(
        Action.PAUSE,
        f"sample-ratio mismatch in stage {a.stage!r}: candidate share "
        f"{srm.observed[1]:.2%} of {sum(srm.counts)} {a.srm_counted}, expected "
        f"{srm.expected[1]:.2%} "
        f"(p={srm.p_value:.2g}"
        + (f", counts over-dispersed {srm.dispersion:.2g}x by units counted more than once"
           if srm.dispersion > 1.0 else "")
        + "); comparisons cannot be trusted — check assignment and "
        "telemetry, then resume",
        ctx.state.stage_index, Phase.PAUSED, ctx.analysis.to_json() if ctx.analysis else {}))


def step_progress(ctx: TickContext) -> None:
    a, stage = ctx.analysis, ctx.stage
    if ctx.state.phase is not Phase.RUNNING or a is None or stage is None:
        return
    if ctx.experiment is not None:
        return  # step_experiment decides
    if ctx.elapsed < stage.min_duration:
        return
    if min(a.n_baseline, a.n_candidate) < stage.min_samples:
        return
    if not a.all_pass:
        return
    reason = (f"stage {stage.name!r} passed: every guardrail proven within tolerance after "
              f"{format_duration(ctx.elapsed)} ({int(a.n_candidate)} candidate, {int(a.n_baseline)} "
              "baseline requests)")
    unexcluded = unexcluded_harm(a)
    if unexcluded:
        reason += f"; largest harm not yet excluded per segment: {unexcluded}"
    ctx.want(_transition(ctx.plan, ctx.state.stage_index, reason, a.to_json()))


def step_watch(ctx: TickContext) -> None:
    """The watch after promotion ends when its time is up with no regression proven (a proven
    one rolls back first: step_harm's intent outranks this one)."""
    a, stage = ctx.analysis, ctx.stage
    if ctx.state.phase is not Phase.WATCHING or stage is None or stage.watch is None:
        return
    if ctx.elapsed < stage.watch:
        return
    n_c, n_b = (int(a.n_candidate), int(a.n_baseline)) if a is not None else (0, 0)
    reason = (f"the watch after promotion ended: no regression proven in "
              f"{format_duration(ctx.elapsed)} against the {format_share(stage.holdback or 0)} "
              f"holdback ({n_c} candidate, {n_b} baseline requests); the candidate now serves "
              "everyone")
    if a is not None:
        unexcluded = unexcluded_harm(a)
        if unexcluded:
            reason += f"; largest harm not yet excluded per segment: {unexcluded}"
    ctx.want(Intent(Action.END_WATCH, reason, ctx.state.stage_index, Phase.PROMOTED,
                    a.to_json() if a is not None else {}))


def step_deadline(ctx: TickContext) -> None:
    stage = ctx.stage
    if ctx.state.phase is not Phase.RUNNING or stage is None or stage.max_duration is None:
        return
    if ctx.elapsed < stage.max_duration or ctx.intents:
        return
    policy = ctx.plan.analysis.on_inconclusive
    waiting = ", ".join(v.guardrail for v in ctx.analysis.waiting_on) if ctx.analysis else ""
    base = (f"stage {stage.name!r} reached its max_duration of {format_duration(stage.max_duration)} "
            f"without a conclusion" + (f" (waiting on {waiting})" if waiting else ""))
    evidence = ctx.analysis.to_json() if ctx.analysis else {}
    if policy == "rollback":
        ctx.want(Intent(Action.ROLLBACK, base + "; on_inconclusive: rollback", -1,
                        Phase.ROLLED_BACK, evidence))
    elif policy == "promote":
        update = None
        if ctx.experiment is not None and ctx.summary is not None:
            best, p_best, _ = best_arm(ctx.plan, ctx.state, ctx.summary, ctx.now)
            update = _choose_arm(best)
            base += f"; {best} leads the experiment (probability best {p_best:.2f})"
        ctx.want(_transition(ctx.plan, ctx.state.stage_index,
                             base + "; on_inconclusive: promote", evidence, update))
    else:
        ctx.want(Intent(Action.PAUSE, base + "; holding for a person to decide", ctx.state.stage_index,
                        Phase.PAUSED, evidence))


# -- what a state means for traffic -----------------------------------------------------------


def _base_split(plan: Plan, state: RolloutState) -> Split:
    i = state.stage_index
    name = plan.stages[i].name if 0 <= i < len(plan.stages) else "-"
    common = {"stage": name, "stage_index": i, "candidate_version": plan.candidate.version,
              "baseline_version": plan.baseline.version}
    if state.phase is Phase.PROMOTED:
        return Split(traffic=BASIS_POINTS, shadow=0, active=False, serve_candidate_to_all=True,
                     **common)  # type: ignore[arg-type]
    if state.phase in (Phase.PENDING, Phase.ROLLED_BACK) or i < 0:
        return Split(traffic=0, shadow=0, active=False, **common)  # type: ignore[arg-type]
    stage = plan.stages[i]  # running, awaiting approval, paused, or watching after promotion
    return Split(traffic=stage.served, shadow=stage.shadow, active=True,
                 **common)  # type: ignore[arg-type]


def split_for(plan: Plan, state: RolloutState) -> Split:
    """The traffic split a state means, with the candidate variant(s) that serve."""
    split = _base_split(plan, state)
    if not plan.challengers:
        return split
    variants = variant_split(plan, state)
    return replace(split, variants=variants, candidate_version=variants[0][1])



_GATED = (Action.START, Action.ADVANCE, Action.AWAIT_APPROVAL, Action.PROMOTE)
"""The controller's decisions that can start a stage, so that its confirm hook is asked first
(operator actions are not asked: a person deciding is the confirmation)."""


def confirm_gate(plan: Plan, state: RolloutState, intent: Intent) -> Confirm | None:
    """The confirm hook ``intent`` must pass: that of the stage it starts, when it starts one
    (for a stage that also needs approval, before approval is asked for)."""
    if intent.action not in _GATED or intent.to_stage < 0 or intent.to_stage == state.stage_index:
        return None
    return plan.stages[intent.to_stage].confirm


_FORWARD = frozenset({Action.ADVANCE, Action.AWAIT_APPROVAL, Action.PROMOTE, Action.END_WATCH})
"""Decisions that move a rollout forward: what a blocker holds."""


PIPELINE: tuple[Step, ...] = (step_start, step_analyse, step_experiment, step_harm, step_srm,
                              step_progress, step_watch, step_deadline)


@dataclass(frozen=True, slots=True)
class Lease:
    """A controller that decides only while it holds the rollout's lease in the store, so that
    of several replicas one decides (the others keep serving and recording)."""

    holder: str  # unique per process, e.g. host:pid:random
    ttl: float  # seconds the lease lasts; renewed by every tick that holds it


class Controller:
    """Runs ticks and operator actions for one rollout against a store."""

    def __init__(self, plan: Plan, store: Store, clock: Clock,
                 steps: tuple[Step, ...] = PIPELINE, *, lease: Lease | None = None) -> None:
        self.plan = plan
        self.store = store
        self.clock = clock
        self.steps = steps
        self.lease = lease
        self._snapshot_at: float | None = None  # the last verdict snapshot's time (None: ask)
        self.held = False  # whether the last tick held the lease (so decided)
        self._registry_done = False  # the promotion's registry alias has moved (or never will)
        self._registry_tried: float | None = None  # the last failed attempt to move it
        # each says why the rollout may not move forward now (a measurement source that does
        # not answer), or None; rollbacks and pauses are never held
        self.blockers: list[Callable[[], str | None]] = []
        self._blocked: tuple[str, str] | None = None  # (the hold said, the reason before it)

    def holds_lease(self) -> bool:
        """Whether this controller may decide now: always without a lease, else while it holds
        (takes or renews) the rollout's lease."""
        if self.lease is None:
            return True
        return self.store.acquire_lease(f"controller:{self.plan.rollout}", self.lease.holder,
                                        self.lease.ttl, self.clock.now())

    def evaluate(self) -> TickContext:
        """Run the pipeline without committing anything."""
        ctx = TickContext(self.plan, self.store.get_state(self.plan.rollout), self.clock.now(),
                          self.store)
        if ctx.state.phase.terminal or ctx.state.phase is Phase.PAUSED:
            return ctx
        for step in self.steps:
            step(ctx)
        return ctx

    def tick(self) -> Decision | None:
        """Evaluate and commit the most important intent, if any. Idempotent: a tick that
        finds nothing to do writes nothing; without the lease (another replica decides) it does
        nothing at all."""
        self.held = self.holds_lease()
        if not self.held:
            return None
        ctx = self.evaluate()
        blocked = self._blocker(ctx)
        decision = self._decide(ctx, blocked)
        if decision is None:
            self._say_blocked(ctx, blocked)
        self._snapshot(ctx, decided=decision is not None)
        promoted = ctx.state.phase is Phase.PROMOTED or (
            decision is not None and decision.phase is Phase.PROMOTED)
        moved = self.move_registry_alias() if promoted else None  # at once when it promoted
        return decision or moved

    def move_registry_alias(self) -> Decision | None:
        """Once the rollout is promoted for good (after any watch), point the plan's
        ``registry.promote_alias`` at the promoted model's registry version, once, recorded as a
        REGISTRY decision (so in the audit log). A registry that cannot be reached is tried again
        every :data:`REGISTRY_RETRY` seconds by later ticks; a rollback never moves the alias."""
        reg = self.plan.registry
        if reg is None or reg.promote_alias is None or self._registry_done:
            return None
        state = self.store.get_state(self.plan.rollout)
        now = self.clock.now()
        if state.phase is not Phase.PROMOTED or (
                self._registry_tried is not None and now - self._registry_tried < REGISTRY_RETRY):
            return None
        if any(d.action is Action.REGISTRY for d in self.store.decisions(self.plan.rollout)):
            self._registry_done = True
            return None
        from safeshift.models import registry  # the mlflow extra, only for plans that use it

        promoted = "candidate" if state.winner is None else state.winner
        model = self.plan.variant(promoted).model
        if not registry.is_registry_ref(model):
            log.warning("rollout %s promoted %s (%s), not a registry model: alias %r not moved",
                        self.plan.rollout, promoted, model, reg.promote_alias)
            self._registry_done = True
            return None
        ref = registry.parse_ref(model)
        assert ref.version is not None  # the plan was pinned when the rollout was created
        try:
            before = registry.move_alias(reg.uri, ref.name, reg.promote_alias, ref.version)
        except RegistryError as exc:
            self._registry_tried = now
            log.warning("rollout %s: %s; trying again in %.0f s", self.plan.rollout, exc,
                        REGISTRY_RETRY)
            return None
        was = "a new alias" if before is None else f"version {before} before"
        intent = Intent(Action.REGISTRY, f"moved alias {reg.promote_alias!r} of registry model "
                        f"{ref.name!r} to the promoted version {ref.version} ({was})",
                        state.stage_index, Phase.PROMOTED,
                        evidence={"registry": {"model": ref.name, "alias": reg.promote_alias,
                                               "version": ref.version, "previous": before}})
        self._registry_done = True
        with contextlib.suppress(ConcurrencyError):  # another replica recorded it meanwhile
            return self._commit(state, intent, "controller", now)
        return None

    def _snapshot(self, ctx: TickContext, *, decided: bool) -> None:
        """Keep the tick's verdicts (one snapshot a minute, and one at each decision)."""
        if ctx.analysis is None:
            return
        if self._snapshot_at is None:
            self._snapshot_at = self.store.last_snapshot_at(self.plan.rollout) or -math.inf
        if decided or ctx.now - self._snapshot_at >= SNAPSHOT_EVERY:
            self.store.put_snapshot(snapshot_of(
                self.plan.rollout, ctx.analysis, ctx.now,
                lineage=record(ctx.state.plan_hash, ctx.state.artifacts)))
            self._snapshot_at = ctx.now

    def _blocker(self, ctx: TickContext) -> str | None:
        """Why the rollout must not move forward this tick, while its guardrails run."""
        if ctx.state.phase not in _JUDGING:
            return None
        for blocker in self.blockers:
            why = blocker()
            if why:
                return why
        return None

    def _say_blocked(self, ctx: TickContext, blocked: str | None) -> None:
        """Keep the state's reason saying why the rollout holds while a blocker holds it, and
        put the reason before back once nothing does."""
        if blocked is not None:
            before = self._blocked[1] if self._blocked else ctx.state.reason
            self._blocked = (blocked, before)
            self._hold(ctx.state, blocked, ctx.now)
        elif self._blocked is not None:
            said, before = self._blocked
            self._blocked = None
            if ctx.state.reason == said:
                self._hold(ctx.state, before, ctx.now)

    def _decide(self, ctx: TickContext, blocked: str | None = None) -> Decision | None:
        if not ctx.intents:
            return None
        intent = min(ctx.intents, key=lambda i: _PRIORITY[i.action])
        if blocked is not None and intent.action in _FORWARD:
            return None  # the tick says why (_say_blocked); the next one tries again
        gate = confirm_gate(self.plan, ctx.state, intent)
        if gate is not None:
            go, said = ask_confirm(gate, confirm_body(
                self.plan, action=intent.action, from_stage=ctx.state.stage_index,
                to_stage=intent.to_stage, phase=intent.phase, reason=intent.reason, at=ctx.now,
                evidence=intent.evidence))
            hook = display_url(gate.url)
            if not go:  # the stage before keeps running; the next tick asks again
                stage = self.plan.stages[intent.to_stage].name
                self._hold(ctx.state, f"waiting for confirm hook {hook} to answer go before "
                           f"stage {stage!r} starts: {said}", ctx.now)
                return None
            intent = replace(intent, reason=f"{intent.reason}; confirmed by hook {hook}")
        inputs = None
        if ctx.summary is not None and not intent.quiet:
            inputs = encode_inputs(freeze_inputs(ctx.state, ctx.now,
                                                 current_variants(self.plan, ctx.state),
                                                 ctx.summary))
        return self._commit(ctx.state, intent, "controller", ctx.now, inputs=inputs)

    def _hold(self, state: RolloutState, reason: str, now: float) -> None:
        """Say why the rollout holds in its state's reason (no decision: nothing happened);
        a hold already said writes nothing, so a tick that keeps holding costs no write."""
        if state.reason == reason:
            return
        new = state.copy()
        new.reason = reason
        new.updated_at = now
        with contextlib.suppress(ConcurrencyError):  # someone acted meanwhile: theirs stands
            self.store.commit(new, expected_version=state.version)

    def _commit(self, state: RolloutState, intent: Intent, actor: str, now: float, *,
                inputs: bytes | None = None) -> Decision | None:
        new = state.copy()
        if intent.update is not None:
            intent.update(new)
        if intent.quiet:
            new.updated_at = now
            self.store.commit(new, expected_version=state.version)
            return None
        seq = state.seq + 1
        new.seq = seq
        new.phase = intent.phase
        new.reason = intent.reason
        new.updated_at = now
        if intent.action is Action.PAUSE:
            new.paused_from = state.phase
        if intent.phase is Phase.AWAITING_APPROVAL:
            new.pending_stage = intent.to_stage
        elif intent.to_stage != state.stage_index and intent.to_stage >= 0:
            new.stage_index = intent.to_stage
            new.stage_started_at = now
            new.pending_stage = None
        if intent.phase in (Phase.PROMOTED, Phase.WATCHING):
            new.pending_stage = None
        # what it was decided with: the plan, the models' fingerprints, the code (audited with
        # the evidence: safeshift.lineage)
        evidence = {**intent.evidence, "lineage": record(state.plan_hash, state.artifacts)}
        stored = []
        if inputs is not None:  # the evidence names them, so the audit chain covers them
            evidence = {**evidence, "inputs": {"format": INPUTS_FORMAT, "bytes": len(inputs),
                                               "sha256": inputs_digest(inputs)}}
            stored.append(DecisionInputs(self.plan.rollout, seq, inputs))
        decision = Decision(self.plan.rollout, seq, now, intent.action, state.stage_index,
                            new.stage_index, intent.phase, intent.reason, actor, evidence)
        event = decision_event(decision, plan_hash=state.plan_hash, from_phase=state.phase)
        # the notifications are written with the decision: both or neither (safeshift.notify)
        self.store.commit(new, expected_version=state.version, decisions=[decision], audit=[event],
                          outbox=outbox_entries(self.plan, decision, from_phase=state.phase),
                          inputs=stored)
        return decision

    # -- operator actions -------------------------------------------------------------

    def act(self, action: Action, *, actor: str, reason: str = "",
            review: str | None = None) -> Decision:
        """Apply an operator action (``review``: the review role a REVIEW signs off), or raise
        :class:`InvalidTransitionError` saying why not."""
        state = self.store.get_state(self.plan.rollout)
        now = self.clock.now()
        phase = state.phase
        why = f" ({reason})" if reason else ""
        if phase.terminal:
            raise InvalidTransitionError(
                f"rollout {self.plan.rollout!r} is already {phase}; start a new rollout instead")
        if action is Action.REVIEW:
            intent = self._review(state, actor=actor, review=review, why=why)
        elif action is Action.APPROVE:
            if phase is not Phase.AWAITING_APPROVAL or state.pending_stage is None:
                raise InvalidTransitionError(
                    f"rollout {self.plan.rollout!r} is {phase}, not awaiting approval")
            to = state.pending_stage
            stage = self.plan.stages[to]
            unsigned = missing_reviews(self.plan, state, to)
            if unsigned:
                raise InvalidTransitionError(
                    f"stage {stage.name!r} waits for its reviews first ({', '.join(unsigned)}): "
                    "each is signed off by someone holding that review role (safeshift review)")
            if stage.approval_rule is None:
                raise InvalidTransitionError(
                    f"stage {stage.name!r} needs reviews, not an approval")
            rule = stage.approval_rule or Approval()
            votes = approvals_of(state, to)
            if actor in votes:
                raise InvalidTransitionError(
                    f"{actor} has already approved stage {stage.name!r}; it needs "
                    f"{rule.approvers} distinct approvers, so another person must approve")
            if not rule.creator_may_approve and actor == state.created_by:
                raise InvalidTransitionError(
                    f"{actor} created rollout {self.plan.rollout!r} and stage {stage.name!r} "
                    "may not be approved by its creator; ask another approver")
            votes = [*votes, actor]
            tally = f" ({len(votes)} of {rule.approvers} approvals)" if rule.approvers > 1 else ""
            said = f"{actor} approved stage {stage.name!r}{tally}{why}"
            if len(votes) < rule.approvers:
                missing = rule.approvers - len(votes)
                intent = Intent(Action.APPROVE, f"{said}; {missing} more needed (role "
                                f"{rule.role})", to, Phase.AWAITING_APPROVAL,
                                update=_record_approvals(StageApprovals(to, votes)))
            elif stage.is_full:
                intent = Intent(Action.PROMOTE, _with_watch(self.plan, to, said), to,
                                promoted_phase(self.plan, to), update=_record_approvals(None))
            else:
                intent = Intent(Action.APPROVE, said, to, Phase.RUNNING,
                                update=_record_approvals(None))
        elif action is Action.PAUSE:
            if phase is Phase.PAUSED:
                raise InvalidTransitionError(f"rollout {self.plan.rollout!r} is already paused")
            intent = Intent(Action.PAUSE, f"paused by {actor}{why}", state.stage_index, Phase.PAUSED)
        elif action is Action.RESUME:
            if phase is not Phase.PAUSED:
                raise InvalidTransitionError(f"rollout {self.plan.rollout!r} is {phase}, not paused")
            back = Phase.RUNNING if state.paused_from is None else state.paused_from
            if back is Phase.PENDING:
                back = Phase.RUNNING
            intent = Intent(Action.RESUME, f"resumed by {actor}{why}", state.stage_index, back)
        elif action is Action.ROLLBACK:
            intent = Intent(Action.ROLLBACK, f"rolled back by {actor}{why}", -1, Phase.ROLLED_BACK)
        elif action is Action.PROMOTE and phase is Phase.WATCHING:
            intent = Intent(Action.END_WATCH, f"watch ended early by {actor}{why}; the candidate "
                            "now serves everyone", state.stage_index, Phase.PROMOTED)
        elif action is Action.PROMOTE:
            # promotion by hand enters the plan's watch after promotion, if it has one
            last = len(self.plan.stages) - 1
            if promoted_phase(self.plan, last) is Phase.WATCHING:
                intent = Intent(Action.PROMOTE, _with_watch(self.plan, last,
                                                            f"promoted by {actor}{why}"),
                                last, Phase.WATCHING)
            else:
                intent = Intent(Action.PROMOTE, f"promoted by {actor}{why}", state.stage_index,
                                Phase.PROMOTED)
        else:
            raise InvalidTransitionError(f"{action} is not an operator action")
        decision = self._commit(state, intent, actor, now)
        assert decision is not None  # operator actions are never quiet
        self.move_registry_alias()
        return decision

    def _review(self, state: RolloutState, *, actor: str, review: str | None,
                why: str) -> Intent:
        """A review role's sign-off on the stage awaiting it; the last one starts the stage,
        unless an approval is still needed."""
        if state.phase is not Phase.AWAITING_APPROVAL or state.pending_stage is None:
            raise InvalidTransitionError(
                f"rollout {self.plan.rollout!r} is {state.phase}: no stage awaits a review")
        to = state.pending_stage
        stage = self.plan.stages[to]
        roles = [r.role for r in stage.reviews]
        if review not in roles:
            wanted = ", ".join(roles) or "none"
            raise InvalidTransitionError(
                f"stage {stage.name!r} has no {review} review (its reviews: {wanted})")
        signed = reviews_of(state, to)
        if review in signed:
            raise InvalidTransitionError(
                f"the {review} review of stage {stage.name!r} was signed by {signed[review]} "
                "already")
        signed[review] = actor
        said = f"{actor} signed off the {review} review of stage {stage.name!r}{why}"
        missing = [r for r in roles if r not in signed]
        if missing:
            return Intent(Action.REVIEW, f"{said}; waiting for {', '.join(missing)}", to,
                          Phase.AWAITING_APPROVAL, update=_record_reviews(StageReviews(to, signed)))
        if stage.approval_rule is not None:
            return Intent(Action.REVIEW, f"{said}; every review signed, waiting for approval",
                          to, Phase.AWAITING_APPROVAL,
                          update=_record_reviews(StageReviews(to, signed)))
        said += "; every review signed"
        if stage.is_full:
            return Intent(Action.PROMOTE, _with_watch(self.plan, to, said), to,
                          promoted_phase(self.plan, to), update=_record_reviews(None))
        return Intent(Action.REVIEW, f"{said}: the stage starts", to, Phase.RUNNING,
                      update=_record_reviews(None))
