"""Every decision re-derivable: judge a stored decision again from what it was computed from.

A controller decision stores its inputs (:mod:`safeshift.snapshots`): the stage's summary as
the analysis read it, the state before, the time and the variants judged. :func:`explain`
checks them against the SHA-256 the decision's (audited) evidence names, runs the analysis and
the controller's decision steps on them with the stored plan — the same functions the tick
runs, nothing re-implemented — and compares the result with the stored decision: action,
phase, stage, reason and every number of the evidence. ``what_if`` settings
(``tolerance.error_rate=0.005``, ``alpha=0.01``) re-run it under another plan and say whether
the decision would have changed.

A person's action (approve, pause, rollback, ...) has no inputs to re-derive: the explanation
says who acted and why, and what the guardrails said at the last snapshot before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import yaml

from safeshift.analysis import StageAnalysis, Verdict, analyse, format_measure
from safeshift.controller import _PRIORITY, PIPELINE, Intent, TickContext, step_analyse
from safeshift.errors import PlanValidationError, SafeshiftError
from safeshift.ops import stored_plan
from safeshift.plan import Plan
from safeshift.snapshots import decode_inputs, inputs_digest, state_from_json
from safeshift.state import Decision, Phase, RolloutState, Snapshot
from safeshift.store.base import Store
from safeshift.telemetry import Summary

__all__ = ["Explanation", "Rederived", "apply_what_if", "explain", "explain_lines", "parse_what_if",
           "rederive"]

_ANALYSIS_SHORTCUTS = ("alpha", "srm_alpha", "segment_min_samples", "srm_min_deviation",
                       "on_inconclusive", "expected_samples")
_GUARDRAIL_FIELDS = ("tolerance", "relative_tolerance", "max", "min", "strict", "above")
_STAGE_FIELDS = ("min_samples", "min_duration", "max_duration", "expected_samples")


@dataclass(slots=True)
class Rederived:
    """What the controller's steps decide on a decision's inputs under a plan."""

    intent: Intent | None
    analysis: StageAnalysis
    state: RolloutState  # the state the decision was taken in

    @property
    def to_stage(self) -> int | None:
        """The stage the decision leaves the rollout in, as the controller commits it: a stage
        awaiting approval is not entered yet, a rollback stays where it was."""
        i = self.intent
        if i is None:
            return None
        if i.phase is Phase.AWAITING_APPROVAL or i.to_stage < 0:
            return self.state.stage_index
        return i.to_stage

    @property
    def action(self) -> str:
        return str(self.intent.action) if self.intent is not None else "hold"

    def to_json(self) -> dict[str, Any]:
        i = self.intent
        return {"action": self.action,
                "phase": None if i is None else str(i.phase),
                "to_stage": self.to_stage,
                "reason": None if i is None else i.reason,
                "verdicts": [v.to_json() for v in self.analysis.verdicts if v.segment is None]}


@dataclass(slots=True)
class Explanation:
    """A stored decision, judged again."""

    decision: Decision
    # "controller" (re-derived), "operator" (a person's), "unrecorded" (no inputs), "purged"
    kind: str
    matches: bool | None = None  # None: nothing to re-derive
    differences: list[str] = field(default_factory=list)
    rederived: Rederived | None = None
    what_if: dict[str, Any] = field(default_factory=dict)  # the settings changed
    what_if_result: Rederived | None = None
    before: Snapshot | None = None  # for a person's action: the last verdicts before it

    @property
    def changed(self) -> bool | None:
        """Under ``what_if``, whether the decision would have been another one."""
        if self.what_if_result is None or self.rederived is None:
            return None
        a, b = self.rederived.intent, self.what_if_result.intent
        if a is None or b is None:
            return (a is None) != (b is None)
        return ((a.action, a.phase, self.rederived.to_stage)
                != (b.action, b.phase, self.what_if_result.to_stage))

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.decision.to_json() | {"evidence": None},
                "kind": self.kind, "matches": self.matches, "differences": self.differences,
                "rederived": self.rederived.to_json() if self.rederived else None,
                "what_if": self.what_if,
                "what_if_result": self.what_if_result.to_json() if self.what_if_result else None,
                "changed": self.changed}


def rederive(plan: Plan, inputs: Mapping[str, Any]) -> Rederived:
    """Run the analysis and the controller's decision steps on stored ``inputs``."""
    state = state_from_json(dict(inputs["state"]))
    summary = Summary.from_json(inputs["summary"])
    ctx = TickContext(plan, state, float(inputs["now"]), cast(Store, None))
    ctx.summary = summary
    ctx.analysis = analyse(plan, state.stage_index, summary, list(inputs["variants"]))
    for step in PIPELINE:
        if step is not step_analyse:
            step(ctx)
    intent = min(ctx.intents, key=lambda i: _PRIORITY[i.action]) if ctx.intents else None
    return Rederived(intent, ctx.analysis, state)


