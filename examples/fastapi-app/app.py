"""A FastAPI app that serves the churn models itself, rolled out by safeshift's in-process SDK.

Run it (from the repository's root; the store is ``./safeshift.db`` unless
``SAFESHIFT_STORE`` names another)::

    uvicorn app:app --app-dir examples/fastapi-app --port 8000

    curl -s localhost:8000/churn -H 'content-type: application/json' -d '{"user_id": "u-123",
      "country": "BR", "plan": "pro", "features": {"mean_radius": 17.99,
      "mean_texture": 10.38, "mean_perimeter": 122.8, "mean_area": 1001}}'
    # {"id":"…","churn":0,"score":0.02…,"version":"v1","arm":"baseline","stage":"shadow"}
    curl -s localhost:8000/safeshift/feedback -H 'content-type: application/json' \\
      -d '{"id": "…", "label": 0}'

The app owns its models (loaded into memory here), its routes and their schema; safeshift
picks the arm for each request, falls back to the baseline when the candidate fails, records
the request and runs the rollout's controller in the background. ``create_app`` takes the
plan, the store and SDK options, so the tests run this very app on a virtual clock.
"""

import os
from pathlib import Path
from typing import Any

import joblib
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from safeshift.integrations.starlette import Safeshift, Serve
from safeshift.plan import Plan

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "churn" / "models"


class Features(BaseModel):
    mean_radius: float
    mean_texture: float
    mean_perimeter: float
    mean_area: float


class Customer(BaseModel):
    user_id: str
    country: str | None = None
    plan: str | None = None
    features: Features


class Answer(BaseModel):
    id: str  # send it back with the label: POST /safeshift/feedback {"id": …, "label": …}
    churn: int
    score: float | None
    version: str
    arm: str
    stage: str


def load_models() -> dict[str, Any]:
    """The app's own models, in memory (joblib bundles: an estimator and its feature names)."""
    return {"baseline": joblib.load(MODELS / "churn_v1.joblib"),
            "candidate": joblib.load(MODELS / "churn_v2.joblib")}


def create_app(plan: Plan | str | Path = HERE / "plan.yaml", *, store: Any = None,
               models: dict[str, Any] | None = None, **options: Any) -> FastAPI:
    """The app; ``options`` go to :class:`Safeshift` (``clock``, ``tick_interval`` …)."""
    ss = Safeshift(plan, store=store or os.environ.get("SAFESHIFT_STORE", "safeshift.db"),
                   models=models or load_models(), **options)
    app = FastAPI(title="churn", lifespan=ss.lifespan)
    app.state.safeshift = ss
    ss.install(app)  # safeshift's refusals as JSON {"error", "field"} with their status
    # labels decide the rollout: a real app puts its authentication on these routes
    # (ss.router(prefix=..., dependencies=[Depends(check_token)]))
    app.include_router(ss.router(prefix="/safeshift"))

    @app.post("/churn")
    async def churn(customer: Customer, serve: Serve = Depends(ss.serve)) -> Answer:
        context = {k: v for k, v in (("country", customer.country), ("plan", customer.plan))
                   if v is not None}
        answer = await serve(customer.features.model_dump(), unit=customer.user_id,
                             context=context)
        score = answer.scores[0] if answer.scores else None
        return Answer(id=answer.id, churn=answer.outputs[0], score=score,
                      version=answer.version, arm=answer.arm, stage=answer.stage)

    return app


app = create_app()
