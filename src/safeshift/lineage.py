"""Where every decision came from: the plan, the models' artifacts, the code, the data.

When a rollout is registered, each arm's model artifact is fingerprinted (:func:`artifacts`):
the SHA-256 of a ``joblib:`` file, of the source file of a ``python:`` module (found without
importing it), the registry's record of a ``models:/`` version (its run and artifact source), or
— for models served elsewhere (``oip:``, ``mlflow-server:``, ``fake:``) — of the
reference itself, which names the model but cannot vouch for what answers behind it. The
fingerprints live in the rollout's state; every decision's evidence then carries a
:func:`record` of them with the plan hash and the safeshift version, so the audit chain (which
covers the evidence) vouches for them, and every verdict snapshot carries the same record.

:func:`trace` answers ``safeshift lineage ROLLOUT#SEQ``: which plan (and whether the stored plan
still hashes to it), which models (and whether each artifact still has the digest it had),
which code (the version that decided, and this one), and which data (the stage's cells the
decision's stored inputs hold, or that they were purged).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeshift.plan import ModelSpec, Plan

__all__ = ["Trace", "artifact_of", "artifacts", "record", "trace"]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _module_file(module: str, base_dir: Path) -> Path | None:
    """The source file of ``module``, next to the plan or on the path, without importing it."""
    parts = module.split(".")
    where = base_dir.joinpath(*parts)
    for candidate in (where.with_suffix(".py"), where / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    try:
        spec = importlib.util.find_spec(module)  # finds the top package, imports no code of ours
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None else None
    return Path(origin).resolve() if origin and Path(origin).is_file() else None


def _registry_artifact(ref: str, uri: str | None) -> dict[str, Any]:
    """A registered model version: the registry's record of it (its run and the source of its
    artifacts); the digest covers that record, so a version re-registered elsewhere differs."""
    from safeshift.models.registry import parse_ref, resolve

    mv = resolve(parse_ref(ref), uri)
    record = {"name": mv.name, "version": mv.version, "run_id": mv.run_id, "source": mv.source}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return {"kind": "registry", "registry": record, "sha256": digest}


def artifact_of(spec: ModelSpec, base_dir: Path, registry_uri: str | None = None) -> dict[str, Any]:
    """The fingerprint of one arm's model: its version, reference, kind (file, module,
    registry or reference), the file it came from (when there is one) and the SHA-256. A
    registry model is looked up given ``registry_uri`` (None: MLflow's environment)."""
    ref = spec.model
    scheme, _, rest = ref.partition(":")
    out: dict[str, Any] = {"version": spec.version, "model": ref, "path": None}
    path: Path | None = None
    if scheme == "joblib":
        path = (base_dir / rest).resolve()
        out["kind"] = "file"
    elif scheme == "python":
        path = _module_file(rest.partition(":")[0], base_dir)
        out["kind"] = "module"
    elif scheme == "models":
        return {**out, **_registry_artifact(ref, registry_uri)}
    if path is not None and path.is_file():
        out["path"] = str(path)
        out["sha256"] = _sha256_file(path)
    else:
        out["kind"] = "reference"  # served elsewhere: the reference names it, nothing more
        out["sha256"] = hashlib.sha256(ref.encode()).hexdigest()
    return out


def artifacts(plan: Plan) -> dict[str, dict[str, Any]]:
    """Every arm's fingerprint: the baseline, the candidate and any challengers."""
    arms = ["baseline", *plan.variants]
    return {arm: artifact_of(plan.variant(arm), plan.base_dir, plan.registry_uri) for arm in arms}


def record(plan_hash: str, fingerprints: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """What a decision or a snapshot says it was computed with."""
    from safeshift import __version__

    return {"plan_hash": plan_hash, "safeshift": __version__,
            "models": {arm: {"version": a.get("version"), "sha256": a.get("sha256")}
                       for arm, a in (fingerprints or {}).items()}}


@dataclass(slots=True)
class Trace:
    """``safeshift lineage`` of one decision."""

    rollout: str
    seq: int
    action: str
    from_stage: str | None
    to_stage: str | None
    at: float
    plan_hash: str | None
    plan_ok: bool
    code: str | None
    code_now: str
    models: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.plan_ok and all(m["status"] in ("match", "reference") for m in self.models)

    def to_json(self) -> dict[str, Any]:
        return {"rollout": self.rollout, "seq": self.seq, "action": self.action,
                "from_stage": self.from_stage, "to_stage": self.to_stage, "at": self.at,
                "plan_hash": self.plan_hash, "plan_ok": self.plan_ok, "code": self.code,
                "code_now": self.code_now, "models": self.models, "data": self.data,
                "ok": self.ok}


def _data(store: Any, rollout: str, seq: int, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        return {"inputs": "none (a person's action, a start, or an older release)"}
    body = store.decision_inputs(rollout, seq)
    if body is None:
        return {"inputs": f"purged by retention (SHA-256 {meta.get('sha256')} stays in the "
                          "audited evidence)"}
    from safeshift.snapshots import decode_inputs

    summary = decode_inputs(body)["summary"]
    populations = summary["pooled"]
    requests = {row[0]: row[5] for row in populations
                if row[2] == "requests" and row[3] == "" and row[1] == "hash"}
    return {"inputs": f"{meta.get('bytes', 0):,} bytes, SHA-256 {meta.get('sha256')}",
            "arms": summary["arms"], "segments": {a: len(v) for a, v in summary["values"].items()},
            "populations": len(populations), "requests": requests}


def _registry_status(plan: Plan, fp: dict[str, Any],
                     claimed: dict[str, Any]) -> tuple[str, str | None]:
    """A registry model's version as the registry describes it now: ``match``, ``changed``
    (re-registered from another run or source) or ``missing`` (deleted, or unreachable)."""
    from safeshift.errors import ModelLoadError

    try:
        now = _registry_artifact(fp["model"], plan.registry_uri)
    except ModelLoadError:
        return "missing", None
    return ("match" if now["sha256"] == claimed.get("sha256") else "changed"), now["sha256"]


def trace(store: Any, rollout: str, seq: int) -> Trace:
    """The lineage of decision ``seq`` of ``rollout``, each digest checked against the
    artifact as it is now."""
    from safeshift import __version__
    from safeshift.errors import SafeshiftError
    from safeshift.ops import stored_plan

    decisions = {d.seq: d for d in store.decisions(rollout)}
    if seq not in decisions:
        raise SafeshiftError(f"rollout {rollout!r} has no decision {seq}; safeshift history "
                             f"{rollout} lists them")
    d = decisions[seq]
    plan = stored_plan(store, rollout)
    state = store.get_state(rollout)
    lineage = d.evidence.get("lineage") if isinstance(d.evidence.get("lineage"), dict) else {}
    plan_hash = lineage.get("plan_hash", state.plan_hash)

    def stage(i: int) -> str | None:
        return plan.stages[i].name if 0 <= i < len(plan.stages) else None

    out = Trace(rollout, seq, str(d.action), stage(d.from_stage), stage(d.to_stage), d.at,
                plan_hash, plan.hash == plan_hash == state.plan_hash, lineage.get("safeshift"),
                __version__)
    recorded = state.artifacts or {}
    for arm, claimed in (lineage.get("models") or {}).items():
        fp = recorded.get(arm, {})
        entry = {"arm": arm, "version": claimed.get("version"), "sha256": claimed.get("sha256"),
                 "model": fp.get("model"), "path": fp.get("path"), "kind": fp.get("kind")}
        if fp.get("kind") == "reference":
            entry["status"] = "reference"  # served elsewhere: nothing local to check
        elif fp.get("kind") == "registry":
            entry["status"], entry["sha256_now"] = _registry_status(plan, fp, claimed)
        elif not fp.get("path") or not Path(fp["path"]).is_file():
            entry["status"] = "missing"
        else:
            now = _sha256_file(Path(fp["path"]))
            entry["status"] = "match" if now == claimed.get("sha256") else "changed"
            entry["sha256_now"] = now
        out.models.append(entry)
    out.data = _data(store, rollout, seq, d.evidence.get("inputs"))
    return out
