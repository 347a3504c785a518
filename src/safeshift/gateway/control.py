"""The control API: rollouts, tokens and the denial log over HTTP, each route one call of
:mod:`safeshift.ops` (which checks the caller's role), run in a worker thread.

=========================================  =========  ===========================================
route                                      role       what
=========================================  =========  ===========================================
``GET /v1/rollouts[?phase=]``              viewer     every rollout's status
``POST /v1/rollouts[?start=false]``        operator   create from a plan (JSON); 422 lists every
                                                      problem
``GET /v1/rollouts/{name}``                viewer     status: phase, stage, traffic, verdicts
``GET /v1/rollouts/{name}/history``        viewer     every decision, with its evidence
``GET /v1/rollouts/{name}/audit``          viewer     the audit log and whether it verifies
``POST /v1/rollouts/{name}/{action}``      operator,  approve, pause, resume, rollback, promote,
                                           approver   each with a required ``reason``
``POST /v1/rollouts/{name}/reviews/{role}`` review    sign off a stage's review (the token holds
                                           role       the review role), with a ``reason``
``GET|POST /v1/tokens``,                   admin      list, create (the token is in the answer,
``DELETE /v1/tokens/{id}``                            once), revoke
``GET /v1/denials[?limit=]``               admin      the latest refused requests
=========================================  =========  ===========================================
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from safeshift import ops
from safeshift._units import parse_duration
from safeshift.auth import AuthError, Principal, parse_role
from safeshift.errors import (
    InvalidTransitionError,
    PlanError,
    PlanValidationError,
    SafeshiftError,
    UnknownRolloutError,
    UnknownTokenError,
)
from safeshift.gateway._http import HTTPError
from safeshift.gateway.auth import principal_of
from safeshift.gateway.bodies import load_json
from safeshift.gateway.runtime import Gateway
from safeshift.gateway.schemas import ErrorBody
from safeshift.plan import Plan
from safeshift.state import Phase

T = TypeVar("T")
_ATTRIBUTE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_ACTIONS = {str(a): a for a in ops.ACTION_ROLES}
_COMMON: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no valid token"},
    403: {"model": ErrorBody, "description": "the token's role does not allow it"},
}
_ROLLOUT = {**_COMMON, 404: {"model": ErrorBody, "description": "no such rollout"}}
_REASON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["reason"], "additionalProperties": False,
    "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 2000,
                              "pattern": r"\S", "description": "why (in the audit log)"}}}}}}}
_TOKEN_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["name", "role"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"},
        "role": {"enum": ["client", "viewer", "operator", "approver", "admin"]},
        "expires": {"type": ["string", "null"], "description": "e.g. 30d, 12h; none: never"},
        "attributes": {"type": "array", "maxItems": 32, "items": {
            "type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
            "description": "targeting attributes this client may assert"},
        "labels": {"type": "boolean", "description": "its labels and outcomes count"},
        "reviews": {"type": "array", "maxItems": 16, "items": {
            "type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
            "description": "review roles it may sign off (privacy, product, ...)"},
    }}}}}}
_PLAN_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "a plan (see safeshift schema)"}}}}}


def _error(exc: Exception) -> HTTPError:
    """The HTTP answer to an operation's error."""
    if isinstance(exc, AuthError):
        return HTTPError(exc.status, str(exc))
    if isinstance(exc, UnknownRolloutError | UnknownTokenError):
        return HTTPError(404, str(exc))
    if isinstance(exc, InvalidTransitionError):
        return HTTPError(409, str(exc))
    return HTTPError(422, str(exc))