def _plain(value: Any) -> Any:
    """A value as the store gives it back (JSON, with the store's fallbacks)."""
    return json.loads(json.dumps(value, default=str))


def _differences(decision: Decision, got: Rederived) -> list[str]:
    i = got.intent
    if i is None:
        return [f"re-derived: no decision (hold); stored: {decision.action}"]
    out = []
    for name, stored, derived in (("action", str(decision.action), str(i.action)),
                                  ("phase", str(decision.phase), str(i.phase)),
                                  ("stage", decision.to_stage, got.to_stage)):
        if stored != derived:
            out.append(f"{name}: stored {stored}, re-derived {derived}")
    # a confirm hook's answer is appended to the reason after the steps decide
    if not decision.reason.startswith(i.reason):
        out.append(f"reason: stored {decision.reason!r}, re-derived {i.reason!r}")
    # what the commit adds to the steps' evidence: the inputs' digest and the lineage
    stored_ev = {k: v for k, v in decision.evidence.items() if k not in ("inputs", "lineage")}
    derived_ev = _plain(i.evidence)
    if stored_ev != derived_ev:
        keys = sorted(set(stored_ev) | set(derived_ev))
        changed = [k for k in keys if stored_ev.get(k) != derived_ev.get(k)]
        out.append(f"evidence differs in {', '.join(changed)}")
    return out


