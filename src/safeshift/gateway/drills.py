"""Drills against a running gateway (``safeshift drill PLAN --against URL``): the rollback path
rehearsed where it really runs, without touching real users.

``POST /v1/drills`` (admin) makes a drill copy of an endpoint's served rollout
(:func:`safeshift.drill.drill_plan`: its own name ``NAME~drill-…``, the widest partial stage,
held there) in the gateway's own store, so its decisions are in the real audit log, marked
``drill: true``. The copy is served on routes of its own, never on the endpoint's: real users'
requests keep their rollout and their assignment, and the copy's salt is its own. It borrows
the endpoint's loaded models — the candidate wrapped in a
:class:`~safeshift.drill.FaultInjector` — and gets its own protection (breaker, timeout, thread
pool), its own serving steps and metrics that ``/metrics`` does not export (a drill's latency
must not reach the dashboards and Prometheus guardrails of the real rollout). The gateway's
controller task ticks it like a served rollout.

=========================================  ================================================
route (admin)                              what
=========================================  ================================================
``POST /v1/drills``                        ``{endpoint, plan, fault, seed}``: a drill copy of
                                           the endpoint's rollout; ``plan`` is the hash of
                                           the plan the caller drills (409 when the server
                                           serves another)
``POST /v1/drills/{name}/predict``         as ``/v1/endpoints/{e}/predict``, on the copy
``POST /v1/drills/{name}/feedback``        ``[{id, label}]``: labels of the copy's requests
``POST /v1/drills/{name}/fault``           switch the fault on; answers the instant
``DELETE /v1/drills/{name}``               end the drill (a copy not rolled back is rolled
                                           back, "drill over"); the breaker's record
=========================================  ================================================

The copy's status, history and audit log are the ordinary ``/v1/rollouts/{name}`` routes. A
drill left behind ends by itself after :data:`DRILL_TTL` seconds. Behind a load balancer, run
a drill against one replica's own address: the copy lives in the process that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request

from safeshift import ops
from safeshift.assign import BASELINE
from safeshift.auth import AuthError, Principal
from safeshift.drill import FAULTS, FaultInjector, drill_name, drill_plan, fault_setup, marked
from safeshift.errors import SafeshiftError
from safeshift.gateway._http import HTTPError
from safeshift.gateway.auth import principal_of
from safeshift.gateway.bodies import load_json, parse_predict
from safeshift.gateway.metrics import GatewayMetrics
from safeshift.gateway.schemas import ErrorBody
from safeshift.gateway.serving import Endpoint
from safeshift.rollout import Rollout
from safeshift.state import Action

if TYPE_CHECKING:
    from safeshift.gateway.runtime import Gateway

DRILL_TTL = 600.0
"""Seconds after which a drill nobody ended is ended by the gateway."""
MAX_DRILLS = 2
"""Drills one gateway runs at once (each drives its own traffic through borrowed models)."""
MAX_LABELS = 1000


@dataclass(slots=True)
class ServedDrill:
    """One drill copy this gateway serves."""

    endpoint: Endpoint
    injector: FaultInjector
    fault: str
    delay: float
    segment: str | None
    started: float  # monotonic

    @property
    def rollout(self) -> Rollout:
        return self.endpoint.rollout

    @property
    def name(self) -> str:
        return self.rollout.plan.rollout

    def end(self, reason: str) -> dict[str, Any]:
        """Release the fault, roll back a copy that was not, stop its threads."""
        self.injector.release()
        rollout = self.rollout
        with contextlib.suppress(SafeshiftError):
            if not rollout.state().phase.terminal:
                rollout.act(Action.ROLLBACK, actor="drill", reason=reason)
        opened = self.endpoint.serving.guards["candidate"].breaker.opened > 0
        rollout.flush()
        self.endpoint.close()  # its candidate pool; the models are the endpoint's, kept open
        return {"rollout": self.name, "breaker_opened": opened,
                "phase": str(rollout.state().phase)}


def start_drill(gw: Gateway, endpoint: str, plan_hash: str, fault: str, seed: int
                ) -> ServedDrill:
    """A drill copy of ``endpoint``'s served rollout, ready to serve (see the module)."""
    ep = gw.endpoints.get(endpoint)
    if ep is None:
        raise HTTPError(404, f"unknown endpoint {endpoint!r}; this gateway serves: "
                             f"{', '.join(sorted(gw.endpoints)) or 'none'}", field="endpoint")
    plan = ep.rollout.plan
    if plan_hash != plan.hash:
        raise HTTPError(409, f"endpoint {endpoint!r} serves rollout {plan.rollout!r} with plan "
                             f"{plan.hash[:12]}, not the plan {plan_hash[:12]} you drill: drill "
                             "the plan the server serves", field="plan")
    if fault not in FAULTS:
        raise HTTPError(422, f"unknown fault {fault!r}; use one of {', '.join(FAULTS)}",
                        field="fault")
    if len(gw.drills) >= MAX_DRILLS:
        raise HTTPError(409, f"{len(gw.drills)} drills are running on this gateway; end one "
                             "first (DELETE /v1/drills/NAME)")
    copy, _ = drill_plan(plan, drill_name(plan.rollout, fault, time.time()))
    delay, segment, skipped = fault_setup(copy, fault)
    if skipped is not None:
        raise HTTPError(422, f"fault {fault!r} cannot be drilled: {skipped}", field="fault")
    injector = FaultInjector(ep.candidates["candidate"].model)
    rollout = Rollout.from_plan(copy, store=gw.store, clock=gw.clock,
                                models={BASELINE: ep.baseline, "candidate": injector},
                                salt_seed=f"drill-{seed}-{uuid.uuid4().hex}")
    private = GatewayMetrics()  # never exported: see the module
    served = Endpoint(rollout, private.endpoint(copy.endpoint, tuple(copy.variants)),
                      threads=gw.settings.candidate_threads, shadow_workers=1)
    drill = ServedDrill(served, injector, fault, delay, segment, time.monotonic())
    gw.drills[drill.name] = drill
    return drill


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_COMMON: dict[int | str, dict[str, Any]] = {
    401: _error("no valid token"), 403: _error("the token is not an admin's"),
    404: _error("no such drill on this gateway"), 422: _error("a body that is not as documented")}
