"""A rollout as people look at it: one plain-data view that the dashboard's pages and the
reports (HTML, Markdown, JSON) all render, so that they show the same thing.

:func:`rollout_view` gathers it from the operations layer: the status and live analysis (or,
for a finished rollout, the verdicts its last decision or snapshot recorded), the plan's stages
against what happened, the guardrails' bands over time from the verdict snapshots, the
segment × guardrail grid, the split and drift checks, the decisions and the audit log, the
request faults, fallbacks and user reports, and the expected time left per stage from the
duration estimator at the observed traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from safeshift import ops
from safeshift._units import BASIS_POINTS, format_duration, format_share
from safeshift.assign import BASELINE
from safeshift.clock import Clock
from safeshift.plan import Plan
from safeshift.snapshots import SNAPSHOT_FIELDS
from safeshift.state import Decision, Phase, RolloutState, Snapshot
from safeshift.store.base import Store
from safeshift.telemetry import TelemetryRow

__all__ = ["GRID_CLASSES", "MAX_SERIES_POINTS", "list_view", "rollout_view", "verdict_class"]

MAX_SERIES_POINTS = 400
"""Points per guardrail band at most (snapshots are thinned evenly beyond)."""

GRID_CLASSES: dict[str, str] = {
    "harm": "harm proven",
    "suspected": "harm suspected (estimate beyond the tolerance, not proven)",
    "hold": "not yet conclusive",
    "safe": "proven safe",
    "nodata": "too little data",
    "unjudged": "not judged in this stage",
}
"""A grid cell's class → what it means (the legend; the cell also says it in words)."""


def verdict_class(v: Mapping[str, Any]) -> str:
    """The grid class of a verdict (a full one, or a snapshot row as a dict)."""
    status = v.get("status")
    if status == "harm":
        return "harm"
    if status == "pass":
        return "safe"
    if status == "no_data":
        return "nodata"
    harm, tol = v.get("harm"), v.get("tolerance")
    if isinstance(harm, float | int) and isinstance(tol, float | int) and harm > tol:
        return "suspected"
    return "hold"


def _row_dict(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(SNAPSHOT_FIELDS, row, strict=False))


def _thin(items: Sequence[Snapshot], limit: int) -> list[Snapshot]:
    if len(items) <= limit:
        return list(items)
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def _stage_times(plan: Plan, state: RolloutState, decisions: Sequence[Decision],
                 now: float) -> list[dict[str, Any]]:
    """Each planned stage with when it started and ended, from the decisions."""
    started: dict[int, float] = {}
    ended: dict[int, float] = {}
    current = -1
    for d in decisions:
        if d.to_stage != current and d.to_stage >= 0:
            if current >= 0:
                ended.setdefault(current, d.at)
            started.setdefault(d.to_stage, d.at)
            current = d.to_stage
        if d.phase in (Phase.ROLLED_BACK, Phase.PROMOTED) and current >= 0:
            ended.setdefault(current, d.at)
    out = []
    for i, stage in enumerate(plan.stages):
        if i in ended:
            status = "done"
        elif i in started:
            status = "current" if not state.phase.terminal else "done"
        else:
            status = "skipped" if state.phase.terminal else "future"
        rule = stage.approval_rule
        out.append({
            "index": i, "name": stage.name, "traffic": stage.served / BASIS_POINTS,
            "shadow": stage.shadow / BASIS_POINTS, "traffic_text": format_share(stage.served),
            "shadow_text": format_share(stage.shadow) if stage.shadow else "",
            "min_duration": stage.min_duration, "min_samples": stage.min_samples,
            "max_duration": stage.max_duration,
            "approval": None if rule is None else f"{rule.approvers} × {rule.role}",
            "started": started.get(i), "ended": ended.get(i), "status": status,
            "expected_seconds": None, "time_left": None,
        })
    return out


