"""The gateway's request handlers, as plain functions of (gateway, body, scope) → Reply, so
that the fast path (pure ASGI) and the FastAPI routes share one implementation.

Versioned Open Inference Protocol routes (``/v2/models/{name}/versions/{version}/...``) name
the baseline's or a candidate's version. Inference pinned to a version is answered by that
version or refused, never silently by another one:

- the baseline's version: always answered by the baseline, outside the comparison (the caller
  chose the model, so the request is counted in the ``excluded`` cohort, like the requests the
  plan's targeting excludes; it keeps a record, so feedback joins);
- a candidate's version: only once the rollout has promoted it (then every request gets it
  anyway, through the rollout); before that a 409 — a pin must not bypass the rollout's
  share, its targeting or a rollback;
- any other version: 404.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from safeshift.assign import BASELINE
from safeshift.auth import Principal
from safeshift.feedback import FeedbackResult, label_mismatch
from safeshift.gateway import oip
from safeshift.gateway._http import (
    HTTPError,
    Scope,
    annotate,
    dumps,
    header,
    request_id,
    request_id_given,
)
from safeshift.gateway.bodies import parse_predict
from safeshift.gateway.feedback import FeedbackItem, ReportItem, parse_feedback, parse_reports
from safeshift.gateway.request_ids import HEADER, serve_once
from safeshift.gateway.runtime import Gateway
from safeshift.gateway.serving import Endpoint, Served, cached_split
from safeshift.models import ModelBackend


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


def served_headers(served: Served) -> list[tuple[bytes, bytes]]:
    """The response headers that say who answered (version, arm, stage, fallback)."""
    out = [(b"x-safeshift-version", served.version.encode()),
           (b"x-safeshift-arm", served.arm.encode()),
           (b"x-safeshift-stage", served.stage.encode())]
    if served.fallback is not None:
        out.append((b"x-safeshift-fallback", served.fallback.encode()))
    return out


def _record_id(given: str | None, scope: Scope) -> tuple[str, str | None]:
    """The id the request's record gets, and where the client gave it (``id`` in the body, the
    ``X-Request-ID`` header), None when the gateway made it."""
    if given is not None:
        return given, "id"
    rid = request_id(scope)
    if rid is None:
        return uuid.uuid4().hex, None
    return rid, HEADER if request_id_given(scope) else None


def _asserts(scope: Scope) -> frozenset[str] | None:
    """The targeting attributes the authenticated client may assert (None: any)."""
    principal = scope.get("safeshift.principal")
    return principal.attributes if isinstance(principal, Principal) else None


async def predict(gw: Gateway, name: str, body: bytes, scope: Scope) -> Reply:
    """``POST /v1/endpoints/{name}/predict``."""
    ep = endpoint(gw, name)
    req = parse_predict(body)
    rid, given = _record_id(req.id, scope)
    served = await serve_once(gw, ep, rid, given, lambda: ep.predict(
        req.rows, unit=req.unit, context=req.context, request_id=rid, protocol="v1",
        asserts=_asserts(scope)))
    annotate(scope, endpoint=name, arm=served.arm, version=served.version,
             fallback=served.fallback)
    doc: dict[str, Any] = {"id": rid, "outputs": served.outputs, "version": served.version,
                           "arm": served.arm, "stage": served.stage,
                           "fallback": served.fallback is not None}
    if served.scores is not None:
        doc["scores"] = served.scores
    return Reply(200, dumps(doc), served_headers(served))


async def infer(gw: Gateway, name: str, body: bytes, scope: Scope) -> Reply:
    """``POST /v2/models/{name}/infer`` (Open Inference Protocol)."""
    return await _infer(gw, endpoint(gw, name), None, body, scope)


async def infer_version(gw: Gateway, name: str, version: str, body: bytes,
                        scope: Scope) -> Reply:
    """``POST /v2/models/{name}/versions/{version}/infer``: pinned to ``version`` (see the
    module docstring)."""
    ep = endpoint(gw, name)
    return await _infer(gw, ep, version_arm(ep, version), body, scope)


async def _infer(gw: Gateway, ep: Endpoint, pin: str | None, body: bytes, scope: Scope) -> Reply:
    name = ep.name
    req = oip.parse_infer(body, header(scope, oip.HEADER_LENGTH.encode()))
    oip.check_outputs(req)
    rows = oip.to_rows(req.inputs)
    if not rows:
        raise HTTPError(422, "the batch is empty: the first dimension is 0",
                        field="inputs[0].shape")
    unit, context = oip.unit_and_context(req, scope["headers"])
    if pin is not None and not pinnable(ep, pin):
        raise _not_pinnable(ep, pin)
    rid, given = _record_id(req.id, scope)

    def serve() -> Awaitable[Served]:
        return ep.predict(rows, unit=unit, context=context, request_id=rid, protocol="oip",
                          pin_baseline=pin == BASELINE, asserts=_asserts(scope))
    served = await serve_once(gw, ep, rid, given, serve)
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
    return Reply(200, data, [*extra[1:], *served_headers(served)], content_type)


async def feedback(gw: Gateway, body: bytes, scope: Scope) -> Reply:
    """``POST /v1/feedback``: labels and outcomes, one or a batch."""
    items, batch = parse_feedback(body)
    principal = scope.get("safeshift.principal")
    if isinstance(principal, Principal) and not principal.labels:
        message = (f"{principal.name}'s token may not send labels or outcomes (they decide "
                   "rollouts): the labelling pipeline's token needs the labels right "
                   "(safeshift token create --role client --labels ...)")
        gw.denials.record(scope, 403, message, principal.name)
        raise HTTPError(403, message)
    source = principal.token_id if isinstance(principal, Principal) else ""
    results = await apply_feedback(gw, items, batch, source=source)
    annotate(scope, feedback=len(results))
    return Reply(200, dumps({"results": results} if batch else results[0]))


async def apply_feedback(gw: Gateway, items: list[FeedbackItem], batch: bool, *,
                         source: str = "") -> list[dict[str, Any]]:
    """Join parsed feedback (:func:`~safeshift.gateway.feedback.parse_feedback`) to the requests
    it names and record it, all or nothing: :class:`HTTPError` 404 for an unknown or expired
    id, 422 for a value outside its metric's range, 409 for a label at odds with its request.
    One result per item (rollout, arm, stage, accepted, duplicate, conflict); the HTTP route
    and the in-process SDK both call it."""
    fields = [f"[{i}].id" if batch else "id" for i in range(len(items))]
    joined = await gw.join([it.id for it in items], fields)
    for i, it in enumerate(items):
        rollout, rec = joined[it.id]
        bad = rollout.joiner.feedback_problem(it.label, it.outcome)  # e.g. labels bounded by abs_error
        if bad:
            raise HTTPError(422, bad[1], field=f"[{i}].{bad[0]}" if batch else bad[0])
        problem = label_mismatch(rec, it.label)
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
            for i, res in zip(indices, rollout.feedback_many(batch_items, source=source),
                              strict=True):
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
                            "accepted": res.accepted, "duplicate": res.duplicate,
                            "conflict": res.conflict})
        return results

    return await asyncio.to_thread(write)


async def reports(gw: Gateway, body: bytes, scope: Scope) -> Reply:
    """``POST /v1/reports``: users' issue reports, one or a batch."""
    items, batch = parse_reports(body)
    results = await apply_reports(gw, items, batch)
    annotate(scope, reports=len(results))
    return Reply(200, dumps({"results": results} if batch else results[0]))


