"""A rollout inside a Starlette or FastAPI app that serves its own models: :class:`Safeshift`.

An app that already answers predictions itself (its models in memory, its own routes, its own
authentication) keeps doing so; a :class:`Safeshift` object decides, for each request, whether
the baseline or the candidate answers, and counts what happened. It is the gateway without its
HTTP layer, not a second implementation of it: :meth:`Safeshift.start` builds the very
:class:`~safeshift.gateway.runtime.Gateway` that ``safeshift serve`` runs
(:func:`~safeshift.gateway.app.build_gateway`) and starts its background tasks (split
refresh, telemetry flush, controller ticks, webhook notifications);
:meth:`Safeshift.predict` serves through the same
:meth:`Endpoint.predict <safeshift.gateway.serving.Endpoint.predict>` — the shared serving
steps of :mod:`safeshift.serving` driven by ``run_async``: timeout, circuit breaker, fallback to
the baseline, whose fault a failure is, shadow copies, request records — under the same
request-id check; feedback and reports go through the gateway's parsers and join
(:func:`~safeshift.gateway.handlers.apply_feedback`). So the same traffic leaves the same
records in the store whichever way it came in (``tests/test_sdk_records.py`` checks it).

What the gateway does at its HTTP edge is the app's business here: authentication (the app
is trusted with the context it passes: targeting attributes are taken as given), body limits
and rate limits. A minimal FastAPI app::

    from fastapi import Depends, FastAPI
    from safeshift.integrations.starlette import Safeshift, Serve

    ss = Safeshift("plan.yaml", store="safeshift.db",
                   models={"baseline": model_v1, "candidate": model_v2})  # in memory
    app = FastAPI(lifespan=ss.lifespan)
    app.include_router(ss.router())          # POST /feedback, POST /reports
    ss.install(app)                          # errors as the gateway's JSON {"error", "field"}

    @app.post("/churn")
    async def churn(row: dict, user: str, serve: Serve = Depends(ss.serve)):
        answer = await serve(row, unit=user, context={"country": "BR"})
        return {"id": answer.id, "churn": answer.outputs[0]}

The dependency also takes a client's ``X-Request-ID`` as the record's id (checked like the
gateway checks it) and sets ``X-Request-ID`` and the gateway's ``X-Safeshift-Version``,
``-Arm``, ``-Stage`` and ``-Fallback`` on the response. See docs/sdk.md.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from safeshift.assign import BASELINE
from safeshift.clock import Clock
from safeshift.errors import ModelLoadError, SafeshiftError
from safeshift.gateway._http import HTTPError, dumps
from safeshift.gateway.app import build_gateway
from safeshift.gateway.feedback import parse_feedback, parse_reports
from safeshift.gateway.handlers import apply_feedback, apply_reports, served_headers
from safeshift.gateway.request_id import sane_request_id
from safeshift.gateway.request_ids import HEADER, serve_once
from safeshift.gateway.runtime import Gateway
from safeshift.gateway.serving import Endpoint, Served
from safeshift.gateway.settings import GatewaySettings
from safeshift.models import ModelBackend, PythonModel, SklearnModel
from safeshift.ops import Status
from safeshift.plan import Plan
from safeshift.rollout import Rollout
from safeshift.state import Decision
from safeshift.store import Store

__all__ = ["Safeshift", "Serve", "Served", "ServingError", "as_backend"]


class ServingError(SafeshiftError, HTTPException):
    """A request safeshift cannot serve, or feedback it cannot take, with the HTTP status the
    gateway would answer: 422 (inputs the baseline rejects, or malformed ones; ``field``
    names the culprit), 409 (a request id an earlier request has; a label at odds with its
    request), 404 (feedback for an unknown or expired request), 502 (the baseline failed).

    It is a Starlette ``HTTPException``, so an app that does not catch it answers with its
    status; :meth:`Safeshift.install` makes the body the gateway's ``{"error", "field"}``."""

    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        HTTPException.__init__(self, status_code=status, detail=message)
        self.status = status
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out

    @classmethod
    def of(cls, exc: HTTPError) -> ServingError:
        return cls(exc.status, exc.message, field=exc.field)