def build_control(gw: Gateway, api: FastAPI) -> None:
    """Add the control routes to ``api``."""
    router = APIRouter(prefix="/v1", tags=["control"])

    async def run(request: Request, fn: Callable[[Principal], T]) -> T:
        principal = principal_of(request.scope)
        try:
            return await asyncio.to_thread(fn, principal)
        except AuthError as exc:
            gw.denials.record(request.scope, exc.status, str(exc), principal.name)
            raise _error(exc) from None
        except SafeshiftError as exc:
            raise _error(exc) from None

    def read(principal: Principal, what: str) -> None:
        ops.require(principal, ops.READ_ROLE, what)

    async def body_of(request: Request, expected: str, fields: tuple[str, ...]
                      ) -> dict[str, Any]:
        doc = load_json(await request.body(), expected)
        if not isinstance(doc, dict):
            raise HTTPError(422, f"send a JSON object: {expected}", field="body")
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise HTTPError(422, f"unknown field {unknown[0][:40]!r}; the fields are "
                                 f"{', '.join(fields)}", field=unknown[0][:40])
        return doc

    @router.get("/rollouts", summary="List rollouts", responses=_COMMON)
    async def list_rollouts(request: Request, phase: Phase | None = Query(None)) -> Any:
        def fn(p: Principal) -> Any:
            read(p, "listing rollouts")
            names = [s.name for s in ops.list_rollouts(gw.store, phase=phase)]
            return [s.to_json() for s in ops.statuses(gw.store, gw.clock, names)]
        return await run(request, fn)

    @router.post("/rollouts", summary="Create a rollout", status_code=201,
                 responses={**_COMMON, 409: {"model": ErrorBody, "description":
                                             "the name is taken by another plan"},
                            422: {"description": "the plan's problems, each with its field",
                                  "content": {"application/json": {"schema": {
                                      "type": "object", "properties": {
                                          "error": {"type": "string"},
                                          "problems": {"type": "array"}}}}}}},
                 openapi_extra=_PLAN_BODY)
    async def create(request: Request, start: bool = Query(True)) -> Any:
        body = await request.body()
        load_json(body, "a plan as a JSON object")  # strict JSON: NaN, depth, huge numbers
        try:
            plan = Plan.from_json_text(body.decode("utf-8", "replace"), source="plan")
        except PlanValidationError as exc:
            return JSONResponse({"error": f"the plan has {len(exc.problems)} problem(s)",
                                 "problems": [{"field": pr.path, "message": pr.message}
                                              for pr in exc.problems]}, 422)
        except PlanError as exc:
            raise HTTPError(422, str(exc), field="body") from None

        def fn(p: Principal) -> Any:
            try:
                state = ops.create(gw.store, plan, gw.clock, start=start, principal=p)
            except SafeshiftError as exc:
                if "already exists" in str(exc):
                    raise HTTPError(409, str(exc)) from None
                raise
            return ops.status(gw.store, plan, gw.clock).to_json() | {"version": state.version}
        return JSONResponse(await run(request, fn), 201)

    @router.get("/rollouts/{name}", summary="Rollout status", responses=_ROLLOUT)
    async def status(request: Request, name: str) -> Any:
        def fn(p: Principal) -> Any:
            read(p, f"the status of rollout {name!r}")
            return ops.status(gw.store, name, gw.clock).to_json()
        return await run(request, fn)

    @router.get("/rollouts/{name}/history", summary="Rollout decisions", responses=_ROLLOUT)
    async def history(request: Request, name: str) -> Any:
        def fn(p: Principal) -> Any:
            read(p, f"the history of rollout {name!r}")
            return [d.to_json() for d in ops.history(gw.store, name)]
        return await run(request, fn)

    @router.get("/rollouts/{name}/notes", summary="Rollout release notes (Markdown)",
                responses=_ROLLOUT)
    async def notes(request: Request, name: str) -> Any:
        def fn(p: Principal) -> Any:
            read(p, f"the release notes of rollout {name!r}")
            return {"rollout": name, "markdown": ops.release_notes(gw.store, name)}
        return await run(request, fn)

    @router.get("/rollouts/{name}/audit", summary="Rollout audit log", responses=_ROLLOUT)
    async def audit(request: Request, name: str) -> Any:
        def fn(p: Principal) -> Any:
            read(p, f"the audit log of rollout {name!r}")
            events = ops.audit_events(gw.store, name)
            report = ops.verify_audit(gw.store, name)
            return {"verified": report.ok, "message": report.message,
                    "events": [{"seq": e.seq, "at": e.at, "actor": e.actor, "action": e.action,
                                "detail": e.detail, "prev_hash": e.prev_hash, "hash": e.hash}
                               for e in events]}
        return await run(request, fn)

    @router.post("/rollouts/{name}/reviews/{review}", summary="Sign off a review",
                 responses={**_ROLLOUT, 409: {"model": ErrorBody, "description":
                                              "no stage awaits this review"},
                            422: {"model": ErrorBody, "description": "no reason given"}},
                 openapi_extra=_REASON_BODY)
    async def sign_review(request: Request, name: str, review: str) -> Any:
        doc = await body_of(request, '{"reason": "why"}', ("reason",))
        reason = doc.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
            raise HTTPError(422, "give a reason (at most 2000 characters): it is recorded in "
                                 "the audit log", field="reason")

        def fn(p: Principal) -> Any:
            decision = ops.review(gw.store, name, review, gw.clock, reason=reason, principal=p)
            gw.refresh(name)
            return decision.to_json()
        return await run(request, fn)

    @router.post("/rollouts/{name}/{action}", summary="Act on a rollout",
                 responses={**_ROLLOUT, 409: {"model": ErrorBody, "description":
                                              "the action does not fit the rollout's phase"},
                            422: {"model": ErrorBody, "description": "no reason given"}},
                 openapi_extra=_REASON_BODY)
    async def act(request: Request, name: str, action: str) -> Any:
        chosen = _ACTIONS.get(action)
        if chosen is None:
            raise HTTPError(404, f"no action {action[:40]!r}; actions are "
                                 f"{', '.join(_ACTIONS)}")
        doc = await body_of(request, '{"reason": "why"}', ("reason",))
        reason = doc.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise HTTPError(422, "give a reason: it is recorded in the audit log",
                            field="reason")
        if len(reason) > 2000:
            raise HTTPError(422, "reason longer than 2000 characters", field="reason")

        def fn(p: Principal) -> Any:
            decision = ops.act(gw.store, name, chosen, gw.clock, reason=reason, principal=p)
            gw.refresh(name)
            return decision.to_json()
        return await run(request, fn)

    @router.get("/tokens", summary="List tokens", responses=_COMMON)
    async def tokens(request: Request) -> Any:
        return await run(request, lambda p: [t.to_json() for t in ops.list_tokens(
            gw.store, principal=p)])

    @router.post("/tokens", summary="Create a token", status_code=201, responses={
        **_COMMON, 422: {"model": ErrorBody, "description": "bad name, role or expiry"}},
        openapi_extra=_TOKEN_BODY)
    async def create_token(request: Request) -> Any:
        doc = await body_of(request, '{"name": "alice", "role": "viewer", "expires": "30d"}',
                            ("name", "role", "expires", "attributes", "labels", "reviews"))
        name, role, expires = doc.get("name"), doc.get("role"), doc.get("expires")
        attributes = doc.get("attributes", [])
        reviews = doc.get("reviews", [])
        if (not isinstance(reviews, list) or len(reviews) > 16
                or not all(isinstance(r, str) and _ATTRIBUTE.fullmatch(r) for r in reviews)):
            raise HTTPError(422, "reviews must be a list of at most 16 review roles (letters, "
                                 "digits, _ . -)", field="reviews")
        labels = doc.get("labels", False)
        if not isinstance(labels, bool):
            raise HTTPError(422, "labels must be true or false", field="labels")
        if (not isinstance(attributes, list) or len(attributes) > 32
                or not all(isinstance(a, str) and _ATTRIBUTE.fullmatch(a) for a in attributes)):
            raise HTTPError(422, "attributes must be a list of at most 32 attribute names "
                                 "(letters, digits, _ . -)", field="attributes")
        if not isinstance(name, str) or not isinstance(role, str):
            raise HTTPError(422, "give the token's name and role as strings", field="name")
        try:
            parsed_role = parse_role(role)
            expires_in = None if expires is None else parse_duration(expires)
        except (SafeshiftError, ValueError) as exc:
            raise HTTPError(422, str(exc), field="expires" if "role" not in str(exc)
                            else "role") from None

        def fn(p: Principal) -> Any:
            token, record = ops.create_token(
                gw.store, gw.clock, name=name, role=parsed_role, expires_in=expires_in,
                principal=p, rights={**({"attributes": sorted(set(attributes))}
                                        if attributes else {}),
                                     **({"labels": True} if labels else {}),
                                     **({"reviews": sorted(set(reviews))} if reviews else {})})
            return {"token": token, **record.to_json()}
        return JSONResponse(await run(request, fn), 201)

    @router.delete("/tokens/{token_id}", summary="Revoke a token",
                   responses={**_COMMON, 404: {"model": ErrorBody, "description":
                                               "no such token"}})
    async def revoke_token(request: Request, token_id: str) -> Any:
        return await run(request, lambda p: ops.revoke_token(
            gw.store, gw.clock, token_id, principal=p).to_json())

    @router.get("/denials", summary="Refused requests", responses=_COMMON)
    async def denials(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> Any:
        await asyncio.to_thread(gw.flush_denials)
        return await run(request, lambda p: [d.to_json() for d in ops.denials(
            gw.store, limit=limit, principal=p)])

    api.include_router(router)