async def apply_reports(gw: Gateway, items: list[ReportItem], batch: bool
                        ) -> list[dict[str, Any]]:
    """Count parsed user reports (:func:`~safeshift.gateway.feedback.parse_reports`) against
    the requests they name (404 for an unknown or expired id, nothing written); one result per
    item. The HTTP route and the in-process SDK both call it."""
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

    return await asyncio.to_thread(write)


def _stage_name(stages: Any, index: int) -> str | None:
    return stages[index].name if 0 <= index < len(stages) else None


def model_metadata(gw: Gateway, name: str) -> dict[str, Any]:
    """``GET /v2/models/{name}``: what the Open Inference Protocol calls model metadata."""
    ep = endpoint(gw, name)
    plan = ep.rollout.plan
    versions = [plan.baseline.version, *(plan.variant(n).version for n in plan.variants)]
    return _metadata(ep, versions, ep.baseline, ep.output_datatype, {})


def version_arm(ep: Endpoint, version: str) -> str:
    """``baseline`` or the candidate variant whose version ``version`` is; 404 otherwise."""
    plan = ep.rollout.plan
    if version == plan.baseline.version:
        return BASELINE
    for name in plan.variants:
        if plan.variant(name).version == version:
            return name
    known = ", ".join([plan.baseline.version, *(plan.variant(n).version for n in plan.variants)])
    raise HTTPError(404, f"model {ep.name!r} has no version {version!r}; its versions are "
                         f"{known}", field="version")