def as_backend(model: Any, name: str = "model") -> ModelBackend:
    """A model the app holds, as a safeshift backend: a :class:`ModelBackend` as it is; a
    joblib bundle ``{"model": estimator, "features": [...]}`` or a scikit-learn-style estimator
    (``fit`` and ``predict``) as :class:`SklearnModel` (rows may then be mappings when it
    knows its feature names); any other object with ``predict(rows)``, or a function of the
    list of rows, as :class:`PythonModel`."""
    if isinstance(model, ModelBackend):
        return model
    if isinstance(model, Mapping) and "model" in model:
        return SklearnModel(model["model"], model.get("features"), name=name)
    if hasattr(model, "fit") and hasattr(model, "predict"):
        return SklearnModel(model, name=name)
    if hasattr(model, "predict") or callable(model):
        return PythonModel(model, name=name)
    raise ModelLoadError(f"{name}: a {type(model).__name__} is not a model: give an object "
                         "with predict(rows), a function of the rows, or a ModelBackend")


def _rows(inputs: Any) -> list[Any]:
    """The rows of ``inputs`` as the gateway's predict body reads them: one row (a mapping)
    or a non-empty list of rows; array-likes (numpy) through ``tolist()``."""
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    tolist = getattr(inputs, "tolist", None)
    if tolist is not None and not isinstance(inputs, list | tuple):
        inputs = tolist()
    if isinstance(inputs, list | tuple) and inputs:
        rows = list(inputs)
        for i, row in enumerate(rows):
            if row is None:
                raise ServingError(422, "a row cannot be null", field=f"inputs[{i}]")
        return rows
    raise ServingError(422, "'inputs' must be one row (a mapping) or a non-empty list of rows",
                       field="inputs")


def _check(unit: Any, context: Mapping[str, Any] | None) -> str | None:
    """The unit as the gateway reads it (an integer becomes its digits); a unit or context
    value the gateway's body would refuse is a 422."""
    for key, value in (context or {}).items():
        if isinstance(value, Mapping | list | tuple):
            raise ServingError(422, "context values must be strings, numbers, booleans or "
                                    "None", field=f"context.{key}")
    if unit is None or isinstance(unit, str):
        return unit
    if isinstance(unit, int) and not isinstance(unit, bool):
        return str(unit)
    raise ServingError(422, "'unit' must be a string (or an integer)", field="unit")


