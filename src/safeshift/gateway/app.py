"""The gateway's ASGI application: :func:`create_app`.

Layers, outermost first: request id + JSON access log → body limit → authentication (a bearer
token and the route's role, :mod:`safeshift.gateway.auth`) → rate limit per principal (when
set) → a dispatcher that sends ``POST /v1/endpoints/{name}/predict``, ``POST /v2/models/{name}/infer``
and ``POST /v2/models/{name}/versions/{version}/infer`` straight to their handlers (no router
or dependency resolution on the hot path) and everything else to the FastAPI app of
:mod:`safeshift.gateway.routes`, which declares the same routes with the same handlers, so
they are documented in ``/openapi.json`` and still work when the fast path is off
(``fast_path=False``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from safeshift.assign import BASELINE
from safeshift.auth import Authenticator
from safeshift.clock import Clock, SystemClock
from safeshift.dashboard.web import DashboardContext, build_dashboard
from safeshift.errors import ModelLoadError, PlanError, RolloutError
from safeshift.gateway import handlers
from safeshift.gateway._http import (
    BodyTooLarge,
    HTTPError,
    Receive,
    Scope,
    Send,
    read_body,
    send_bytes,
    send_json,
)
from safeshift.gateway.auth import AuthMiddleware
from safeshift.gateway.body_limit import BodyLimitMiddleware
from safeshift.gateway.logs import gateway_logger
from safeshift.gateway.metrics import GatewayMetrics
from safeshift.gateway.rate_limit import RateLimitMiddleware
from safeshift.gateway.request_id import RequestIdMiddleware
from safeshift.gateway.routes import build_api, internal_error
from safeshift.gateway.runtime import Gateway
from safeshift.gateway.settings import GatewaySettings
from safeshift.models import ModelBackend
from safeshift.plan import Plan
from safeshift.rollout import Rollout
from safeshift.state import Phase
from safeshift.store import Store, open_store

Handler = Callable[[Gateway, str, bytes, Scope], Awaitable[handlers.Reply]]
_PREDICT = ("/v1/endpoints/", "/predict")
_INFER = ("/v2/models/", "/infer")
_VERSIONS = "/versions/"


class GatewayApp:
    """The ASGI app :func:`create_app` returns. ``gateway`` holds the endpoints, rollouts,
    metrics and background tasks (useful in tests); ``api`` is the FastAPI part."""

    def __init__(self, gateway: Gateway, api: FastAPI, settings: GatewaySettings, *,
                 fast_path: bool = True) -> None:
        self.gateway = gateway
        self.api = api
        self.settings = settings
        self.fast_path = fast_path
        app: Any = self._dispatch
        if settings.rate_limit is not None:
            app = RateLimitMiddleware(app, rate=settings.rate_limit, burst=settings.rate_burst,
                                      max_clients=settings.rate_limit_clients)
        self.authenticator = Authenticator(gateway.store) if settings.auth else None
        api.include_router(build_dashboard(DashboardContext(
            gateway.store, gateway.clock, self.authenticator,
            lambda request, status, reason, who: gateway.denials.record(
                request.scope, status, reason, who))))
        app = AuthMiddleware(app, authenticator=self.authenticator, denials=gateway.denials)
        app = BodyLimitMiddleware(app, max_bytes=settings.max_body_bytes)
        self._app = RequestIdMiddleware(app, access_log=settings.access_log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path and scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            for (prefix, suffix), handler, route in ((_PREDICT, handlers.predict, "predict"),
                                                     (_INFER, handlers.infer, "infer")):
                if path.startswith(prefix) and path.endswith(suffix):
                    name = path[len(prefix):-len(suffix)]
                    if name and "/" not in name:
                        await self._fast(handler, route, name, scope, receive, send)
                        return
                    if route == "infer":
                        pinned = _pinned(name)
                        if pinned is not None:
                            await self._fast(pinned, "infer_version", name, scope, receive, send)
                            return
        await self.api(scope, receive, send)

    async def _fast(self, handler: Handler, route: str, name: str, scope: Scope,
                    receive: Receive, send: Send) -> None:
        try:
            body = await read_body(receive)
            reply = await handler(self.gateway, name, body, scope)
        except HTTPError as exc:
            self.gateway.metrics.error(route, exc.status)
            await send_json(send, exc.status, exc.body(), headers=exc.headers)
            return
        except BodyTooLarge:
            raise
        except Exception:
            self.gateway.metrics.error(route, 500)
            gateway_logger.exception("unhandled error", extra={"route": route})
            await send_json(send, 500, internal_error(scope))
            return
        await send_bytes(send, reply.status, reply.body, content_type=reply.content_type,
                         headers=reply.headers)


def _pinned(name: str) -> Handler | None:
    """The handler for ``{name}/versions/{version}`` (the middle of a versioned infer path)."""
    model, sep, version = name.partition(_VERSIONS)
    if not sep or not model or not version or "/" in model or "/" in version:
        return None

    async def handler(gw: Gateway, _: str, body: bytes, scope: Scope) -> handlers.Reply:
        return await handlers.infer_version(gw, model, version, body, scope)

    return handler


# -- construction --------------------------------------------------------------------------


def create_app(
    plans: Sequence[Plan | Path | str],
    *,
    store: Store | str | Path | None = None,
    clock: Clock | None = None,
    controller: bool = True,
    tick_interval: float = 1.0,
    models: Mapping[str, Mapping[str, ModelBackend]] | None = None,
    settings: GatewaySettings | None = None,
    fast_path: bool = True,
    **overrides: Any,
) -> GatewayApp:
    """The gateway for ``plans``: one rollout a plan, one endpoint a rollout.

    ``store`` is a store or its URL (default ``./safeshift.db``); ``models`` overrides
    backends per endpoint and arm (tests); ``settings`` and keyword ``overrides`` (any
    :class:`GatewaySettings` field) set per-process limits. Models are loaded now, so a bad
    reference fails here with a message that names the rollout and the arm. With
    ``controller`` the app ticks every rollout every ``tick_interval`` seconds (and starts
    pending ones); without, it only serves, flushes telemetry and follows the store."""
    settings = (settings or GatewaySettings()).with_overrides(overrides)
    gateway = build_gateway(plans, store=store, clock=clock, controller=controller,
                            tick_interval=tick_interval, models=models, settings=settings)
    return GatewayApp(gateway, build_api(gateway), settings, fast_path=fast_path)


def build_gateway(
    plans: Sequence[Plan | Path | str],
    *,
    store: Store | str | Path | None,
    clock: Clock | None,
    controller: bool,
    tick_interval: float,
    models: Mapping[str, Mapping[str, ModelBackend]] | None,
    settings: GatewaySettings,
) -> Gateway:
    """The running state behind :func:`create_app` without its HTTP layer: the rollouts
    registered (pending ones started with ``controller``), their models loaded, endpoints and
    background tasks ready for :meth:`Gateway.start`. The in-process SDK
    (:mod:`safeshift.integrations.starlette`) builds the same one."""
    if tick_interval <= 0:
        raise ValueError("tick_interval must be positive")
    if not plans:
        raise PlanError("give at least one plan to serve")
    loaded = [p if isinstance(p, Plan) else Plan.load(p) for p in plans]
    seen: dict[str, int] = {}
    for i, plan in enumerate(loaded):
        if plan.rollout in seen:
            raise PlanError(f"plans {seen[plan.rollout] + 1} and {i + 1} are both rollout "
                            f"{plan.rollout!r}; give each plan once")
        seen[plan.rollout] = i
    owns_store = store is None or isinstance(store, str | Path)
    st: Store = open_store(store) if store is None or isinstance(store, str | Path) else store
    clock = clock or SystemClock()
    try:
        rollouts = [Rollout.from_plan(p, store=st, clock=clock,
                                      models=(models or {}).get(p.endpoint), start=False)
                    for p in loaded]
        chosen = _one_per_endpoint(rollouts)
        for rollout in chosen:
            if controller and rollout.state().phase is Phase.PENDING:
                rollout.tick()
            _load_models(rollout)
    except BaseException:
        if owns_store:
            st.close()
        raise
    metrics = GatewayMetrics()
    return Gateway(chosen, st, settings=settings, metrics=metrics, controller=controller,
                   tick_interval=tick_interval, owns_store=owns_store)


def _one_per_endpoint(rollouts: Sequence[Rollout]) -> list[Rollout]:
    groups: dict[str, list[Rollout]] = defaultdict(list)
    for r in rollouts:
        groups[r.plan.endpoint].append(r)
    chosen = []
    for endpoint, group in groups.items():
        if len(group) == 1:
            chosen.append(group[0])
            continue
        active = [r for r in group if not r.state().phase.terminal]
        if len(active) != 1:
            names = ", ".join(repr(r.plan.rollout) for r in (active or group))
            what = "active" if active else "finished (none active)"
            raise RolloutError(f"endpoint {endpoint!r} has {len(active or group)} {what} "
                               f"rollouts: {names}; serve one plan per endpoint (finish or "
                               "roll back the others first)")
        chosen.append(active[0])
    return chosen


def _load_models(rollout: Rollout) -> None:
    plan = rollout.plan
    for arm in (BASELINE, *plan.variants):
        try:
            rollout.model(arm)
        except ModelLoadError as exc:
            raise ModelLoadError(f"rollout {plan.rollout!r} (endpoint {plan.endpoint!r}): "
                                 f"cannot load the {arm} model {plan.variant(arm).model!r}: "
                                 f"{exc}") from None


__all__ = ["GatewayApp", "build_gateway", "create_app"]