def _time_left(plan: Plan, stages: list[dict[str, Any]], analysis: dict[str, Any] | None,
               elapsed: float, state: RolloutState) -> None:
    """Fill each stage's expected duration and time left from the duration estimator, at the
    request rate observed in the current stage and the baseline levels it shows."""
    if analysis is None or state.phase.terminal or state.stage_index < 0 or elapsed <= 0:
        return
    from safeshift.duration import estimate_durations

    stage = plan.stages[state.stage_index]
    share = stage.served / BASIS_POINTS if not stage.is_shadow else 0.0
    n_b, n_c = float(analysis["n_baseline"]), float(analysis["n_candidate"])
    rate = (n_b + n_c) / elapsed if share else n_b / elapsed
    if not rate > 0:
        return
    levels: dict[str, float] = {}
    for v in analysis["verdicts"]:
        mean = v.get("mean_baseline")
        if v.get("segment") is None and v.get("rate") and isinstance(mean, float | int) \
                and 0 < mean < 1:
            levels[v["guardrail"]] = float(mean)
    try:
        report = estimate_durations(plan, rate, levels)
    except (ValueError, ArithmeticError):
        return
    for est, row in zip(report.stages, stages, strict=True):
        seconds = est.seconds
        if seconds is None or not math.isfinite(seconds):
            continue
        row["expected_seconds"] = seconds
        if row["status"] == "current":
            row["time_left"] = max(seconds - elapsed, 0.0)
        elif row["status"] == "future":
            row["time_left"] = seconds


def _verdicts(status: ops.Status, decisions: Sequence[Decision],
              snapshots: Sequence[Snapshot]) -> tuple[dict[str, Any] | None, str]:
    """The verdicts to show and where they come from: the live analysis while the rollout
    runs, else the last decision that recorded one, else the last snapshot."""
    if status.analysis is not None:
        return status.analysis.to_json(), "live"
    for d in reversed(decisions):
        if isinstance(d.evidence.get("verdicts"), list):
            return ({k: v for k, v in d.evidence.items() if k not in ("inputs", "lineage")},
                    f"decision {d.seq}")
    if snapshots:
        last = snapshots[-1]
        body = dict(last.body)
        rows = [*body.pop("verdicts", []), *body.pop("segments", [])]
        return {**body, "stage_index": last.stage,
                "verdicts": [_row_dict(r) for r in rows]}, "last snapshot"
    return None, "none"


def _guardrails(plan: Plan, analysis: dict[str, Any] | None,
                snapshots: Sequence[Snapshot]) -> list[dict[str, Any]]:
    """Each guardrail's latest verdict and its band over the time of the verdicts' stage (a
    new stage starts a new comparison, so earlier stages' bands are not drawn on)."""
    latest = {v["guardrail"]: v for v in (analysis or {}).get("verdicts", [])
              if v.get("segment") is None}
    stage = analysis.get("stage_index") if analysis else None
    series: dict[str, list[list[Any]]] = {}
    kept = [s for s in snapshots if stage is None or s.stage == stage]
    for snap in _thin(kept, MAX_SERIES_POINTS):
        for row in snap.body.get("verdicts", []):
            r = _row_dict(row)
            if r["segment"] is None:
                series.setdefault(r["guardrail"], []).append(
                    [snap.at, r["estimate"], r["lower"], r["upper"], r["status"], snap.stage])
    out = []
    for g in plan.guardrails:
        v = latest.get(g.key)
        out.append({
            "key": g.key, "label": g.describe(), "metric": g.metric,
            "harm_up": g.info.bad.value == "increase" if g.max is None and g.min is None
            else g.max is not None,
            "latest": v, "class": verdict_class(v) if v else "unjudged",
            "series": series.get(g.key, []),
        })
    return out


