"""The FastAPI part of the gateway: every route but the fast path's, documented versions of
the fast-path routes (same handlers), JSON error handlers and the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from safeshift.gateway import handlers, schemas
from safeshift.gateway._http import BodyTooLarge, HTTPError, Scope, request_id
from safeshift.gateway.bodies import MAX_DEPTH
from safeshift.gateway.control import build_control
from safeshift.gateway.drills import build_drills
from safeshift.gateway.logs import gateway_logger
from safeshift.gateway.metrics import CONTENT_TYPE
from safeshift.gateway.runtime import Gateway


def internal_error(scope: Scope) -> dict[str, Any]:
    return {"error": "internal error; the gateway's log has the details under request id "
                     f"{request_id(scope) or '-'}"}


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text} for code, text in (
    (404, "unknown endpoint or request id"), (413, "request body too large"),
    (422, "malformed JSON (also NaN, Infinity, numbers beyond a 64-bit float, or nesting deeper "
          f"than {MAX_DEPTH} levels) or wrong schema; `field` names the culprit"),
    (429, "rate limit exceeded"), (502, "the baseline model could not answer"))}
_ID_TAKEN = {"model": schemas.ErrorBody,
             "description": "the request id (`id`, or the X-Request-ID header) is taken by an "
                            "earlier request; send a fresh one"}
_SERVE_ERRORS = {**_ERRORS, 409: _ID_TAKEN}
_PINNED_ERRORS = {**_ERRORS, 404: {"model": schemas.ErrorBody, "description":
                                   "unknown endpoint or version"},
                  409: {"model": schemas.ErrorBody, "description":
                        "the request id is taken (send a fresh one), or the version is a "
                        "candidate the rollout has not promoted (leave the version out)"}}


def _reply(reply: handlers.Reply) -> Response:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reply.headers}
    return Response(reply.body, reply.status, headers=headers,
                    media_type=reply.content_type.decode())


def build_api(gw: Gateway) -> FastAPI:
    """Routes other than the fast path, plus documented versions of the fast-path routes."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    from safeshift import __version__

    # documents (does not validate) the endpoints served, so clients and fuzzers know them
    def endpoint_name() -> Any:
        return Path(description="the endpoint (model) name",
                    json_schema_extra={"enum": sorted(gw.endpoints)})

    def version_name() -> Any:
        versions = {v for ep in gw.endpoints.values()
                    for v in [ep.rollout.plan.baseline.version,
                              *(ep.rollout.plan.variant(n).version for n in ep.rollout.plan.variants)]}
        return Path(description="a version of the model: the baseline's or a candidate's",
                    json_schema_extra={"enum": sorted(versions)})

    api = FastAPI(title="safeshift gateway", version=__version__, lifespan=lifespan,
                  redoc_url=None, description="Predictions while rollouts run, feedback, "
                  "reports and the Open Inference Protocol. See docs/gateway.md.")
    _exception_handlers(api, gw)

    @api.post("/v1/endpoints/{name}/predict", tags=["predict"], summary="Predict",
              response_model=schemas.PredictResponse, responses=_SERVE_ERRORS,
              openapi_extra=schemas.request_body(schemas.ref("PredictRequest")))
    async def predict(request: Request, name: str = endpoint_name()) -> Response:
        return _reply(await handlers.predict(gw, name, await request.body(), request.scope))

    @api.post("/v2/models/{name}/infer", tags=["open inference protocol"], summary="Infer",
              response_model=schemas.InferResponse, responses=_SERVE_ERRORS,
              openapi_extra=schemas.request_body(schemas.ref("InferRequest")))
    async def infer(request: Request, name: str = endpoint_name()) -> Response:
        return _reply(await handlers.infer(gw, name, await request.body(), request.scope))

    @api.post("/v2/models/{name}/versions/{version}/infer", tags=["open inference protocol"],
              summary="Infer, pinned to a version", response_model=schemas.InferResponse,
              responses=_PINNED_ERRORS,
              openapi_extra=schemas.request_body(schemas.ref("InferRequest")))
    async def infer_version(request: Request, name: str = endpoint_name(),
                            version: str = version_name()) -> Response:
        return _reply(await handlers.infer_version(gw, name, version, await request.body(),
                                                   request.scope))

    @api.post("/v1/feedback", tags=["feedback"], summary="Labels and outcomes",
              response_model=schemas.FeedbackResult | schemas.FeedbackBatchResult,
              responses={**_ERRORS, 409: {"model": schemas.ErrorBody, "description":
                                          "a label list that does not match the request's "
                                          "rows"}},
              openapi_extra=schemas.request_body(schemas.one_or_batch("FeedbackItem")))
    async def feedback(request: Request) -> Response:
        return _reply(await handlers.feedback(gw, await request.body(), request.scope))

    @api.post("/v1/reports", tags=["feedback"], summary="User issue reports",
              response_model=schemas.ReportResult | schemas.ReportBatchResult,
              responses=_ERRORS,
              openapi_extra=schemas.request_body(schemas.one_or_batch("ReportItem")))
    async def reports(request: Request) -> Response:
        return _reply(await handlers.reports(gw, await request.body(), request.scope))

    @api.get("/healthz", tags=["operations"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", tags=["operations"], summary="Readiness",
             responses={503: {"description": "starting or shutting down"}})
    async def readyz() -> JSONResponse:
        body = {"ready": gw.ready, "endpoints": gw.status(),
                "store": "ok" if gw.last_refresh_error is None else gw.last_refresh_error}
        return JSONResponse(body, 200 if gw.ready else 503)

    @api.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             response_class=Response)
    async def metrics() -> Response:
        return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE)

    @api.get("/v2", tags=["open inference protocol"], summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "safeshift", "version": __version__,
                "extensions": ["binary_tensor_data"]}

    @api.get("/v2/health/live", tags=["open inference protocol"], summary="Server live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", tags=["open inference protocol"], summary="Server ready",
             responses={503: {"description": "starting or shutting down"}})
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": gw.ready}, 200 if gw.ready else 503)

    @api.get("/v2/models/{name}", tags=["open inference protocol"], summary="Model metadata",
             responses={404: _ERRORS[404]})
    async def model_metadata(name: str = endpoint_name()) -> dict[str, Any]:
        return handlers.model_metadata(gw, name)

    @api.get("/v2/models/{name}/ready", tags=["open inference protocol"],
             summary="Model ready", responses={404: _ERRORS[404],
                                               503: {"description": "not ready"}})
    async def model_ready(name: str = endpoint_name()) -> JSONResponse:
        handlers.endpoint(gw, name)
        return JSONResponse({"name": name, "ready": gw.ready}, 200 if gw.ready else 503)

    @api.get("/v2/models/{name}/versions/{version}", tags=["open inference protocol"],
             summary="Model version metadata", responses={404: _PINNED_ERRORS[404]})
    async def version_metadata(name: str = endpoint_name(),
                               version: str = version_name()) -> dict[str, Any]:
        return handlers.version_metadata(gw, name, version)

    @api.get("/v2/models/{name}/versions/{version}/ready", tags=["open inference protocol"],
             summary="Model version ready",
             responses={404: _PINNED_ERRORS[404],
                        409: {"description": "not ready: a candidate the rollout has not "
                                             "promoted (pinned inference would get 409)"},
                        503: {"description": "starting or shutting down"}})
    async def version_ready(name: str = endpoint_name(),
                            version: str = version_name()) -> JSONResponse:
        ready = handlers.version_ready(gw, name, version)
        status = 200 if ready else 503 if not gw.ready else 409
        return JSONResponse({"name": name, "version": version, "ready": ready}, status)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=api.title, version=api.version,
                              description=api.description, routes=api.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in schemas.component_schemas().items():
                components.setdefault(name, schema)
            api.openapi_schema = doc
        return api.openapi_schema

    build_control(gw, api)
    build_drills(gw, api)
    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _exception_handlers(api: FastAPI, gw: Gateway) -> None:
    def route_of(request: Request) -> str:
        route = request.scope.get("route")
        return str(getattr(route, "name", None) or "other")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        gw.metrics.error(route_of(request), exc.status)
        headers = {k.decode(): v.decode() for k, v in exc.headers}
        return JSONResponse(exc.body(), exc.status, headers=headers)

    async def starlette_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        gw.metrics.error("other", exc.status_code)
        message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404
                   else str(exc.detail))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route of the path
            allowed = _methods_of(api, request.scope)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed here; use {' or '.join(allowed)}"
        return JSONResponse({"error": message}, exc.status_code, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path"))
        return JSONResponse({"error": str(first.get("msg", "invalid request")),
                             "field": loc or None}, 422)

    async def too_large(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BodyTooLarge)
        return JSONResponse({"error": str(exc), "field": "body"}, 413)

    async def internal(request: Request, exc: Exception) -> Response:
        gw.metrics.error(route_of(request), 500)
        gateway_logger.error("unhandled error", exc_info=exc)
        return JSONResponse(internal_error(request.scope), 500)

    api.add_exception_handler(HTTPError, http_error)
    api.add_exception_handler(StarletteHTTPException, starlette_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(BodyTooLarge, too_large)
    api.add_exception_handler(Exception, internal)



def _methods_of(api: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of ``api`` serves at the request's path."""
    from starlette.routing import Match, Route

    methods: set[str] = set()
    for route in api.routes:
        if isinstance(route, Route):
            match, _ = route.matches({**scope, "method": "GET"}) if route.methods else (
                Match.NONE, {})
            if match is not Match.NONE:
                methods.update(route.methods or ())
    return sorted(methods)
