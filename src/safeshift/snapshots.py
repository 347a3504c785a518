"""What the controller keeps of its analyses, beyond the decisions themselves.

- **Verdict snapshots**: at most one a minute per rollout (:data:`SNAPSHOT_EVERY`), and one at
  every decision, each the compact verdicts of one tick (estimate, interval, status, counts per
  guardrail and segment value, to 7 significant digits; the split check and the drift). The
  dashboard draws the guardrails' confidence bands over time from the global verdicts; the
  segment verdicts are kept apart and read only for the latest snapshot. They grow with time and
  the plan's segments, never with traffic: about 120 bytes a verdict, so a day of a rollout
  with 5 guardrails × 10 segment values is 1,440 × 6.6 KB (1.1 KB of it global).
- **Decision inputs**: what a controller decision was computed from — the stage's summary as
  the analysis read it (:meth:`~safeshift.telemetry.Summary.to_json`), the state before the
  decision, the time and the variants judged — compressed, written in the decision's
  transaction. The decision's evidence carries their SHA-256 (``evidence.inputs``), so the
  keyed audit chain, which covers the evidence, covers them too. :mod:`safeshift.explain`
  judges them again.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from typing import Any

from safeshift.analysis import StageAnalysis, Verdict
from safeshift.state import Phase, RolloutState, Snapshot
from safeshift.telemetry import Summary

__all__ = ["INPUTS_FORMAT", "SNAPSHOT_EVERY", "SNAPSHOT_FIELDS", "decode_inputs",
           "encode_inputs", "freeze_inputs", "inputs_digest", "snapshot_of", "state_from_json",
           "state_json"]

SNAPSHOT_EVERY = 60.0
"""Seconds between two verdict snapshots of a rollout (decisions add their own)."""

SNAPSHOT_FIELDS = ("guardrail", "segment", "arm", "status", "estimate", "lower", "upper",
                   "tolerance", "harm_upper", "n_baseline", "n_candidate", "harm", "relative",
                   "rate", "bound")
"""The columns of a snapshot's ``verdicts`` rows, in order."""

INPUTS_FORMAT = 1


def _num(value: float) -> float | None:
    """JSON has no infinity: an open end of an interval is null. Snapshots are for people
    (decisions are re-derived from their inputs, not from these), so 7 significant digits."""
    return float(f"{value:.7g}") if math.isfinite(value) else None


def _row(v: Verdict) -> list[Any]:
    return [v.guardrail, v.segment, v.arm, str(v.status), _num(v.estimate), _num(v.lower),
            _num(v.upper), _num(v.tolerance), _num(v.harm_upper), v.n_baseline, v.n_candidate,
            _num(v.harm), v.relative, v.rate, v.bound]


def snapshot_of(rollout: str, analysis: StageAnalysis, at: float, *,
                lineage: dict[str, Any] | None = None) -> Snapshot:
    """The compact snapshot of one analysis (rows in :data:`SNAPSHOT_FIELDS` order), with the
    plan, models and code it was computed with (:func:`safeshift.lineage.record`)."""
    full = analysis.to_json()
    drift = analysis.drift
    body: dict[str, Any] = {
        "stage": analysis.stage, "n_baseline": analysis.n_baseline,
        "n_candidate": analysis.n_candidate,
        "verdicts": [_row(v) for v in analysis.verdicts if v.segment is None],
        # read only when asked for (the bands over time need the global verdicts alone)
        "segments": [_row(v) for v in analysis.verdicts if v.segment is not None],
        "srm": full["srm"],  # as in a decision's evidence: a few numbers
        "drift": None if drift is None else {
            "kind": drift.get("kind"), "psi": _num(float(drift.get("psi", math.nan))),
            "n_baseline": drift.get("n_baseline"), "n_candidate": drift.get("n_candidate")},
        "lineage": lineage,
    }
    return Snapshot(rollout, analysis.stage_index, at, body)


# -- decision inputs ---------------------------------------------------------------------------


def state_json(state: RolloutState) -> dict[str, Any]:
    """A state as plain JSON (its columns and its ``extra``), read back by
    :func:`state_from_json`."""
    return {"name": state.name, "plan_hash": state.plan_hash, "phase": str(state.phase),
            "stage_index": state.stage_index, "stage_started_at": state.stage_started_at,
            "pending_stage": state.pending_stage, "version": state.version,
            "created_at": state.created_at, "updated_at": state.updated_at,
            "reason": state.reason, "extra": state.extra_json()}


def state_from_json(doc: dict[str, Any]) -> RolloutState:
    return RolloutState.from_row(
        name=str(doc["name"]), plan_hash=str(doc["plan_hash"]), phase=Phase(doc["phase"]),
        stage_index=int(doc["stage_index"]), stage_started_at=float(doc["stage_started_at"]),
        pending_stage=doc["pending_stage"], version=int(doc["version"]),
        created_at=float(doc["created_at"]), updated_at=float(doc["updated_at"]),
        reason=str(doc["reason"]), extra=doc["extra"])


def freeze_inputs(state: RolloutState, now: float, variants: Sequence[str],
                  summary: Summary) -> dict[str, Any]:
    """Everything a tick's decision depends on besides the plan (which the store keeps)."""
    return {"format": INPUTS_FORMAT, "now": now, "state": state_json(state),
            "variants": list(variants), "summary": summary.to_json()}


def encode_inputs(doc: dict[str, Any]) -> bytes:
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=True)
    return zlib.compress(text.encode(), 6)


def decode_inputs(body: bytes) -> dict[str, Any]:
    doc = json.loads(zlib.decompress(body))
    if not isinstance(doc, dict) or doc.get("format") != INPUTS_FORMAT:
        raise ValueError("decision inputs of an unknown format")
    return doc


def inputs_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