def _probes(plan: Plan, analysis: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each probe's latest verdict (of the first candidate variant that has one)."""
    latest: dict[str, dict[str, Any]] = {}
    for v in (analysis or {}).get("verdicts", []):
        if v.get("test") == "probe":
            latest.setdefault(v["guardrail"], v)
    out = []
    for p in plan.probes:
        v = latest.get(p.signal)
        out.append({"key": p.signal, "label": p.describe(), "every": p.every,
                    "latest": v, "class": verdict_class(v) if v else "unjudged"})
    return out


def _grid(plan: Plan, analysis: dict[str, Any] | None) -> dict[str, Any]:
    verdicts = [v for v in (analysis or {}).get("verdicts", []) if v.get("segment")]
    keys = [g.key for g in plan.guardrails if any(v["guardrail"] == g.key for v in verdicts)]
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for v in verdicts:
        by.setdefault(v["segment"], {})[v["guardrail"]] = v
    rows = []
    for segment in sorted(by):
        cells = []
        for key in keys:
            v = by[segment].get(key)
            cells.append(None if v is None else {**v, "class": verdict_class(v)})
        rows.append({"segment": segment, "cells": cells,
                     "worst": max((c["class"] == "harm") * 3 + (c["class"] == "suspected") * 2
                                  for c in cells if c) if any(cells) else 0})
    return {"guardrails": keys, "rows": rows, "classes": GRID_CLASSES}


def _counts(store: Store, plan: Plan, stage: int,
            known: Mapping[int, Sequence[TelemetryRow]]) -> dict[str, Any]:
    """Requests per arm, fallbacks and user reports in ``stage``, and the requests of every
    stage that ran (``known``: stages' totals read already)."""
    out: dict[str, Any] = {"stage": plan.stages[stage].name if stage >= 0 else None,
                           "requests": {}, "errors": {}, "fallbacks": 0.0, "reports": {},
                           "per_stage": []}
    for index in range(len(plan.stages)):
        rows = known[index] if index in known else store.telemetry_totals(plan.rollout, index)
        if not rows:
            continue
        requests: dict[str, float] = {}
        errors: dict[str, float] = {}
        reports: dict[str, float] = {}
        for r in rows:
            if r.signal == "requests":
                requests[r.arm] = requests.get(r.arm, 0.0) + r.n
            elif r.signal == "error_rate":
                errors[r.arm] = errors.get(r.arm, 0.0) + r.s
            elif r.signal.startswith("reports:"):
                kind = r.signal.removeprefix("reports:")
                reports[kind] = reports.get(kind, 0.0) + r.n
        out["per_stage"].append({"stage": plan.stages[index].name,
                                 "requests": dict(sorted(requests.items()))})
        if index == stage:
            # a candidate's failed answer is replaced by the baseline's: every candidate error
            # the users did not see is a fallback
            out.update(requests=dict(sorted(requests.items())),
                       errors=dict(sorted(errors.items())),
                       fallbacks=sum(n for arm, n in errors.items() if arm != BASELINE),
                       reports=dict(sorted(reports.items())))
    return out


def _waiting_for(status: ops.Status, stages: list[dict[str, Any]],
                 analysis: dict[str, Any] | None) -> str:
    phase = status.phase
    if phase is Phase.AWAITING_APPROVAL and status.approval:
        a = status.approval
        parts = [f"the {r['role']} review" for r in a.get("reviews", []) if not r["signed_by"]]
        if a.get("role") is not None:
            parts.append(f"approval by {a['needed']} more {a['role']}"
                         + (f" (approved by {', '.join(a['approved_by'])})"
                            if a["approved_by"] else ""))
        signed = [f"{r['role']} by {r['signed_by']}" for r in a.get("reviews", [])
                  if r["signed_by"]]
        return (f"stage {a['stage']!r}: " + "; ".join(parts)
                + (f" (signed: {', '.join(signed)})" if signed else ""))
    if phase is Phase.PAUSED:
        return "a person to resume or roll back"
    if phase.terminal:
        return "nothing: finished"
    if phase is Phase.WATCHING and status.watch:
        return f"the watch after promotion ({format_duration(status.watch['remaining'])} left)"
    if analysis is None:
        return "the first stage to start"
    waiting = [v["guardrail"] for v in analysis["verdicts"]
               if v.get("segment") is None and v.get("status") != "pass"]
    current = next((s for s in stages if s["status"] == "current"), None)
    parts = []
    if current is not None and status.stage_elapsed < current["min_duration"]:
        parts.append(f"min duration ({format_duration(current['min_duration'] - status.stage_elapsed)}"
                     " left)")
    if current is not None and min(analysis["n_baseline"], analysis["n_candidate"]) \
            < current["min_samples"]:
        parts.append(f"{current['min_samples']} samples per arm")
    if waiting:
        parts.append("evidence on " + ", ".join(waiting))
    return "; ".join(parts) or "the next tick"


def list_view(store: Store, clock: Clock, *, phase: Phase | None = None) -> list[dict[str, Any]]:
    """Every rollout, a row each, for the list page."""
    out = []
    for state in ops.list_rollouts(store, phase=phase):
        plan = ops.stored_plan(store, state.name)
        st = ops.status(store, plan, clock)
        out.append({
            "rollout": plan.rollout, "endpoint": plan.endpoint,
            "baseline": plan.baseline.version, "candidate": plan.candidate.version,
            "phase": str(st.phase), "stage": st.stage, "traffic": st.traffic / BASIS_POINTS,
            "traffic_text": format_share(st.traffic),
            "stage_elapsed": st.stage_elapsed, "reason": st.reason,
            "waiting_for": _waiting_for(st, _stage_times(plan, state, [], clock.now()),
                                        st.analysis.to_json() if st.analysis else None),
            "updated_at": state.updated_at,
        })
    return out


def rollout_view(store: Store, name: str, clock: Clock) -> dict[str, Any]:
    """Everything the rollout page and the report show, as plain data (JSON-able)."""
    plan = ops.stored_plan(store, name)
    state = store.get_state(name)
    now = clock.now()
    current = (store.telemetry_totals(name, state.stage_index) if state.stage_index >= 0
               else [])
    status = ops.status(store, plan, clock, rows=current, state=state)
    decisions = store.decisions(name)
    snapshots = store.snapshots(name)
    last = store.snapshots(name, since=snapshots[-1].at, segments=True) if snapshots else []
    analysis, source = _verdicts(status, decisions, last)
    stages = _stage_times(plan, state, decisions, now)
    _time_left(plan, stages, analysis, status.stage_elapsed, state)
    audit = ops.verify_audit(store, name)
    events = store.audit_events(name)
    change = plan.change
    return {
        "rollout": plan.rollout, "endpoint": plan.endpoint, "plan_hash": plan.hash,
        "baseline": plan.baseline.version, "candidate": plan.candidate.version,
        "unit": plan.unit, "segments": list(plan.segments), "personal": list(plan.personal),
        "alpha": plan.analysis.alpha,
        "phase": str(state.phase), "stage": status.stage, "stage_index": state.stage_index,
        "state_version": state.version,
        "traffic": status.traffic / BASIS_POINTS, "shadow": status.shadow / BASIS_POINTS,
        "stage_elapsed": status.stage_elapsed, "reason": state.reason,
        "waiting_for": _waiting_for(status, stages, analysis),
        "approval": status.approval, "watch": status.watch, "variants": status.variants,
        "change": {"summary": change.summary, "why": change.why, "owner": change.owner,
                   "validation": change.validation, "link": change.link},
        "created_at": state.created_at, "created_by": state.created_by,
        "updated_at": state.updated_at, "generated_at": now,
        "stages": stages,
        "verdicts_from": source,
        "analysis": analysis,
        "guardrails": _guardrails(plan, analysis, snapshots),
        "probes": _probes(plan, analysis),
        "grid": _grid(plan, analysis),
        "srm": (analysis or {}).get("srm"),
        "drift": (analysis or {}).get("drift"),
        "counts": {**_counts(store, plan, int(analysis["stage_index"]) if analysis
                             else state.stage_index, {state.stage_index: current}),
                   "request_faults": status.request_faults,
                   "label_conflicts": status.label_conflicts},
        "decisions": [{"seq": d.seq, "at": d.at, "action": str(d.action), "phase": str(d.phase),
                       "from_stage": d.from_stage, "to_stage": d.to_stage, "actor": d.actor,
                       "reason": d.reason, "explainable": "inputs" in d.evidence}
                      for d in decisions],
        "audit": {"ok": audit.ok, "code": audit.code, "message": audit.message,
                  "events": len(events),
                  "latest": [{"seq": e.seq, "at": e.at, "actor": e.actor, "action": e.action}
                             for e in events[-10:]][::-1]},
        "snapshots": len(snapshots),
        "report_texts": [{"at": r.at, "stage": r.stage, "arm": r.arm, "kind": r.kind,
                          "text": r.text, "redactions": r.redactions}
                         for r in store.report_texts(name, limit=20)],
    }
