"""The gateway's request handlers, as plain functions of (gateway, body, scope) → Reply, so
that the fast path (pure ASGI) and the FastAPI routes share one implementation."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from safeshift.gateway import oip
from safeshift.gateway._http import HTTPError, Scope, annotate, dumps, header, request_id
from safeshift.gateway.feedback import parse_feedback, parse_reports
from safeshift.gateway.runtime import Gateway
from safeshift.gateway.serving import Endpoint, Served, cached_split, parse_predict
from safeshift.rollout import FeedbackResult, label_mismatch


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = b"application/json"


def endpoint(gw: Gateway, name: str) -> Endpoint:
    ep = gw.endpoints.get(name)
    if ep is None:
        known = ", ".join(sorted(gw.endpoints)) or "none"
        raise HTTPError(404, f"unknown endpoint {name!r}; this gateway serves: {known}",
                        field="name")
    return ep


def _served_headers(served: Served) -> list[tuple[bytes, bytes]]:
    out = [(b"x-safeshift-version", served.version.encode()),
           (b"x-safeshift-arm", served.arm.encode()),
           (b"x-safeshift-stage", served.stage.encode())]
    if served.fallback is not None:
        out.append((b"x-safeshift-fallback", served.fallback.encode()))
    return out


async def predict(gw: Gateway, name: str, body: bytes, scope: Scope) -> Reply:
    """``POST /v1/endpoints/{name}/predict``."""
    ep = endpoint(gw, name)
    req = parse_predict(body)
    rid = req.id or request_id(scope) or uuid.uuid4().hex
    served = await ep.predict(req.rows, unit=req.unit, context=req.context, request_id=rid,
                              protocol="v1")
    annotate(scope, endpoint=name, arm=served.arm, version=served.version,
             fallback=served.fallback)
    doc: dict[str, Any] = {"id": rid, "outputs": served.outputs, "version": served.version,
                           "arm": served.arm, "stage": served.stage,
                           "fallback": served.fallback is not None}
    if served.scores is not None:
        doc["scores"] = served.scores
    return Reply(200, dumps(doc), _served_headers(served))


async def infer(gw: Gateway, name: str, body: bytes, scope: Scope) -> Reply:
    """``POST /v2/models/{name}/infer`` (Open Inference Protocol)."""
    ep = endpoint(gw, name)
    req = oip.parse_infer(body, header(scope, oip.HEADER_LENGTH.encode()))
    oip.check_outputs(req)
    rows = oip.to_rows(req.inputs)
    if not rows:
        raise HTTPError(422, "the batch is empty: the first dimension is 0",
                        field="inputs[0].shape")
    unit, context = oip.unit_and_context(req, scope["headers"])
    rid = req.id or request_id(scope) or uuid.uuid4().hex
    served = await ep.predict(rows, unit=unit, context=context, request_id=rid, protocol="oip")
    annotate(scope, endpoint=name, arm=served.arm, version=served.version,
             fallback=served.fallback)
    if ep.output_datatype is None and served.outputs:
        ep.output_datatype = oip.output_datatype(served.outputs)
    data, extra = oip.encode_response(
        model_name=name, model_version=served.version, request_id=rid,
        outputs=served.outputs, scores=served.scores, request=req,
        parameters={"arm": served.arm, "stage": served.stage,
                    "fallback": served.fallback is not None})
    content_type = extra[0][1]
    return Reply(200, data, [*extra[1:], *_served_headers(served)], content_type)


async def feedback(gw: Gateway, body: bytes, scope: Scope) -> Reply:
    """``POST /v1/feedback``: labels and outcomes, one or a batch."""
    items, batch = parse_feedback(body)
    fields = [f"[{i}].id" if batch else "id" for i in range(len(items))]
    joined = await gw.join([it.id for it in items], fields)
    for i, it in enumerate(items):
        problem = label_mismatch(joined[it.id][1], it.label)
        if problem:
            # schema-valid, but at odds with the request it names: a conflict
            raise HTTPError(409, problem, field=f"[{i}].label" if batch else "label")

    def write() -> list[dict[str, Any]]:
        # one transaction per rollout (a batch may span endpoints)
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(joined[it.id][0].plan.rollout, []).append(i)
        done: dict[int, FeedbackResult] = {}
        for indices in groups.values():
            rollout = joined[items[indices[0]].id][0]
            batch_items = [{"id": items[i].id, "label": items[i].label,
                            "outcome": items[i].outcome} for i in indices]
            for i, res in zip(indices, rollout.feedback_many(batch_items), strict=True):
                done[i] = res
        results = []
        for i, it in enumerate(items):
            rollout, rec = joined[it.id]
            res = done[i]
            ep = gw.endpoints.get(rollout.plan.endpoint)
            if ep is not None and ep.rollout is rollout and res.accepted:
                ep.metrics.feedback(rec.arm, "label" if it.label is not None else "outcome")
            results.append({"id": it.id, "rollout": rec.rollout, "arm": rec.arm,
                            "stage": _stage_name(rollout.plan.stages, rec.stage),
                            "accepted": res.accepted, "duplicate": res.duplicate})
        return results

    results = await asyncio.to_thread(write)
    annotate(scope, feedback=len(results))
    return Reply(200, dumps({"results": results} if batch else results[0]))


async def reports(gw: Gateway, body: bytes, scope: Scope) -> Reply:
    """``POST /v1/reports``: users' issue reports, one or a batch."""
    items, batch = parse_reports(body)
    fields = [f"[{i}].id" if batch else "id" for i in range(len(items))]
    joined = await gw.join([it.id for it in items], fields)

    def write() -> list[dict[str, Any]]:
        results = []
        for it in items:
            rollout, rec = joined[it.id]
            accepted = rollout.report(it.id, it.kind, it.text)
            ep = gw.endpoints.get(rollout.plan.endpoint)
            if ep is not None and ep.rollout is rollout and accepted:
                ep.metrics.report(rec.arm)
            results.append({"id": it.id, "rollout": rec.rollout, "arm": rec.arm,
                            "kind": it.kind, "accepted": accepted, "duplicate": not accepted})
        return results

    results = await asyncio.to_thread(write)
    annotate(scope, reports=len(results))
    return Reply(200, dumps({"results": results} if batch else results[0]))


def _stage_name(stages: Any, index: int) -> str | None:
    return stages[index].name if 0 <= index < len(stages) else None


def model_metadata(gw: Gateway, name: str) -> dict[str, Any]:
    """``GET /v2/models/{name}``: what the Open Inference Protocol calls model metadata."""
    ep = endpoint(gw, name)
    plan = ep.rollout.plan
    features = getattr(ep.baseline, "features", None)
    width = len(features) if isinstance(features, list) else -1
    return {
        "name": name,
        "versions": [plan.baseline.version,
                     *(plan.variant(n).version for n in plan.variants)],
        "platform": "safeshift",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, width]}],
        # until the first answer shows otherwise, any output can travel as BYTES
        "outputs": [{"name": "output", "datatype": ep.output_datatype or oip.BYTES,
                     "shape": [-1]},
                    {"name": "score", "datatype": "FP64", "shape": [-1]}],
        "parameters": {"rollout": plan.rollout,
                       "stage": cached_split(ep.rollout).stage},
    }