def parse_what_if(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` settings (values read as YAML scalars: ``0.005``, ``5%``, ``true``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SafeshiftError(f"what-if {item!r}: write KEY=VALUE, e.g. "
                                 "tolerance.error_rate=0.005 or alpha=0.01")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def apply_what_if(plan: Plan, settings: Mapping[str, Any]) -> Plan:
    """``plan`` with ``settings`` changed: ``alpha`` (and the other analysis fields, also as
    ``analysis.FIELD``), ``tolerance.GUARDRAIL`` (also relative_tolerance, max, min, strict,
    above; GUARDRAIL is its key, e.g. ``latency_ms>250``, or its metric) and
    ``stage.NAME.FIELD`` (min_samples, min_duration, max_duration, expected_samples). The
    result is validated like any plan; an unknown key is an error naming the keys."""
    doc = plan.canonical()
    for key, value in settings.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in _ANALYSIS_SHORTCUTS:
            parts = ["analysis", parts[0]]
        if parts[0] == "analysis" and len(parts) == 2:
            doc.setdefault("analysis", {})[parts[1]] = value
        elif parts[0] in _GUARDRAIL_FIELDS and len(parts) >= 2:
            name = ".".join(parts[1:])
            hits = [g for g, model in zip(doc["guardrails"], plan.guardrails, strict=True)
                    if name in (model.key, model.metric)]
            if not hits:
                raise SafeshiftError(f"what-if {key}: no guardrail {name!r}; the guardrails are "
                                     + ", ".join(g.key for g in plan.guardrails))
            for g in hits:
                g[parts[0]] = value
        elif parts[0] == "stage" and len(parts) == 3 and parts[2] in _STAGE_FIELDS:
            stages = [s for s in doc["stages"] if s.get("name") == parts[1]]
            if not stages:
                raise SafeshiftError(f"what-if {key}: no stage {parts[1]!r}; the stages are "
                                     + ", ".join(s.name for s in plan.stages))
            stages[0][parts[2]] = value
        else:
            raise SafeshiftError(
                f"what-if {key}: unknown setting; use alpha, srm_alpha, analysis.FIELD, "
                f"{'|'.join(_GUARDRAIL_FIELDS)}.GUARDRAIL or stage.NAME."
                f"{'|'.join(_STAGE_FIELDS)}")
    try:
        return Plan.from_dict(doc, source="what-if plan")
    except PlanValidationError as exc:
        raise SafeshiftError(f"the what-if settings make an invalid plan: {exc}") from None


def explain(store: Store, rollout: str, seq: int, *,
            what_if: Mapping[str, Any] | None = None) -> Explanation:
    """Judge decision ``seq`` of ``rollout`` again from its stored inputs (and, with
    ``what_if``, under changed settings)."""
    decisions = {d.seq: d for d in store.decisions(rollout)}
    if seq not in decisions:
        have = f"1 to {max(decisions)}" if decisions else "none yet"
        raise SafeshiftError(f"rollout {rollout!r} has no decision {seq} (decisions: {have}); "
                             f"safeshift history {rollout} lists them")
    decision = decisions[seq]
    plan = stored_plan(store, rollout)
    meta = decision.evidence.get("inputs")
    body = store.decision_inputs(rollout, seq)
    if isinstance(meta, dict) and body is None:
        return Explanation(decision, "purged", differences=[
            f"its inputs were purged by retention; their SHA-256 {meta.get('sha256')} remains "
            "in the decision's evidence, which the audit log covers"])
    if not isinstance(meta, dict) or body is None:
        kind = "controller" if decision.actor == "controller" else "operator"
        before = [s for s in store.snapshots(rollout) if s.at <= decision.at]
        out = Explanation(decision, "unrecorded" if kind == "controller" else "operator",
                          before=before[-1] if before else None)
        if kind == "controller" and what_if:
            raise SafeshiftError(f"decision {seq} of {rollout!r} was recorded without its "
                                 "inputs (a start, or an older release): nothing to re-run")
        return out
    if inputs_digest(body) != meta.get("sha256"):
        return Explanation(decision, "controller", matches=False, differences=[
            "the stored inputs do not match the SHA-256 in the decision's evidence: they were "
            "altered (safeshift audit verify checks the evidence itself)"])
    inputs = decode_inputs(body)
    got = rederive(plan, inputs)
    out = Explanation(decision, "controller", rederived=got)
    out.differences = _differences(decision, got)
    out.matches = not out.differences
    if what_if:
        out.what_if = dict(what_if)
        out.what_if_result = rederive(apply_what_if(plan, what_if), inputs)
    return out


# -- in words ----------------------------------------------------------------------------------


def _verdict_line(v: Verdict) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None or math.isnan(x) else format_measure(x, v.rate, v.relative,
                                                    level=v.bound is not None)
    band = f"[{f(v.lower)}, {f(v.upper)}]"
    limit = (f"{v.bound} {format_measure(v.tolerance, v.rate, False, signed=False, level=True)}"
             if v.bound else
             f"tolerance {format_measure(v.tolerance, v.rate, v.relative, signed=False)}")
    return (f"{v.guardrail:<22} {v.status!s:<8} {f(v.estimate):>10} {band:<24} {limit:<20} "
            f"n {v.n_baseline:,.0f} / {v.n_candidate:,.0f}")


def explain_lines(e: Explanation) -> list[str]:
    """The explanation as plain lines (the CLI prints them; the dashboard shows them)."""
    from datetime import UTC, datetime

    from safeshift._units import printable

    d = e.decision
    when = datetime.fromtimestamp(d.at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"decision {d.seq} of {printable(d.rollout)}: {d.action} -> {d.phase} by "
             f"{printable(d.actor)} at {when}", f"reason: {printable(d.reason)}"]
    if e.kind == "operator":
        lines.append("a person's action: nothing to re-derive (who and why are in the audit "
                     "log)")
        if e.before is not None:
            lines.append(f"the guardrails' last verdicts before it "
                         f"({datetime.fromtimestamp(e.before.at, UTC):%H:%M:%S}):")
            for row in e.before.body.get("verdicts", []):
                if row[1] is None:
                    lines.append(f"  {row[0]:<22} {row[3]}")
        return lines
    if e.kind == "purged":
        lines += [f"  {x}" for x in e.differences]
        return lines
    if e.kind == "unrecorded":
        lines.append("decided without an analysis (the rollout starting, or a release that "
                     "did not record inputs): nothing to re-derive")
        return lines
    meta = d.evidence.get("inputs", {})
    lines.append(f"re-derived from its stored inputs ({meta.get('bytes', 0):,} bytes, sha256 "
                 f"{str(meta.get('sha256', ''))[:12]}, covered by the audit chain) with the "
                 "stored plan:")
    got = e.rederived
    if got is not None:
        lines.append(f"  {got.action} -> {got.intent.phase if got.intent else '-'}")
        lines += ["  " + _verdict_line(v) for v in got.analysis.verdicts if v.segment is None]
        harms = [v for v in got.analysis.harms if v.segment is not None]
        lines += [f"  {v.segment}: " + _verdict_line(v) for v in harms[:10]]
    if e.matches:
        lines.append("MATCHES the stored decision exactly: action, phase, stage, reason and "
                     "every number of its evidence")
    else:
        lines.append("DOES NOT MATCH the stored decision:")
        lines += [f"  - {x}" for x in e.differences]
    if e.what_if_result is not None:
        settings = ", ".join(f"{k}={v}" for k, v in e.what_if.items())
        w = e.what_if_result
        lines.append(f"what if {settings}:")
        lines.append(f"  {w.action} -> {w.intent.phase if w.intent else '(no decision: hold)'}")
        lines += ["  " + _verdict_line(v) for v in w.analysis.verdicts if v.segment is None]
        lines.append("the decision WOULD HAVE CHANGED" if e.changed else
                     "the decision would have been the same")
    return lines
