"""Authentication on every route: the gateway's outermost decision after the body limit.

Each request needs a bearer token (``Authorization: Bearer ss_…``) except health probes,
``/metrics`` and the API's own description. Which role a route needs (:func:`required_role`):

- predictions, inference, feedback and reports: the data-plane *client* role;
- ``/v1/rollouts``, ``/v1/tokens``, ``/v1/denials``: a control role, viewer at least here, the
  exact one checked by the operation (:mod:`safeshift.ops`), so every front end applies one
  rule;
- anything else (model metadata, unknown paths): any valid token, so that routes cannot be
  discovered without one.

A refusal changes nothing, answers 401 or 403 with a JSON body that says why, is counted in
``safeshift_auth_denied_total`` and logged, and is written (in batches, with the telemetry
flush) to the store's denial log (``safeshift token denials``). With authentication off
(``serve --no-auth``, loopback only) every request acts as the admin ``anonymous``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Final

from safeshift._units import client_address
from safeshift.auth import Authenticator, AuthError, Denial, Principal, Role, allows
from safeshift.gateway._http import ASGIApp, HTTPError, Receive, Scope, Send, send_error
from safeshift.gateway.logs import gateway_logger
from safeshift.gateway.metrics import GatewayMetrics

__all__ = ["ANONYMOUS", "ANY", "DASHBOARD", "OPEN", "AuthMiddleware", "DenialLog",
           "principal_of", "required_role"]

ANONYMOUS = Principal("anonymous", Role.ADMIN)
"""Who every request is when authentication is off."""

OPEN: Final = "open"
ANY: Final = "any"
DASHBOARD: Final = "dashboard"
"""The dashboard's pages: the principal comes from the sign-in cookie (or none, and the page
sends the browser to sign in) and each page checks the role it needs."""
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live",
                         "/v2/health/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
_CONTROL = ("/v1/rollouts", "/v1/tokens", "/v1/denials", "/v1/drills")
_DASHBOARD_OPEN = ("/ui/static/", "/ui/login", "/favicon.ico")
_SCOPE_KEY = "safeshift.principal"


def required_role(method: str, path: str) -> Role | str:
    """:data:`OPEN`, :data:`ANY` (any valid token) or the role the route needs at least."""
    if path in _OPEN_PATHS or path.startswith(_DASHBOARD_OPEN):
        return OPEN
    if path == "/" or path.startswith("/ui/"):
        return DASHBOARD
    if method == "POST" and (path in ("/v1/feedback", "/v1/reports")
                             or (path.startswith("/v1/endpoints/") and path.endswith("/predict"))
                             or (path.startswith("/v2/models/") and path.endswith("/infer"))):
        return Role.CLIENT
    if path.startswith(_CONTROL):
        return Role.VIEWER
    return ANY


def principal_of(scope: Scope) -> Principal:
    """The authenticated principal of a request (set by :class:`AuthMiddleware`)."""
    principal = scope.get(_SCOPE_KEY)
    if not isinstance(principal, Principal):
        raise HTTPError(401, "not authenticated: send Authorization: Bearer <token>")
    return principal


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return (client_address(str(client[0])) or "-") if client else "unknown"


class DenialLog:
    """Refusals waiting to be written to the store, at most ``capacity`` between flushes
    (beyond, they are counted as dropped: a flood of bad tokens cannot fill the store)."""

    def __init__(self, metrics: GatewayMetrics, *, capacity: int = 1000) -> None:
        self.metrics = metrics
        self.capacity = capacity
        self._pending: deque[Denial] = deque()

    def record(self, scope: Scope, status: int, reason: str, principal: str = "-") -> None:
        self.metrics.auth_denied.labels(str(status)).inc()
        denial = Denial(time.time(), status, str(scope.get("method", "")),
                        str(scope.get("path", ""))[:512], principal, _peer(scope), reason[:512])
        gateway_logger.warning("request refused", extra=denial.to_json())
        if len(self._pending) >= self.capacity:
            self.metrics.denials_dropped.inc()
            return
        self._pending.append(denial)

    def drain(self) -> list[Denial]:
        """Take every pending refusal (safe while the event loop records more)."""
        out = []
        while self._pending:
            try:
                out.append(self._pending.popleft())
            except IndexError:
                break
        return out


class AuthMiddleware:
    """Authenticates every request but the open ones and refuses those whose token or role
    does not fit the route; the principal goes in the ASGI scope for the handlers."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator | None,
                 denials: DenialLog) -> None:
        self.app = app
        self.authenticator = authenticator
        self.denials = denials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        need = required_role(scope["method"], scope["path"])
        if need == OPEN:
            await self.app(scope, receive, send)
            return
        if self.authenticator is None:
            scope[_SCOPE_KEY] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        if need == DASHBOARD:
            await self._dashboard(scope, receive, send)
            return
        try:
            principal = await self._authenticate(scope)
        except AuthError as exc:
            self.denials.record(scope, exc.status, str(exc))
            await send_error(send, HTTPError(exc.status, str(exc),
                                             headers=[(b"www-authenticate", b"Bearer")]))
            return
        if isinstance(need, Role) and not allows(principal.role, need):
            what = ("sending traffic, feedback or reports" if need is Role.CLIENT
                    else "the control API")
            message = (f"{what} needs the {need} role; {principal.name} holds {principal.role}: "
                       "use a token with that role")
            self.denials.record(scope, 403, message, principal.name)
            await send_error(send, HTTPError(403, message))
            return
        scope[_SCOPE_KEY] = principal
        await self.app(scope, receive, send)

    async def _dashboard(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A dashboard page: the principal of the sign-in cookie, if it is valid."""
        from safeshift.dashboard.web import session_token

        assert self.authenticator is not None
        cookie = None
        for key, raw in scope["headers"]:
            if key == b"cookie":
                cookie = bytes(raw).decode("latin-1")
                break
        token = session_token(cookie)
        if token:
            try:
                principal = self.authenticator.cached(token)
                if principal is None:
                    principal = await asyncio.to_thread(self.authenticator.authenticate, token)
                scope[_SCOPE_KEY] = principal
            except AuthError as exc:
                self.denials.record(scope, exc.status, f"dashboard session: {exc}")
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> Principal:
        assert self.authenticator is not None
        value = None
        for key, raw in scope["headers"]:
            if key == b"authorization":
                value = bytes(raw).decode("latin-1")
                break
        if not value:
            raise AuthError(401, "missing token: send Authorization: Bearer <token> (an admin "
                                 "creates one with safeshift token create)")
        kind, _, token = value.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
        token = token.strip()
        principal = self.authenticator.cached(token)
        if principal is None:
            principal = await asyncio.to_thread(self.authenticator.authenticate, token)
        return principal
