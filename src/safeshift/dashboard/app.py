"""``safeshift dashboard``: the dashboard over a store, without serving any model.

The same routes as at ``/`` of ``safeshift serve`` (:mod:`safeshift.dashboard.web`), behind the
same layers: request ids and the JSON access log, the body limit, and authentication (tokens
from the store; refusals go to the store's denial log once a second)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from safeshift.auth import Authenticator
from safeshift.clock import Clock, SystemClock
from safeshift.dashboard.web import DashboardContext, build_dashboard
from safeshift.gateway.auth import AuthMiddleware, DenialLog
from safeshift.gateway.body_limit import BodyLimitMiddleware
from safeshift.gateway.metrics import GatewayMetrics
from safeshift.gateway.request_id import RequestIdMiddleware
from safeshift.store.base import Store

__all__ = ["create_dashboard_app"]


def create_dashboard_app(store: Store, *, clock: Clock | None = None, auth: bool = True,
                         access_log: bool = True) -> Any:
    """The dashboard as an ASGI app over ``store`` (which the caller closes)."""
    clock = clock or SystemClock()
    denials = DenialLog(GatewayMetrics())
    authenticator = Authenticator(store) if auth else None

    async def flush_denials() -> None:
        while True:
            await asyncio.sleep(1.0)
            pending = denials.drain()
            if pending:
                with contextlib.suppress(Exception):  # the log is best effort, as in serve
                    await asyncio.to_thread(store.add_denials, pending)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(flush_denials())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pending = denials.drain()
            if pending:
                with contextlib.suppress(Exception):
                    store.add_denials(pending)

    api = FastAPI(title="safeshift dashboard", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    api.include_router(build_dashboard(DashboardContext(
        store, clock, authenticator,
        lambda request, status, reason, who: denials.record(request.scope, status, reason, who))))

    @api.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app: Any = AuthMiddleware(api, authenticator=authenticator, denials=denials)
    app = BodyLimitMiddleware(app, max_bytes=65_536)
    return RequestIdMiddleware(app, access_log=access_log)