_START_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["endpoint", "plan", "fault"], "additionalProperties": False,
    "properties": {
        "endpoint": {"type": "string", "description": "the served endpoint whose rollout to drill"},
        "plan": {"type": "string", "description": "the hash of the plan drilled (409 when the "
                 "endpoint serves another)"},
        "fault": {"enum": list(FAULTS)},
        "seed": {"type": "integer"}}}}}}}
_PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "description": "as for "
    "/v1/endpoints/{name}/predict"}}}}}
_LABELS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "maxItems": MAX_LABELS, "items": {
        "type": "object", "required": ["id", "label"], "additionalProperties": False,
        "properties": {"id": {"type": "string"}, "label": {}}}}}}}}


def build_drills(gw: Gateway, api: FastAPI) -> None:
    """Add the drill routes to ``api``."""
    router = APIRouter(prefix="/v1/drills", tags=["drills"])

    def admin(request: Request) -> Principal:
        principal = principal_of(request.scope)
        try:
            ops.require(principal, ops.ADMIN_ROLE, "running a drill")
        except AuthError as exc:
            gw.denials.record(request.scope, exc.status, str(exc), principal.name)
            raise HTTPError(exc.status, str(exc)) from None
        return principal

    def served(name: str) -> ServedDrill:
        drill = gw.drills.get(name)
        if drill is None:
            raise HTTPError(404, f"no drill {name!r} runs on this gateway (drills live in the "
                                 "process that made them; behind a load balancer, drill one "
                                 "replica by its own address)", field="name")
        return drill

    @router.post("", summary="Start a drill", status_code=201, openapi_extra=_START_BODY,
                 responses={**_COMMON, 404: _error("no such endpoint"),
                            409: _error("the endpoint serves another plan, or two drills run")})
    async def create(request: Request) -> Any:
        admin(request)
        doc = load_json(await request.body(), '{"endpoint", "plan", "fault", "seed"}')
        if not isinstance(doc, dict) or not isinstance(doc.get("endpoint"), str) \
                or not isinstance(doc.get("plan"), str) or not isinstance(doc.get("fault"), str):
            raise HTTPError(422, 'send {"endpoint": NAME, "plan": PLAN_HASH, "fault": FAULT, '
                                 '"seed": N}', field="body")
        seed = doc.get("seed", 1)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise HTTPError(422, "seed must be an integer", field="seed")
        drill = await asyncio.to_thread(start_drill, gw, doc["endpoint"], doc["plan"],
                                        doc["fault"], seed)
        plan = drill.rollout.plan
        return {"rollout": drill.name, "stage": plan.stages[0].name,
                "traffic": plan.stages[0].traffic / 10_000, "fault": drill.fault,
                "segment": drill.segment}

    @router.post("/{name}/predict", summary="Predict on a drill copy", openapi_extra=_PREDICT_BODY,
                 responses={**_COMMON, 502: _error("the baseline failed")})
    async def predict(request: Request, name: str) -> Any:
        admin(request)
        drill = served(name)
        req = parse_predict(await request.body())
        rows = marked(req.rows, drill.segment, req.context)
        answer = await drill.endpoint.predict(rows, unit=req.unit, context=req.context,
                                              request_id=uuid.uuid4().hex, protocol="v1")
        return {"id": answer.id, "outputs": answer.outputs, "arm": answer.arm,
                "version": answer.version, "fallback": answer.fallback is not None}

    @router.post("/{name}/feedback", summary="Labels for a drill copy's requests",
                 openapi_extra=_LABELS_BODY, responses=_COMMON)
    async def feedback(request: Request, name: str) -> Any:
        admin(request)
        drill = served(name)
        items = load_json(await request.body(), '[{"id": ..., "label": ...}]')
        if not isinstance(items, list) or len(items) > MAX_LABELS or not all(
                isinstance(i, dict) and set(i) == {"id", "label"} and isinstance(i["id"], str)
                for i in items):
            raise HTTPError(422, f'send at most {MAX_LABELS} [{{"id": ID, "label": LABEL}}]',
                            field="body")

        def write() -> int:
            drill.rollout.flush()
            with contextlib.suppress(SafeshiftError):
                results = drill.rollout.feedback_many(items, source="drill")
                return sum(bool(r.accepted) for r in results)
            return 0
        return {"accepted": await asyncio.to_thread(write)}

    @router.post("/{name}/fault", summary="Switch a drill's fault on", responses=_COMMON)
    async def inject(request: Request, name: str) -> Any:
        admin(request)
        drill = served(name)
        drill.injector.inject(drill.fault, delay=drill.delay)
        return {"fault": drill.fault, "injected_at": time.time()}

    @router.delete("/{name}", summary="End a drill", responses=_COMMON)
    async def end(request: Request, name: str) -> Any:
        admin(request)
        drill = served(name)
        del gw.drills[name]
        return await asyncio.to_thread(drill.end, "drill over")

    api.include_router(router)


__all__ = ["DRILL_TTL", "MAX_DRILLS", "ServedDrill", "build_drills", "start_drill"]
