"""The dashboard's routes: pages rendered on the server from :mod:`safeshift.view`, live
updates by polling, and the operator actions — every one a call of :mod:`safeshift.ops`, which
checks the caller's role, so the dashboard can do nothing the control API could not.

==========================================  ========  ============================================
route                                       who       what
==========================================  ========  ============================================
``GET /``                                   viewer    the rollouts (``?phase=`` filters)
``GET|POST /ui/login``, ``POST /ui/logout`` anyone    sign in with a token (form body → HTTP-only,
                                                      same-site cookie), sign out
``GET /ui/rollouts/{name}``                 viewer    the rollout page
``GET /ui/rollouts/{name}/live``            viewer    the page's body when it changed (polling)
``POST /ui/rollouts/{name}/act``            operator, approve, pause, resume, rollback,
                                            approver  promote, with a reason and a confirmation
``GET /ui/rollouts/{name}/decisions/{seq}`` viewer    the decision re-derived (``?what_if=``)
``GET /ui/rollouts/{name}/report``          viewer    the report (``?format=html|md|json``)
``GET /ui/static/{file}``                   anyone    the stylesheet and the script
==========================================  ========  ============================================

Signing in: the token travels once, in a form body, and then in a cookie that scripts cannot
read (``HttpOnly``), that other sites cannot send (``SameSite=Strict``) and that is ``Secure``
behind HTTPS; it never appears in a URL, so it is in no access log. Actions also need the
page's anti-forgery field (an HMAC of the session) and, when the browser sends one, an
``Origin`` of this host. A refusal answers 403 with a page (or JSON) that says which role the
action needs, and is written to the denial log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any, TypeVar
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from markupsafe import Markup

from safeshift import ops
from safeshift.auth import Authenticator, AuthError, Principal, Role, allows
from safeshift.clock import Clock
from safeshift.dashboard.render import charts_for, render, static_text
from safeshift.errors import InvalidTransitionError, SafeshiftError, UnknownRolloutError
from safeshift.state import Action, Phase
from safeshift.store.base import Store
from safeshift.view import GRID_CLASSES, list_view, rollout_view

__all__ = ["COOKIE", "DashboardContext", "build_dashboard", "session_token"]

T = TypeVar("T")

COOKIE = "safeshift_session"
SESSION_SECONDS = 12 * 3600
REVEAL_ROLE = Role.OPERATOR
"""Who may find a personal segment value by supplying it (viewers see pseudonyms only)."""
REFRESH_SECONDS = 5.0
"""A page whose rollout has not changed is still re-rendered this often (its numbers move)."""
_MAX_FORM_BYTES = 16_384
_STATIC = {"dashboard.css": "text/css; charset=utf-8",
           "dashboard.js": "text/javascript; charset=utf-8"}
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_ACTIONS: dict[Action, tuple[str, str]] = {
    Action.APPROVE: ("Approve", "the next stage starts (its traffic goes to the candidate)"),
    Action.PAUSE: ("Pause", "the split stays as it is and no decision is taken until resumed"),
    Action.RESUME: ("Resume", "the controller judges and decides again"),
    Action.ROLLBACK: ("Roll back", "every user gets the baseline again, at once; this ends the "
                                   "rollout"),
    Action.PROMOTE: ("Promote", "the candidate serves everyone without further evidence"),
}


@dataclass(slots=True)
class DashboardContext:
    """What the dashboard reads and who may sign in (``authenticator`` None: no sign-in, every
    request acts as the principal the auth layer set, e.g. ``anonymous`` with auth off)."""

    store: Store
    clock: Clock
    authenticator: Authenticator | None
    record_denial: Callable[[Request, int, str, str], None] = lambda *_: None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))


def session_token(cookie_header: str | None) -> str | None:
    """The token in a request's session cookie, if any."""
    if not cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except Exception:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def _phase_actions(phase: Phase) -> list[Action]:
    if phase.terminal:
        return []
    out = [Action.APPROVE] if phase is Phase.AWAITING_APPROVAL else []
    out.append(Action.RESUME if phase is Phase.PAUSED else Action.PAUSE)
    if phase is not Phase.PENDING:
        out += [Action.ROLLBACK, Action.PROMOTE]
    return out