class Safeshift:
    """One rollout served inside an app: build it with the plan (a file or a :class:`Plan`)
    and the store (a store or its URL; default ``./safeshift.db``), start it with the app
    (``FastAPI(lifespan=ss.lifespan)``, or ``await ss.start()`` / ``await ss.stop()``).

    ``models`` maps ``baseline``/``candidate`` (and challengers) to the app's own models — any
    object :func:`as_backend` takes — instead of loading the plan's references (which then
    only name them, for the lineage of decisions). ``controller`` and ``tick_interval`` are
    ``safeshift serve``'s ``--no-controller`` and ``--tick``; ``settings`` (default: the
    ``SAFESHIFT_*`` variables, as ``serve`` reads them) and keyword ``overrides`` set any
    :class:`GatewaySettings` field (``flush_interval``, ``candidate_threads`` …). ``clock`` is
    for simulations (a :class:`~safeshift.clock.VirtualClock`)."""

    def __init__(self, plan: Plan | str | Path, *, store: Store | str | Path | None = None,
                 models: Mapping[str, Any] | None = None, clock: Clock | None = None,
                 controller: bool = True, tick_interval: float = 1.0,
                 settings: GatewaySettings | None = None, **overrides: Any) -> None:
        self.plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        if tick_interval <= 0:
            raise ValueError("tick_interval must be positive")
        arms = (BASELINE, *self.plan.variants)
        unknown = sorted(set(models or {}) - set(arms))
        if unknown:
            raise ModelLoadError(f"models: no arm {unknown[0]!r} in rollout "
                                 f"{self.plan.rollout!r}; its arms are {', '.join(arms)}")
        self._models = {arm: as_backend(m, f"{arm} ({self.plan.variant(arm).version})")
                        for arm, m in (models or {}).items()}
        self._store = store
        self._clock = clock
        self._controller = controller
        self._tick_interval = tick_interval
        self.settings = (settings or GatewaySettings.from_env()).with_overrides(overrides)
        self._gateway: Gateway | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Register the rollout (starting it if pending, with the controller), load its models,
        and start the background tasks; the store's SQL runs in a worker thread."""
        async with self._lock:
            if self._gateway is not None:
                return
            gateway = await asyncio.to_thread(
                build_gateway, [self.plan], store=self._store, clock=self._clock,
                controller=self._controller, tick_interval=self._tick_interval,
                models={self.plan.endpoint: self._models}, settings=self.settings)
            await gateway.start()
            self._gateway = gateway

    async def stop(self) -> None:
        """Stop the controller, finish shadow copies, flush telemetry and request records,
        close the models and (when it opened it) the store."""
        async with self._lock:
            gateway, self._gateway = self._gateway, None
            if gateway is not None:
                await gateway.stop()

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """``FastAPI(lifespan=ss.lifespan)`` / ``Starlette(lifespan=ss.lifespan)``; in an
        app's own lifespan: ``async with ss.lifespan(app): yield``."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    @property
    def started(self) -> bool:
        return self._gateway is not None

    @property
    def gateway(self) -> Gateway:
        """The running gateway state (endpoints, metrics, background tasks)."""
        if self._gateway is None:
            raise RuntimeError(f"safeshift for rollout {self.plan.rollout!r} is not started: "
                               "pass ss.lifespan to FastAPI(lifespan=...) or await ss.start()")
        return self._gateway

    @property
    def endpoint(self) -> Endpoint:
        return self.gateway.endpoints[self.plan.endpoint]

    @property
    def rollout(self) -> Rollout:
        """The :class:`Rollout` served (its state, decisions, analysis; its actions)."""
        return self.endpoint.rollout

    # -- serving ---------------------------------------------------------------------------

    async def predict(self, inputs: Any, *, unit: Any = None,
                      context: Mapping[str, Any] | None = None,
                      request_id: str | None = None) -> Served:
        """Serve one request: assign ``unit`` (default: the plan's unit attribute in
        ``context``), call the arm's model — the baseline answers when the candidate fails —
        mirror it in shadow stages, and record it. ``inputs`` is one row (a mapping) or a list
        of rows. A ``request_id`` of the caller's names the record feedback joins on (1-128
        characters; one an earlier request has is a 409), else a random one is made. Raises
        :class:`ServingError` when the baseline cannot answer (422 for inputs it rejects,
        502 otherwise)."""
        if request_id is not None and (not isinstance(request_id, str)
                                       or not 0 < len(request_id) <= 128):
            raise ServingError(422, "'id' must be a string of 1 to 128 characters", field="id")
        return await self._serve(inputs, unit, context, request_id, "id")

    async def _serve(self, inputs: Any, unit: Any, context: Mapping[str, Any] | None,
                     request_id: str | None, field: str) -> Served:
        rows = _rows(inputs)
        unit = _check(unit, context)
        gw = self.gateway
        ep = self.endpoint
        rid = request_id if request_id is not None else uuid.uuid4().hex
        try:
            return await serve_once(gw, ep, rid, field if request_id is not None else None,
                                    lambda: ep.predict(rows, unit=unit, context=context,
                                                       request_id=rid, protocol="v1"))
        except HTTPError as exc:
            raise ServingError.of(exc) from None

    def serve(self, request: Request, response: Response) -> Serve:
        """A FastAPI dependency (``serve: Serve = Depends(ss.serve)``): serves like
        :meth:`predict`, taking the request's ``X-Request-ID`` as its id and setting the
        response's headers as the gateway does."""
        return Serve(self, request, response)

    @staticmethod
    def headers(served: Served) -> dict[str, str]:
        """The response headers the gateway sets on an answer: ``X-Request-ID`` and who
        answered (``X-Safeshift-Version``, ``-Arm``, ``-Stage``, ``-Fallback`` if any)."""
        out = {"x-request-id": served.id}
        out.update((k.decode(), v.decode()) for k, v in served_headers(served))
        return out

    # -- feedback and reports ------------------------------------------------------------

    async def feedback(self, request_id: str, *, label: Any = None,
                       outcome: Mapping[str, float] | None = None) -> dict[str, Any]:
        """A label or outcome metrics for the request ``request_id`` names, validated and
        joined as ``POST /v1/feedback`` does (finite values, in the metric's declared range;
        :class:`ServingError` 422/404/409 otherwise). Repeats are ignored per (request,
        metric): the result says ``accepted`` or ``duplicate``."""
        item: dict[str, Any] = {"id": request_id}
        if label is not None:
            item["label"] = label
        if outcome is not None:
            item["outcome"] = dict(outcome)
        return (await self.feedback_many([item], batch=False))[0]

    async def feedback_many(self, items: Sequence[Mapping[str, Any]], *,
                            batch: bool = True) -> list[dict[str, Any]]:
        """Several feedback items (``{"id", "label"}`` or ``{"id", "outcome"}``), all or
        nothing; a problem's ``field`` names the item (``[2].label``)."""
        body = self._body(list(items) if batch else items[0])
        try:
            parsed, is_batch = parse_feedback(body)
            return await apply_feedback(self.gateway, parsed, is_batch)
        except HTTPError as exc:
            raise ServingError.of(exc) from None

    async def report(self, request_id: str, kind: str, text: str = "") -> dict[str, Any]:
        """A user's issue report about the request ``request_id`` names (``kind`` such as
        ``wrong_answer``), as ``POST /v1/reports`` takes it."""
        body = self._body({"id": request_id, "kind": kind, "text": text})
        try:
            parsed, batch = parse_reports(body)
            return (await apply_reports(self.gateway, parsed, batch))[0]
        except HTTPError as exc:
            raise ServingError.of(exc) from None

    @staticmethod
    def _body(doc: Any) -> bytes:
        try:
            return dumps(doc)
        except (TypeError, ValueError) as exc:  # NaN, or an object JSON cannot carry
            raise ServingError(422, f"feedback must be JSON values: {exc}", field="body"
                               ) from None

    def router(self, *, prefix: str = "", dependencies: Sequence[Any] = (),
               tags: Sequence[str] = ("safeshift",)) -> APIRouter:
        """``POST {prefix}/feedback`` and ``POST {prefix}/reports``, with the bodies and answers
        of the gateway's ``/v1/feedback`` and ``/v1/reports`` (one item or a batch). Labels
        decide rollouts: protect the routes with the app's own authentication
        (``dependencies=[Depends(check_token)]``)."""
        router = APIRouter(prefix=prefix, dependencies=list(dependencies), tags=list(tags))
        router.add_api_route("/feedback", self._route(parse_feedback, apply_feedback),
                             methods=["POST"], summary="Labels and outcomes for served requests")
        router.add_api_route("/reports", self._route(parse_reports, apply_reports),
                             methods=["POST"],
                             summary="Users' issue reports about served requests")
        return router

    def _route(self, parse: Callable[[bytes], tuple[Any, bool]],
               apply: Callable[[Gateway, Any, bool], Awaitable[list[dict[str, Any]]]]
               ) -> Callable[[Request], Awaitable[Response]]:
        """A route that parses a body as the gateway's route does and applies it (one item
        or a batch), answering as the gateway answers."""
        async def handle(request: Request) -> Response:
            try:
                items, batch = parse(await request.body())
                results = await apply(self.gateway, items, batch)
            except HTTPError as exc:
                return JSONResponse(exc.body(), exc.status)
            return Response(dumps({"results": results} if batch else results[0]),
                            media_type="application/json")
        return handle

    def install(self, app: Any) -> None:
        """Answer :class:`ServingError` in ``app`` (Starlette or FastAPI) as the gateway does:
        its status, ``{"error": …, "field": …}``."""
        app.add_exception_handler(ServingError, _serving_error)

    # -- the rollout -----------------------------------------------------------------------

    async def tick(self) -> list[Decision]:
        """One controller tick now (what the background task runs every ``tick_interval``)."""
        return await self.gateway.tick()

    async def flush(self) -> int:
        """Write buffered telemetry and request records now; rows written."""
        return await asyncio.to_thread(self.gateway.flush_all)

    async def status(self) -> Status:
        """The rollout at a glance (:func:`safeshift.ops.status`)."""
        return await asyncio.to_thread(self.rollout.status)


class Serve:
    """What ``Depends(ss.serve)`` gives a route: ``await serve(inputs, unit=…, context=…)``."""

    def __init__(self, ss: Safeshift, request: Request, response: Response) -> None:
        self.ss = ss
        self.request = request
        self.response = response

    async def __call__(self, inputs: Any, *, unit: Any = None,
                       context: Mapping[str, Any] | None = None,
                       request_id: str | None = None) -> Served:
        """:meth:`Safeshift.predict`; without ``request_id``, the request's ``X-Request-ID``
        header (when it is a sane token: 1-128 letters, digits or ``._:-``) names the record,
        checked like the gateway checks it. Sets the answer's headers on the response."""
        if request_id is not None:
            served = await self.ss.predict(inputs, unit=unit, context=context,
                                           request_id=request_id)
        else:
            given = self.request.headers.get(HEADER)
            header_id = given if given is not None and sane_request_id(given) else None
            served = await self.ss._serve(inputs, unit, context, header_id, HEADER)
        self.response.headers.update(self.ss.headers(served))
        return served


async def _serving_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    return JSONResponse(exc.body(), exc.status)