def pinnable(ep: Endpoint, arm: str) -> bool:
    """Whether inference pinned to ``arm``'s version is served now: the baseline always, a
    candidate once the rollout has promoted it."""
    if arm == BASELINE:
        return True
    split = cached_split(ep.rollout)
    return split.serve_candidate_to_all and \
        split.candidate_version == ep.rollout.plan.variant(arm).version


def _not_pinnable(ep: Endpoint, arm: str) -> HTTPError:
    version = ep.rollout.plan.variant(arm).version
    split = cached_split(ep.rollout)
    if split.active:
        why = f"is being rolled out (stage {split.stage!r}): it answers only the requests the " \
              "rollout gives it"
    elif split.serve_candidate_to_all:
        why = f"was not promoted ({split.candidate_version!r} was)"
    else:
        why = "is not served: the rollout was rolled back, or has not started"
    return HTTPError(409, f"version {version!r} of model {ep.name!r} {why}; leave the version out "
                          f"(POST /v2/models/{ep.name}/infer) to let the rollout choose, or pin "
                          f"{ep.baseline_version!r}", field="version")


def version_metadata(gw: Gateway, name: str, version: str) -> dict[str, Any]:
    """``GET /v2/models/{name}/versions/{version}``: one version's model metadata."""
    ep = endpoint(gw, name)
    arm = version_arm(ep, version)
    if arm == BASELINE:
        model, datatype = ep.baseline, ep.output_datatype
    else:
        model = ep.candidates[arm].model
        declared = getattr(model, "output_datatype", None)
        datatype = declared if isinstance(declared, str) else None
    return _metadata(ep, [version], model, datatype,
                     {"arm": arm, "pinned_inference": pinnable(ep, arm)})


def version_ready(gw: Gateway, name: str, version: str) -> bool:
    """``GET /v2/models/{name}/versions/{version}/ready``: whether inference pinned to the
    version is served now (404 for an unknown version). The protocol says not ready with a 4xx:
    the route answers 409 for a candidate not promoted, 503 while the gateway starts."""
    ep = endpoint(gw, name)
    return gw.ready and pinnable(ep, version_arm(ep, version))


def _metadata(ep: Endpoint, versions: list[str], model: ModelBackend, datatype: str | None,
              parameters: dict[str, Any]) -> dict[str, Any]:
    plan = ep.rollout.plan
    features = getattr(model, "features", None)
    width = len(features) if isinstance(features, list) else -1
    return {
        "name": ep.name,
        "versions": versions,
        "platform": "safeshift",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, width]}],
        # until the first answer shows otherwise, any output can travel as BYTES
        "outputs": [{"name": "output", "datatype": datatype or oip.BYTES, "shape": [-1]},
                    {"name": "score", "datatype": "FP64", "shape": [-1]}],
        "parameters": {"rollout": plan.rollout, "stage": cached_split(ep.rollout).stage,
                       **parameters},
    }