def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status, headers={**_SECURITY_HEADERS, **(headers or {})})


def build_dashboard(ctx: DashboardContext) -> APIRouter:
    """The dashboard's routes (not in the OpenAPI document: they answer HTML)."""
    router = APIRouter(include_in_schema=False)

    def principal(request: Request) -> Principal | None:
        p = request.scope.get("safeshift.principal")
        return p if isinstance(p, Principal) else None

    def csrf(request: Request) -> str:
        token = session_token(request.headers.get("cookie")) or "anonymous"
        return hmac.new(ctx.secret, token.encode(), hashlib.sha256).hexdigest()[:32]

    def page_context(request: Request, p: Principal | None) -> dict[str, Any]:
        return {"principal": p, "signed_in": session_token(request.headers.get("cookie")) is not None,
                "csrf": csrf(request), "inline_assets": False, "classes": GRID_CLASSES}

    def to_login() -> Response:
        return RedirectResponse("/ui/login", status_code=303, headers={"cache-control": "no-store"})

    async def run(fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    def reader(request: Request) -> Principal | Response:
        """The signed-in principal if it may read rollouts, else the answer to send."""
        p = principal(request)
        if p is None:
            return to_login()
        if not allows(p.role, ops.READ_ROLE):
            return message(request, p, 403, "Not allowed", f"reading rollouts needs the viewer "
                           f"role; {p.name} holds {p.role}: ask an admin for a viewer token")
        return p

    def message(request: Request, p: Principal | None, status: int, heading: str, text: str, *,
                hint: str | None = None, back: str | None = None) -> Response:
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"error": text}, status_code=status, headers=_SECURITY_HEADERS)
        return _html(render("message.html", heading=heading, message=text, hint=hint, back=back,
                            error=status >= 400, **page_context(request, p)), status)

    def rollout_body(request: Request, p: Principal, view: dict[str, Any], *,
                     revealed: dict[str, str] | None = None, reveal_note: str | None = None) -> str:
        phase = Phase(view["phase"])
        actions = []
        for action in _phase_actions(phase):
            need = ops.ACTION_ROLES[action]
            if action is Action.APPROVE and view.get("approval"):
                if view["approval"]["role"] is None:
                    continue  # reviews only: no approval to give
                need = Role(view["approval"]["role"])
            if allows(p.role, need):
                label, confirm = _ACTIONS[action]
                actions.append({"name": str(action), "label": label, "confirm": confirm})
        approval = view.get("approval") or {}
        if phase is Phase.AWAITING_APPROVAL:
            for r in approval.get("reviews", []):
                if not r["signed_by"] and p.may_review(r["role"]):
                    actions.insert(0, {"name": "review", "review": r["role"],
                                       "label": f"Sign off the {r['role']} review",
                                       "confirm": f"you reviewed stage {approval['stage']!r} as "
                                                  f"{r['role']}" + (f" ({r['note']})"
                                                                    if r.get("note") else "")})
        return render("_rollout.html", v=view, charts=charts_for(view), actions=actions,
                      report=False, may_reveal=allows(p.role, REVEAL_ROLE), revealed=revealed,
                      reveal_note=reveal_note, **page_context(request, p))

    # -- sign-in --------------------------------------------------------------------------

    @router.get("/ui/login")
    async def login_page(request: Request) -> Response:
        if ctx.authenticator is None:
            return RedirectResponse("/", status_code=303)
        return _html(render("login.html", error=None, **page_context(request, None)))

    @router.post("/ui/login")
    async def login(request: Request) -> Response:
        if ctx.authenticator is None:
            return RedirectResponse("/", status_code=303)
        form = await _form(request)
        token = (form.get("token") or "").strip()
        try:
            await run(lambda: _authenticate(ctx.authenticator, token))  # refuses a bad token
        except AuthError as exc:
            ctx.record_denial(request, 401, f"dashboard sign-in: {exc}", "-")
            return _html(render("login.html", error=f"Sign-in refused: {exc}",
                                **page_context(request, None)), 401)
        response = RedirectResponse("/", status_code=303, headers={"cache-control": "no-store"})
        response.set_cookie(COOKIE, token, max_age=SESSION_SECONDS, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")
        return response

    @router.post("/ui/logout")
    async def logout(request: Request) -> Response:
        response = RedirectResponse("/ui/login" if ctx.authenticator else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages ------------------------------------------------------------------------------

    def phase_of(value: str | None) -> Phase | None:
        if not value:
            return None
        try:
            return Phase(value)
        except ValueError:
            return None

    def list_html(phase: Phase | None) -> tuple[list[dict[str, Any]], str, str]:
        rows = list_view(ctx.store, ctx.clock, phase=phase)
        html = render("_list.html", rows=rows, phase=str(phase) if phase else "")
        return rows, html, hashlib.sha256(html.encode()).hexdigest()[:16]

    @router.get("/")
    async def index(request: Request) -> Response:
        p = reader(request)
        if isinstance(p, Response):
            return p
        phase = phase_of(request.query_params.get("phase"))
        rows, _, version = await run(lambda: list_html(phase))
        return _html(render("list.html", phases=[str(x) for x in Phase],
                            phase=str(phase) if phase else "", version=version,
                            rendered=ctx.clock.now(), rows=rows, **page_context(request, p)))

    @router.get("/ui/live")
    async def list_live(request: Request) -> Response:
        p = principal(request)
        if p is None or not allows(p.role, ops.READ_ROLE):
            return JSONResponse({"error": "sign in again"}, status_code=401)
        _, html, version = await run(
            lambda: list_html(phase_of(request.query_params.get("phase"))))
        if version == request.query_params.get("version"):
            return Response(status_code=204)
        return JSONResponse({"html": html, "version": version, "rendered": ctx.clock.now()},
                            headers=_SECURITY_HEADERS)

    def view_of(name: str) -> dict[str, Any]:
        return rollout_view(ctx.store, name, ctx.clock)

    async def rollout_or_404(request: Request, p: Principal, name: str) -> dict[str, Any] | Response:
        try:
            return await run(lambda: view_of(name))
        except UnknownRolloutError as exc:
            return message(request, p, 404, "No such rollout", str(exc), back="/")

    @router.get("/ui/rollouts/{name}")
    async def rollout_page(request: Request, name: str) -> Response:
        p = reader(request)
        if isinstance(p, Response):
            return p
        view = await rollout_or_404(request, p, name)
        if isinstance(view, Response):
            return view
        notice = _notice(view, request.query_params.get("done"))
        return _html(render("rollout.html", v=view, body=Markup(rollout_body(request, p, view)),
                            version=_version(view), rendered=view["generated_at"], notice=notice,
                            **page_context(request, p)))

    @router.get("/ui/rollouts/{name}/live")
    async def rollout_live(request: Request, name: str) -> Response:
        p = principal(request)
        if p is None or not allows(p.role, ops.READ_ROLE):
            return JSONResponse({"error": "sign in again"}, status_code=401)
        seen_version = request.query_params.get("version")
        try:
            rendered = float(request.query_params.get("rendered", "0"))
        except ValueError:
            rendered = 0.0

        def unchanged() -> bool:
            state = ctx.store.get_state(name)
            return (f"{state.version}" == (seen_version or "").split(":")[0]
                    and ctx.clock.now() - rendered < REFRESH_SECONDS)

        try:
            if await run(unchanged):
                return Response(status_code=204)
            view = await run(lambda: view_of(name))
        except UnknownRolloutError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse({"html": rollout_body(request, p, view), "version": _version(view),
                             "rendered": view["generated_at"]}, headers=_SECURITY_HEADERS)

    @router.post("/ui/rollouts/{name}/act")
    async def act(request: Request, name: str) -> Response:
        p = principal(request)
        if p is None:
            return message(request, None, 401, "Sign in first", "your session has ended; sign in "
                           "again", back="/ui/login")
        form = await _form(request)
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin.split("://", 1)[-1] != host:
            ctx.record_denial(request, 403, f"dashboard action from another origin {origin[:80]}",
                              p.name)
            return message(request, p, 403, "Refused", "this action came from another site "
                           "(its Origin is not this dashboard's)")
        if not hmac.compare_digest(form.get("csrf", ""), csrf(request)):
            ctx.record_denial(request, 403, "dashboard action without the page's anti-forgery "
                              "field", p.name)
            return message(request, p, 403, "Refused", "this action did not come from the "
                           "dashboard's own page (its anti-forgery field is missing or stale); "
                           "reload the page and try again", back=f"/ui/rollouts/{name}")
        try:
            action = Action(form.get("action", ""))
        except ValueError:
            return message(request, p, 422, "Unknown action", "actions are review, "
                           + ", ".join(str(a) for a in ops.ACTION_ROLES))
        if form.get("confirm") != "yes":
            return message(request, p, 422, "Not confirmed", f"tick the box to confirm the "
                           f"{action}", back=f"/ui/rollouts/{name}")
        reason = form.get("reason", "")

        def do() -> Any:
            if action is Action.REVIEW:
                return ops.review(ctx.store, name, form.get("review", ""), ctx.clock,
                                  reason=reason, principal=p)
            return ops.act(ctx.store, name, action, ctx.clock, reason=reason, principal=p)

        try:
            decision = await run(do)
        except AuthError as exc:
            ctx.record_denial(request, exc.status, str(exc), p.name)
            return message(request, p, exc.status, "Not allowed", str(exc),
                           hint="Your token's role decides which actions you may take; the "
                                "buttons shown are those your role allows.",
                           back=f"/ui/rollouts/{name}")
        except UnknownRolloutError as exc:
            return message(request, p, 404, "No such rollout", str(exc), back="/")
        except InvalidTransitionError as exc:
            return message(request, p, 409, "Not possible now", str(exc),
                           back=f"/ui/rollouts/{name}")
        except SafeshiftError as exc:
            return message(request, p, 422, "Refused", str(exc), back=f"/ui/rollouts/{name}")
        if "application/json" in request.headers.get("accept", ""):
            view = await run(lambda: view_of(name))
            return JSONResponse({"message": _notice(view, str(decision.seq)),
                                 "seq": decision.seq, "html": rollout_body(request, p, view),
                                 "version": _version(view), "rendered": view["generated_at"]},
                                headers=_SECURITY_HEADERS)
        return RedirectResponse(f"/ui/rollouts/{name}?done={decision.seq}", status_code=303)

    @router.post("/ui/rollouts/{name}/reveal")
    async def reveal(request: Request, name: str) -> Response:
        """A person who knows a personal value finds its segment: the page, with that one
        pseudonym shown beside the value (nothing is stored, and the value is not in a URL)."""
        p = reader(request)
        if isinstance(p, Response):
            return p
        form = await _form(request)
        if not hmac.compare_digest(form.get("csrf", ""), csrf(request)):
            return message(request, p, 403, "Refused", "reload the page and try again (its "
                           "anti-forgery field is missing or stale)")
        if not allows(p.role, REVEAL_ROLE):
            ctx.record_denial(request, 403, "revealing a personal segment value", p.name)
            return message(request, p, 403, "Not allowed", f"finding a personal value needs the "
                           f"{REVEAL_ROLE} role; {p.name} holds {p.role}",
                           back=f"/ui/rollouts/{name}")
        view = await rollout_or_404(request, p, name)
        if isinstance(view, Response):
            return view
        attribute, value = form.get("attribute", ""), form.get("value", "")
        if attribute not in view["personal"] or not value:
            return message(request, p, 422, "Unknown attribute", "choose one of the plan's "
                           "personal attributes and give a value", back=f"/ui/rollouts/{name}")
        from safeshift.pseudonym import pseudonymizer

        names = {f"{attribute}={x}" for x in pseudonymizer().candidates(attribute, value)}
        rows = {row["segment"] for row in view["grid"]["rows"]}
        found = sorted(names & rows)
        revealed = {segment: f"{attribute}={value} ({segment.split('=', 1)[1]})"
                    for segment in found}
        note = (f"{attribute}={value} is {', '.join(found)} in the grid" if found else
                f"{attribute}={value} has no segment row here (no traffic judged from it)")
        body = rollout_body(request, p, view, revealed=revealed, reveal_note=note)
        return _html(render("rollout.html", v=view, body=Markup(body), version=_version(view),
                            rendered=view["generated_at"], notice=None,
                            **page_context(request, p)))

    @router.get("/ui/rollouts/{name}/decisions/{seq}")
    async def decision_page(request: Request, name: str, seq: int) -> Response:
        p = reader(request)
        if isinstance(p, Response):
            return p
        from safeshift import explain as ex

        raw = request.query_params.get("what_if", "").strip()

        def do() -> Any:
            settings = ex.parse_what_if(raw.split()) if raw else None
            return ex.explain(ctx.store, name, seq, what_if=settings)

        try:
            e = await run(do)
        except UnknownRolloutError as exc:
            return message(request, p, 404, "No such rollout", str(exc), back="/")
        except SafeshiftError as exc:
            return message(request, p, 422, "Cannot explain", str(exc),
                           back=f"/ui/rollouts/{name}/decisions/{seq}")
        return _html(render("decision.html", rollout=name, seq=seq, lines=ex.explain_lines(e),
                            matches=e.matches, explainable=e.kind == "controller",
                            what_if=raw, **page_context(request, p)))

    @router.get("/ui/rollouts/{name}/report")
    async def report(request: Request, name: str) -> Response:
        p = reader(request)
        if isinstance(p, Response):
            return p
        from safeshift.report import render_report

        fmt = request.query_params.get("format", "html")
        if fmt not in ("html", "md", "json"):
            return message(request, p, 422, "Unknown format", "format is html, md or json")
        try:
            text = await run(lambda: render_report(view_of(name), fmt))
        except UnknownRolloutError as exc:
            return message(request, p, 404, "No such rollout", str(exc), back="/")
        media = {"html": "text/html", "md": "text/markdown", "json": "application/json"}[fmt]
        return Response(text, media_type=f"{media}; charset=utf-8", headers={
            **_SECURITY_HEADERS, "content-disposition":
            f'attachment; filename="{name}-report.{fmt}"'})

    @router.get("/favicon.ico")
    async def favicon() -> Response:  # browsers ask for it: answer without a token, and empty
        return Response(status_code=204, headers={"cache-control": "max-age=86400"})

    @router.get("/ui/static/{file}")
    async def static(file: str) -> Response:
        media = _STATIC.get(file)
        if media is None:
            return PlainTextResponse("no such file", status_code=404)
        return Response(static_text(file), media_type=media,
                        headers={"cache-control": "max-age=300", "x-content-type-options": "nosniff"})

    return router


def _version(view: dict[str, Any]) -> str:
    """What the page was rendered at: the state's version (a decision moves it)."""
    return f"{view['state_version']}:{len(view['decisions'])}"


def _notice(view: dict[str, Any], done: str | None) -> str | None:
    if not done or not done.isdigit():
        return None
    for d in view["decisions"]:
        if d["seq"] == int(done):
            return (f"Decision {d['seq']}: {d['action']} → {d['phase']} by {d['actor']}, "
                    f"recorded in the audit log ({view['audit']['events']} events).")
    return None


def _authenticate(authenticator: Authenticator | None, token: str) -> Principal:
    if authenticator is None:
        raise AuthError(401, "sign-in is off")
    if not token:
        raise AuthError(401, "paste a token")
    return authenticator.authenticate(token)


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the dashboard's own), first value per field."""
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        return {}
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in parsed.items() if v}
