"""Request and response shapes, for the OpenAPI document only.

The handlers parse raw bodies themselves (faster, and errors name the field the way clients
need), so these pydantic models describe the wire format without validating it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.json_schema import models_json_schema

from safeshift.feedback import outcome_range
from safeshift.plan import BUILTIN_METRICS, OUTCOME_LIMIT

Scalar = str | int | float | bool | None
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Rows = Annotated[list[Any], WithJsonSchema({
    "type": "array", "minItems": 1, "items": {"not": {"type": "null"}}})]

def _number_in(metric: str) -> dict[str, Any]:
    low, high = outcome_range(metric)
    return {"type": "number", "minimum": low, "maximum": high}


Outcome = Annotated[dict[str, float], WithJsonSchema({
    "type": "object", "minProperties": 1,
    "description": f"metric: value; values within ±{OUTCOME_LIMIT:g}, built-in rates (e.g. "
                   "accuracy) within [0, 1]",
    "properties": {m: _number_in(m) for m, info in BUILTIN_METRICS.items() if info.rate},
    "additionalProperties": _number_in("-"),
    "propertyNames": {"pattern": r"^[a-z0-9][a-z0-9._-]{0,62}$"}})]


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong and what to do")
    field: str | None = Field(default=None, description="the request field at fault")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields get 422


class PredictRequest(_Request):
    """One row (an object) or a list of rows, for the unit that the rollout assigns."""

    unit: str | int | None = Field(default=None, description="the sticky unit id, e.g. a "
                                   "user id")
    context: dict[str, Scalar] | None = Field(default=None, description="attributes used for "
                                              "targeting and segments, e.g. country")
    inputs: dict[str, Any] | Rows = Field(description="one row or a list of rows")
    id: RequestId | None = Field(default=None, description="your id for this request "
                                 "(feedback joins on it; a fresh one each time: a repeat gets "
                                 "409); a new one is made otherwise")


class PredictResponse(BaseModel):
    id: str
    outputs: list[Any]
    version: str = Field(description="the version that answered")
    arm: str = Field(description="baseline or candidate: the arm whose model answered")
    stage: str
    fallback: bool = Field(description="the candidate failed and the baseline answered")
    scores: list[float] | None = None


class FeedbackItem(_Request):
    """A ``label`` or an ``outcome`` (or both) for a request that predict answered."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["label"], "properties": {"label": {"not": {"type": "null"}}}},
        {"required": ["outcome"], "properties": {"outcome": {"type": "object"}}}]})

    id: RequestId = Field(description="the id that predict returned")
    label: Any = Field(default=None, description="the true answer (a list: one per row); "
                       f"finite, and within ±{OUTCOME_LIMIT:g} when the plan guards abs_error")
    outcome: Outcome | None = Field(default=None, description="business metrics")


class FeedbackResult(BaseModel):
    id: str
    rollout: str
    arm: str
    stage: str | None
    accepted: list[str] = Field(description="signals recorded now")
    duplicate: list[str] = Field(description="signals already recorded for this id")


class FeedbackBatchResult(BaseModel):
    results: list[FeedbackResult]


class ReportItem(_Request):
    id: RequestId
    kind: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.:-]{0,31}$")
    text: Annotated[str, StringConstraints(max_length=10_000)] | None = Field(
        default="", description="free text: stored only after redaction (e-mail addresses, "
        "phone, card and long numbers, IP addresses taken out), once per unit and stage")


class ReportResult(BaseModel):
    id: str
    rollout: str
    arm: str
    kind: str
    accepted: bool
    duplicate: bool


class ReportBatchResult(BaseModel):
    results: list[ReportResult]


class Tensor(BaseModel):
    name: Annotated[str, StringConstraints(min_length=1)]
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                      "INT64", "FP16", "FP32", "FP64", "BYTES"]
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="row-major values, as many as the shape holds, of "
                            "the datatype (with the binary extension: parameters."
                            "binary_data_size instead, the bytes after the JSON header)")


class InferRequest(BaseModel):
    id: RequestId | None = Field(default=None, description="your id for this request "
                                 "(feedback joins on it; a fresh one each time)")
    parameters: dict[str, Any] | None = Field(default=None, description="may carry unit and "
                                              "context (or context.<attr>)")
    inputs: Annotated[list[Tensor], Field(min_length=1)]
    outputs: list[dict[str, Any]] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any]
    outputs: list[Tensor]


DOC_MODELS: tuple[type[BaseModel], ...] = (
    ErrorBody, PredictRequest, PredictResponse, FeedbackItem, FeedbackResult,
    FeedbackBatchResult, ReportItem, ReportResult, ReportBatchResult, Tensor, InferRequest,
    InferResponse)


def component_schemas() -> dict[str, Any]:
    """JSON Schemas of :data:`DOC_MODELS` with refs into ``#/components/schemas``."""
    _, doc = models_json_schema([(m, "validation") for m in DOC_MODELS],
                                ref_template="#/components/schemas/{model}")
    defs: dict[str, Any] = doc.get("$defs", {})
    return defs


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def one_or_batch(name: str) -> dict[str, Any]:
    return {"oneOf": [ref(name), {"type": "array", "items": ref(name), "minItems": 1,
                                  "maxItems": 1000}]}


def request_body(schema: dict[str, Any], content_type: str = "application/json"
                 ) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}
