"""The rollout plan: what changes, for whom, in which stages, judged by which guardrails.

A plan is a YAML or JSON file validated by pydantic. :meth:`Plan.load` reads one and
reports every problem at once, each with its field path; :func:`plan_json_schema` gives
the JSON Schema for editors. Every way in (:meth:`Plan.load`, :meth:`Plan.from_dict`, a
stored plan) runs the same checks, so no plan can switch a guardrail off by accident.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PrivateAttr,
    StringConstraints,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from safeshift._units import (
    BASIS_POINTS,
    format_duration,
    format_share,
    parse_duration,
    parse_share,
)
from safeshift.errors import PlanError, PlanValidationError, Problem

_DURATION_TEXT = r"(\d+(\.\d+)?\s*(ms|s|m|h|d)?|(\d+(\.\d+)?(ms|s|m|h|d))+)"
"""What :func:`parse_duration` reads, for the JSON Schema (surrounding blanks allowed)."""


MIN_POSITIVE_DURATION = 0.001
"""Durations are written (and stored) to the millisecond, so less than 1ms would read back as 0."""


def _duration_schema(*, positive: bool) -> dict[str, Any]:
    nonzero = r"(?=[^1-9]*[1-9])" if positive else ""  # some digit that is not 0
    number = {"type": "number", "minimum": MIN_POSITIVE_DURATION if positive else 0}
    return {"anyOf": [{"type": "string", "pattern": rf"^{nonzero}\s*{_DURATION_TEXT}\s*$"}, number],
            "description": "a duration: 500ms, 30s, 10m, 2h, 7d, or seconds"
            + (" (at least 1ms)" if positive else "")}


def _positive(seconds: float) -> float:
    if seconds < MIN_POSITIVE_DURATION:
        raise ValueError("must be at least 1ms: 0 would switch it off; write it like 250ms, 30s "
                         "or 7d")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_duration_schema(positive=False)),
]
"""Seconds, written in a plan as ``30s``, ``10m``, ``2h``."""

PositiveDuration = Annotated[
    float,
    BeforeValidator(parse_duration),
    AfterValidator(_positive),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_duration_schema(positive=True)),
]
"""A duration of at least 1ms: timeouts, windows, the watch after promotion."""

_PERCENT_100 = r"0*(100(\.0*)?|\d{1,2}(\.\d{0,2}0*)?|\.\d{1,2}0*)"
"""0% to 100% in steps of 0.01%, as text before the ``%``."""
_PERCENT_50 = r"0*(50(\.0*)?|[1-4]?\d(\.\d{0,2}0*)?|\.\d{1,2}0*)"
"""0% to 50% in steps of 0.01%."""


def _share_schema(percent: str, maximum: float, *, positive: bool, what: str) -> dict[str, Any]:
    nonzero = r"(?=[^%1-9]*[1-9])" if positive else ""
    number: dict[str, Any] = {"type": "number", "maximum": maximum}
    number["exclusiveMinimum" if positive else "minimum"] = 0
    return {"anyOf": [{"type": "string", "pattern": rf"^{nonzero}\s*{percent}\s*%\s*$"}, number],
            "description": what}


Share = Annotated[
    int,
    BeforeValidator(parse_share),
    PlainSerializer(format_share, return_type=str),
    WithJsonSchema(_share_schema(_PERCENT_100, 1, positive=False,
                                 what="a share of traffic: 5% or 0.05")),
]
"""Basis points (0..10000), written in a plan as ``5%`` or ``0.05``."""

MAX_HOLDBACK = BASIS_POINTS // 2
"""A holdback beyond half the units would be the baseline's rollout, not the candidate's."""


def _holdback_range(bp: int) -> int:
    if not 0 < bp <= MAX_HOLDBACK:
        raise ValueError(f"a holdback must be more than 0% and at most {format_share(MAX_HOLDBACK)}, "
                         "e.g. 2%")
    return bp


HoldbackShare = Annotated[
    int,
    BeforeValidator(parse_share),
    AfterValidator(_holdback_range),
    PlainSerializer(format_share, return_type=str),
    WithJsonSchema(_share_schema(_PERCENT_50, MAX_HOLDBACK / BASIS_POINTS, positive=True,
                                 what="share of units kept on the baseline after promotion: "
                                 "more than 0%, at most 50%")),
]
"""Basis points in (0, 5000]: the units that stay on the baseline after promotion."""

FULL_TRAFFIC_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": r"^\s*0*100(\.0*)?\s*%\s*$"}, {"const": 1}]}
"""The JSON Schema of ``traffic: 100%`` (``1.0`` as a fraction)."""

MAX_SEGMENTS = 5
MAX_SEGMENT_NAME = 32
"""With values cut to 64 characters, a segment key ``a=v|b=w|…`` then fits the store's 512."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            "use 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


Name = Annotated[str, BeforeValidator(lambda v: _check_name(v) if isinstance(v, str) else v)]

DRILL_MARK = "~drill-"
"""What marks a drill's sandboxed copy of a rollout (``NAME~drill-<when>``, made only by
:mod:`safeshift.drill`): a plan file or a control API request cannot use it (``~`` is not in
names), a stored drill plan reads back, and its audit events say it was a drill."""
_DRILL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}~drill-[a-z0-9-]{1,32}$")


def _check_rollout_name(value: str) -> str:
    if DRILL_MARK in value and _DRILL_NAME.match(value) and len(value) <= 64:
        return value
    return _check_name(value)


RolloutName = Annotated[str, BeforeValidator(
    lambda v: _check_rollout_name(v) if isinstance(v, str) else v)]


def _segment_schema(limit: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": limit, "pattern": r"^[^|=]+$"}


def _segment_check(limit: int, problem: str) -> Callable[[Any], Any]:
    """The check of a segment name or value: 1-``limit`` characters without ``|`` or ``=``
    (telemetry's separators), else ``problem``."""
    def check(value: Any) -> Any:
        if isinstance(value, str) and (not 1 <= len(value) <= limit or "|" in value
                                       or "=" in value):
            raise ValueError(problem)
        return value
    return check


_SEGMENT_NAME_SCHEMA = _segment_schema(MAX_SEGMENT_NAME)
SegmentName = Annotated[str, BeforeValidator(_segment_check(
    MAX_SEGMENT_NAME, f"a segment is a context key of 1-{MAX_SEGMENT_NAME} characters without "
    "'|' or '='")), WithJsonSchema(_SEGMENT_NAME_SCHEMA)]

MAX_SEGMENT_VALUE = 64
"""Telemetry keeps this many characters of a segment value."""


_SEGMENT_VALUE_SCHEMA = _segment_schema(MAX_SEGMENT_VALUE)
SegmentValue = Annotated[str, BeforeValidator(_segment_check(
    MAX_SEGMENT_VALUE, f"a segment value is 1-{MAX_SEGMENT_VALUE} characters without '|' or '=' "
    "(telemetry cuts longer values and rewrites those characters, so it would never match)")),
    WithJsonSchema(_SEGMENT_VALUE_SCHEMA)]


class _Strict(BaseModel):
    # NaN and infinity compare false with every bound, so a guardrail at NaN never fires
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              allow_inf_nan=False)


_REGISTRY_REF = re.compile(r"^models:/([^/@\s]+)(?:/([1-9][0-9]*)|@([A-Za-z0-9_-]+))$")


def _version_optional_for_registry(schema: dict[str, Any]) -> None:
    """JSON Schema of a side: ``version`` may be left out of a ``models:/`` side only."""
    schema["required"] = [r for r in schema.get("required", []) if r != "version"]
    schema["if"] = {"properties": {"model": {"not": {"pattern": "^models:"}}}}
    schema["then"] = {"required": ["version"]}


class ModelSpec(_Strict):
    """One side of the comparison: a version label and where its model comes from."""

    model_config = ConfigDict(json_schema_extra=_version_optional_for_registry)

    version: str = Field(
        min_length=1, description="the version label reported to clients (a models:/ "
        "reference may leave it out: the registry's NAME/VERSION)")
    model: str = Field(
        min_length=1,
        description="model reference: joblib:PATH, python:MODULE:CALLABLE, fake:NAME, "
        "oip:URL#MODEL, mlflow-server:URL, or a registry model models:/NAME/VERSION or "
        "models:/NAME@ALIAS (paths relative to the plan file)",
    )
    timeout: PositiveDuration | None = Field(
        default=None, description="per-call timeout (defaults to serving.candidate_timeout)"
    )

    @model_validator(mode="before")
    @classmethod
    def _registry_label(cls, data: Any) -> Any:
        # a registry side's label defaults to NAME/VERSION (an alias: NAME@ALIAS, until it is
        # pinned to the version it points at when the rollout is registered)
        if isinstance(data, dict) and "version" not in data and isinstance(data.get("model"), str):
            m = _REGISTRY_REF.match(data["model"])
            if m is not None:
                label = f"{m.group(1)}/{m.group(2)}" if m.group(2) else f"{m.group(1)}@{m.group(3)}"
                data = {**data, "version": label}
        return data

    @field_validator("model")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if ":" not in value or scheme not in MODEL_SCHEMES:
            raise ValueError(
                f"unknown model reference {value!r}; start it with one of "
                + ", ".join(f"{s}:" for s in MODEL_SCHEMES)
            )
        if scheme == "models" and not _REGISTRY_REF.match(value):
            raise ValueError(f"{value!r}: write a registry model as models:/NAME/VERSION (a "
                             "version number) or models:/NAME@ALIAS")
        return value


MODEL_SCHEMES = ("joblib", "python", "fake", "oip", "mlflow-server", "models", "mlflow")
"""``mlflow`` is ``mlflow-server``'s older name (validate warns)."""


MAX_PROBES = 20
MAX_PROBE_INPUTS = 100


class Monotonic(_Strict):
    """The model's answer must move one way as one input feature grows."""

    feature: str = Field(min_length=1, description="the input feature (rows are mappings)")
    direction: Literal["increasing", "decreasing"] = Field(
        default="increasing", description="how the score (or numeric output) must move as the "
        "feature grows; equal answers are allowed")


class Probe(_Strict):
    """Golden inputs sent to the candidate on a schedule, never to users, with what its answers
    must be: exactly ``expect``, within ``range``, in ``classes``, or ``monotonic`` in a
    feature (several checks: all must hold). A probe that fails ``max_failures`` times in a
    stage proves harm: the rollout is rolled back; each stage waits for every probe to pass
    at least once."""

    name: Name = Field(description="unique among the probes")
    inputs: list[Any] = Field(min_length=1, max_length=MAX_PROBE_INPUTS,
                              description="the golden input rows, as a request's inputs")
    expect: list[Any] | None = Field(
        default=None, description="the expected output of each input row, in order")
    tolerance: float = Field(default=0.0, ge=0, description="with expect: how far a numeric "
                             "output may be from the expected value")
    range: Annotated[
        tuple[float, float] | None,
        WithJsonSchema({"anyOf": [{"type": "array", "minItems": 2, "maxItems": 2,
                                   "items": {"type": "number"}}, {"type": "null"}]}),
    ] = Field(default=None, description="[low, high]: every score (or numeric output) within")
    classes: list[str | int | bool] | None = Field(
        default=None, min_length=1, description="every output is one of these")
    monotonic: Monotonic | None = None
    every: PositiveDuration = Field(default=60.0, description="how often it is sent")
    max_failures: int = Field(default=1, ge=1, le=1000, description="failed runs in one stage "
                              "that prove harm (more than 1 for a model that may time out)")

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] <= value[1]:
            raise ValueError(f"the range's low end ({value[0]:g}) must not be above its high "
                             f"end ({value[1]:g})")
        return value

    @model_validator(mode="after")
    def _checks(self) -> Probe:
        if self.expect is None and self.range is None and self.classes is None \
                and self.monotonic is None:
            raise ValueError("a probe needs something to check: expect, range, classes or "
                             "monotonic")
        if self.expect is not None and len(self.expect) != len(self.inputs):
            raise ValueError(f"expect has {len(self.expect)} outputs for {len(self.inputs)} "
                             "inputs: give one expected output per input row")
        if self.monotonic is not None:
            feature = self.monotonic.feature
            values = [row.get(feature) if isinstance(row, dict) else None for row in self.inputs]
            if len(values) < 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                          for v in values):
                raise ValueError(f"monotonic in {feature!r} needs at least two input rows, each "
                                 f"a mapping with a number for {feature!r}")
            if len(set(values)) < 2:
                raise ValueError(f"monotonic in {feature!r}: the rows must differ in {feature!r}")
        return self

    @property
    def signal(self) -> str:
        """The telemetry signal of its runs (n: runs, sum: failed runs)."""
        return f"probe:{self.name}"

    def describe(self) -> str:
        checks = []
        if self.expect is not None:
            near = f" (±{self.tolerance:g})" if self.tolerance else ""
            checks.append(f"answers as expected{near}")
        if self.range is not None:
            checks.append(f"within [{self.range[0]:g}, {self.range[1]:g}]")
        if self.classes is not None:
            checks.append(f"in classes {{{', '.join(map(str, self.classes))}}}")
        if self.monotonic is not None:
            checks.append(f"{self.monotonic.direction} in {self.monotonic.feature}")
        n = len(self.inputs)
        return f"probe {self.name}: {n} golden input{'s' if n != 1 else ''}, " \
            f"{' and '.join(checks)}"


class Registry(_Strict):
    """The MLflow model registry the plan's ``models:/`` references live in, and what a
    promotion does there."""

    uri: str | None = Field(
        default=None, min_length=1, description="the registry (tracking) URI, e.g. "
        "sqlite:////abs/path/mlflow.db or http://mlflow:5000; default: MLflow's "
        "MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI")
    promote_alias: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,255}$",
        description="on promotion, point this alias (e.g. champion) at the candidate's version; "
        "a rollback leaves it")

    @field_validator("promote_alias")
    @classmethod
    def _not_reserved(cls, value: str | None) -> str | None:
        if value is not None and (value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value)):
            raise ValueError(f"alias {value!r} is reserved by MLflow (latest, or v and a "
                             "number); choose another, e.g. champion")
        return value


class Challenger(ModelSpec):
    """Another candidate that competes with ``candidate`` in an experiment stage."""

    name: Name


class Experiment(_Strict):
    """A bandit over the candidate and the challengers inside a stage's candidate traffic.

    Thompson sampling (or top-two Thompson sampling, for identifying the best arm) moves the
    stage's candidate traffic towards the arm that does best on ``objective``; every arm is
    still judged against the baseline by the guardrails' always-valid tests, an arm with
    proven harm is dropped, and the stage ends when one arm is the best with probability
    ``confidence`` and passes every guardrail. That arm is the candidate from then on.
    """

    objective: Name = Field(description="the metric to optimise, e.g. accuracy")
    direction: Direction | None = Field(
        default=None, description="the direction in which the objective gets worse")
    method: Literal["thompson", "top_two"] = "thompson"
    floor: Share = Field(default=100, description="minimum share of the stage's candidate "
                         "traffic per arm (default 1%)")
    min_units: int = Field(default=100, ge=1, description="observations per arm before adapting")
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0,
                              description="probability of being best needed to pick a winner")


class Change(_Strict):
    """The change record: what changed, why, who owns it, how it was validated offline."""

    summary: str = Field(min_length=1)
    why: str | None = None
    owner: str | None = None
    validation: str | None = Field(default=None, description="how it was validated offline")
    link: str | None = Field(default=None, description="ticket, pull request or model card")


class Targeting(_Strict):
    """Rules that come before hashing. Keys are context attributes or the unit key."""

    always_candidate: dict[str, list[str]] = Field(
        default_factory=dict, description="units that get the candidate in every canary stage"
    )
    never_candidate: dict[str, list[str]] = Field(
        default_factory=dict, description="units that never get, nor are mirrored to, the candidate"
    )
    anonymous: Literal["baseline", "random"] = Field(
        default="baseline",
        description="requests without a unit id: always the baseline, or a random draw at the "
        "stage's share (not sticky)",
    )


MAX_URL = 2048
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _http_url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        host = urlsplit(value).hostname
    except ValueError:
        host = None
    if not value.startswith(("http://", "https://")) or not host or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an http(s) URL; write it like "
                         "https://hooks.example.com/safeshift")
    if len(value) > MAX_URL:
        raise ValueError(f"a URL of at most {MAX_URL} characters, please")
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise ValueError(f"{value!r} is not an environment variable name: use letters, digits and "
                         "'_', not starting with a digit, e.g. SAFESHIFT_WEBHOOK_SECRET (the secret "
                         "itself goes in that variable, never in the plan)")
    return value


MAX_CONFIRM_TIMEOUT = 30.0
"""A confirm hook is called from the controller's tick, which waits for it."""


def _confirm_timeout(seconds: float) -> float:
    if seconds > MAX_CONFIRM_TIMEOUT:
        raise ValueError(f"at most {MAX_CONFIRM_TIMEOUT:g}s: the controller's tick waits for the "
                         "hook, and a tick that waits too long delays rollbacks; 2s is typical")
    return seconds


WebhookUrl = Annotated[str, AfterValidator(_http_url), WithJsonSchema({
    "type": "string", "maxLength": MAX_URL, "pattern": r"^https?://[^\s/?#]+[^\s]*$",
    "description": "an http:// or https:// URL"})]
SecretEnv = Annotated[str, AfterValidator(_env_name), WithJsonSchema({
    "type": "string", "pattern": _ENV_NAME.pattern,
    "description": "the name of the environment variable holding the HMAC-SHA256 secret"})]

NotifyEvent = Literal["stage_change", "awaiting_approval", "rollback", "pause", "promotion"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("stage_change", "awaiting_approval", "rollback", "pause",
                                          "promotion")
"""What a webhook can be told of (see :mod:`safeshift.notify` for which decision is which)."""


class Webhook(_Strict):
    """A receiver told of the rollout's decisions (at least once each, in order, signed with
    HMAC-SHA256 when ``secret_env`` names the variable holding the secret)."""

    url: WebhookUrl
    events: list[NotifyEvent] = Field(
        default_factory=lambda: list(NOTIFY_EVENTS), min_length=1,
        description="which decisions to send: stage_change, awaiting_approval, rollback, pause "
        "(and resume), promotion (default all)")
    format: Literal["json", "slack"] = Field(
        default="json", description="json: safeshift's payload; slack: an incoming-webhook message")
    secret_env: SecretEnv | None = Field(
        default=None, description="environment variable holding the signing secret")


class Confirm(_Strict):
    """A hook asked before a stage starts: the controller POSTs the proposed transition and
    holds (the previous stage keeps running) until the hook answers 200 with ``{"go": true}``."""

    url: WebhookUrl
    secret_env: SecretEnv | None = Field(
        default=None, description="environment variable holding the signing secret")
    timeout: Annotated[PositiveDuration, AfterValidator(_confirm_timeout)] = Field(
        default=2.0, description="how long one call may take (at most 30s); a hook that does "
        "not answer in time holds the rollout")


_NOT_NULL = {"not": {"type": "null"}}
_STAGE_SCHEMA_EXTRA: dict[str, Any] = {"allOf": [
    # holdback needs watch and traffic: 100%; watch needs holdback
    {"if": {"required": ["holdback"], "properties": {"holdback": _NOT_NULL}},
     "then": {"required": ["watch", "traffic"],
              "properties": {"watch": _NOT_NULL, "traffic": FULL_TRAFFIC_SCHEMA}}},
    {"if": {"required": ["watch"], "properties": {"watch": _NOT_NULL}},
     "then": {"required": ["holdback"], "properties": {"holdback": _NOT_NULL}}},
]}


class Approval(_Strict):
    """Who must approve a stage: ``approvers`` distinct principals holding ``role`` or higher
    (the two-person rule is ``approvers: 2``), and whether the rollout's creator is one."""

    role: Literal["operator", "approver", "admin"] = Field(
        default="approver", description="the least role an approver holds")
    approvers: int = Field(default=1, ge=1, le=5, description="distinct approvers needed")
    creator_may_approve: bool = Field(
        default=True, description="whether whoever created the rollout may be one of them")


class Review(_Strict):
    """A sign-off a stage needs before it starts, by a principal whose token holds the review
    role (``safeshift token create --reviews privacy``), e.g. privacy, product, legal."""

    role: Name = Field(description="the review role, e.g. privacy")
    note: str | None = Field(default=None, max_length=200,
                             description="what the reviewer checks, e.g. copy checked")


class Stage(_Strict):
    """One step of the rollout."""

    model_config = ConfigDict(json_schema_extra=_STAGE_SCHEMA_EXTRA)

    name: Name
    traffic: Share = Field(default=0, description="share of units served by the candidate")
    shadow: Share = Field(
        default=0, description="share of requests mirrored to the candidate (users see baseline)"
    )
    min_duration: Duration = 0.0
    max_duration: PositiveDuration | None = Field(
        default=None, description="after this, an inconclusive stage follows on_inconclusive"
    )
    min_samples: int = Field(default=0, ge=0, description="minimum samples per arm")
    expected_samples: int | None = Field(
        default=None,
        gt=0,
        description="candidate samples the stage is expected to see; tunes the sequential "
        "test (defaults to max(min_samples, analysis.expected_samples))",
    )
    approval: Annotated[
        Annotated[Literal["required", "none"], Tag("word")] | Annotated[Approval, Tag("rule")],
        Discriminator(lambda v: "rule" if isinstance(v, dict | Approval) else "word"),
        WithJsonSchema({"anyOf": [
            {"enum": ["required", "none"]}, {"type": "boolean"},
            {"type": "object", "additionalProperties": False, "properties": {
                "role": {"enum": ["operator", "approver", "admin"], "default": "approver"},
                "approvers": {"type": "integer", "minimum": 1, "maximum": 5, "default": 1},
                "creator_may_approve": {"type": "boolean", "default": True}}}],
            "description": "whether people must approve before this stage starts: required "
                           "(one approver), or who and how many"}),
    ] = "none"
    reviews: list[Review] = Field(
        default_factory=list, max_length=8,
        description="sign-offs by role needed before this stage starts (it waits; it never "
                    "skips), e.g. [{role: privacy}, {role: product, note: copy checked}]")
    experiment: Experiment | None = Field(
        default=None, description="split the candidate traffic among the candidate and the "
        "plan's challengers with a bandit, and pick a winner")
    holdback: HoldbackShare | None = Field(
        default=None, description="last stage at 100% only: share of units kept on the baseline "
        "after promotion, judged by the guardrails for `watch`; a proven regression rolls back")
    confirm: Confirm | None = Field(
        default=None, description="a hook that must answer go before this stage starts "
        "(advancing into it, or promotion into it)")
    watch: PositiveDuration | None = Field(
        default=None, description="how long the holdback after promotion runs (required with "
        "holdback)")

    @field_validator("approval", mode="before")
    @classmethod
    def _bool_approval(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "required" if value else "none"
        return value

    @property
    def approval_rule(self) -> Approval | None:
        """Who must approve before the stage starts, or None when nobody need."""
        if isinstance(self.approval, Approval):
            return self.approval
        return Approval() if self.approval == "required" else None

    @property
    def gated(self) -> bool:
        """Whether people must act (approve, or sign off reviews) before the stage starts."""
        return self.approval_rule is not None or bool(self.reviews)

    @property
    def is_shadow(self) -> bool:
        return self.shadow > 0 and self.traffic == 0

    @property
    def is_full(self) -> bool:
        return self.traffic >= BASIS_POINTS

    @property
    def served(self) -> int:
        """Basis points of units the candidate serves while this stage runs: its traffic,
        less the holdback that stays on the baseline during the watch after promotion."""
        return self.traffic - (self.holdback or 0)


class Direction(StrEnum):
    """Which way a metric moves when the candidate is worse."""

    INCREASE = "increase"
    DECREASE = "decrease"


class Source(StrEnum):
    """Where a metric's observations come from."""

    REQUEST = "request"  # measured while serving: errors, latency
    FEEDBACK = "feedback"  # labels and outcomes that arrive later
    SHADOW = "shadow"  # pairwise comparison of both answers to one input
    REPORT = "report"  # user issue reports per request
    PROMETHEUS = "prometheus"  # one PromQL value per arm and interval (safeshift.promql)


class MetricInfo(BaseModel):
    """What safeshift knows about a built-in metric."""

    model_config = ConfigDict(frozen=True)
    source: Source
    bad: Direction
    rate: bool  # a proportion (0/1 per observation) rather than a mean


BUILTIN_METRICS: dict[str, MetricInfo] = {
    "error_rate": MetricInfo(source=Source.REQUEST, bad=Direction.INCREASE, rate=True),
    "latency_ms": MetricInfo(source=Source.REQUEST, bad=Direction.INCREASE, rate=False),
    "accuracy": MetricInfo(source=Source.FEEDBACK, bad=Direction.DECREASE, rate=True),
    "abs_error": MetricInfo(source=Source.FEEDBACK, bad=Direction.INCREASE, rate=False),
    "disagreement": MetricInfo(source=Source.SHADOW, bad=Direction.INCREASE, rate=True),
    "score_diff": MetricInfo(source=Source.SHADOW, bad=Direction.INCREASE, rate=False),
    "report_rate": MetricInfo(source=Source.REPORT, bad=Direction.INCREASE, rate=True),
    # population stability index of the candidate's predictions against the baseline's
    "prediction_drift": MetricInfo(source=Source.REQUEST, bad=Direction.INCREASE, rate=False),
}


OUTCOME_LIMIT = 1e9
"""Outcome values (and numeric labels where ``abs_error`` is guarded) must lie within
±``OUTCOME_LIMIT`` unless a guardrail declares a narrower ``range``: the sequential tests keep
running sums of squares, and one absurd value such as 1e308 would overflow them and freeze a
guardrail (or swamp it)."""


PROM_PLACEHOLDERS = ("arm", "version", "stage")
"""What a Prometheus guardrail's query may name: ``{{arm}}`` (baseline, candidate or a
challenger's name: the gateway's ``arm`` label), ``{{version}}`` (that arm's version label in
the plan) and ``{{stage}}`` (the running stage's name)."""

MIN_PROM_SAMPLES = 10
"""Interval values per arm below which a Prometheus guardrail is not judged: each value is
already an average over an interval's requests, so fewer are needed than requests, but the
normal approximation of the test still needs some."""

MAX_PROM_TIMEOUT = 30.0

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_PROM_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROM_RANGE = re.compile(r"\[\s*([^\]:]*?)\s*(?::[^\]]*)?\]")
_PROM_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_PROM_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
              "y": 31536000.0}


def prom_ranges(query: str) -> list[tuple[str, float]]:
    """The range selectors (and subquery ranges) of a PromQL query, as written and in seconds,
    string literals (where brackets mean regular expressions) left out."""
    bare = _PROM_STRING.sub('""', _PLACEHOLDER.sub("x", query))
    out = []
    for m in _PROM_RANGE.finditer(bare):
        text = m.group(1)
        parts = _PROM_DURATION.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"[{text}] is not a PromQL duration: write it like 15s, 1m or 1m30s")
        out.append((text, sum(int(n) * _PROM_UNIT[u] for n, u in parts)))
    return out


def _prom_timeout(seconds: float) -> float:
    if seconds > MAX_PROM_TIMEOUT:
        raise ValueError(f"at most {MAX_PROM_TIMEOUT:g}s: a Prometheus that takes longer is "
                         "treated as unreachable (the rollout holds); 5s is typical")
    return seconds


def _prom_interval(seconds: float) -> float:
    if seconds < 1.0:
        raise ValueError("at least 1s: Prometheus scrapes every few seconds, so values read more "
                         "often repeat the same scrapes")
    return seconds


def _prom_token_env(name: str) -> str:
    if not name.startswith("PROMETHEUS_"):
        raise ValueError(f"{name!r}: the token is sent to the plan's Prometheus URL, so only a "
                         "variable named PROMETHEUS_* may hold it (a plan must not be able to "
                         "send the server's other secrets anywhere); e.g. PROMETHEUS_TOKEN")
    return name


PromTokenEnv = Annotated[SecretEnv, AfterValidator(_prom_token_env), WithJsonSchema({
    "type": "string", "pattern": r"^PROMETHEUS_[A-Za-z0-9_]{0,116}$",
    "description": "the environment variable holding the bearer token (PROMETHEUS_*)"})]


class PrometheusQuery(_Strict):
    """Where a guardrail's measurements come from when Prometheus has them: one PromQL instant
    query per arm every ``interval``, each value one observation (see :mod:`safeshift.promql`
    for what makes the test valid on such values)."""

    url: WebhookUrl = Field(description="the Prometheus server, e.g. http://prometheus:9090")
    query: str = Field(
        min_length=1, max_length=4096,
        description="PromQL returning one number for one arm, with {{arm}} (and optionally "
        "{{version}}, {{stage}}) where the arm goes, e.g. 1000 * sum(rate(safeshift_model_"
        "duration_seconds_sum{arm=\"{{arm}}\"}[15s])) / sum(rate(safeshift_model_duration_"
        "seconds_count{arm=\"{{arm}}\"}[15s]))")
    interval: Annotated[PositiveDuration, AfterValidator(_prom_interval)] = Field(
        default=15.0, description="how often each arm's value is read: one observation per arm "
        "and interval; no range selector in the query may be longer")
    statistic: Literal["mean"] = Field(
        default="mean", description="what the guardrail estimates from the interval values: "
        "their mean over the stage, candidate against baseline")
    min_samples: int = Field(
        default=20, ge=MIN_PROM_SAMPLES, le=1_000_000,
        description="interval values per arm before the guardrail is judged")
    timeout: Annotated[PositiveDuration, AfterValidator(_prom_timeout)] = Field(
        default=5.0, description="how long one query may take (at most 30s); an unanswered "
        "query holds the rollout")
    token_env: PromTokenEnv | None = Field(
        default=None, description="environment variable holding a bearer token for Prometheus "
        "(named PROMETHEUS_*: the token is sent to the plan's URL)")

    @field_validator("query")
    @classmethod
    def _template(cls, query: str) -> str:
        names = _PLACEHOLDER.findall(query)
        unknown = sorted({n for n in names if n not in PROM_PLACEHOLDERS})
        if unknown:
            raise ValueError(f"unknown placeholder {{{{{unknown[0]}}}}}: the query may use "
                             + ", ".join(f"{{{{{p}}}}}" for p in PROM_PLACEHOLDERS))
        if not {"arm", "version"} & set(names):
            raise ValueError("the query must tell the arms apart with {{arm}} (or {{version}}): "
                             "without it both arms read the same series, and the comparison "
                             "could never see a difference")
        if any(ord(c) < 32 and c not in "\t\n\r" for c in query):
            raise ValueError("the query has a control character; write it as plain text")
        prom_ranges(query)  # a malformed range selector is named here
        return query

    @model_validator(mode="after")
    def _windows(self) -> PrometheusQuery:
        for text, seconds in prom_ranges(self.query):
            if seconds > self.interval + 1e-9:
                raise ValueError(
                    f"the range [{text}] is longer than the interval "
                    f"({format_duration(self.interval)}): consecutive values would share "
                    "requests, so they are not independent and the test would be too sure; "
                    f"make the range at most the interval (e.g. [{format_duration(self.interval)}])"
                    " or the interval longer")
        return self

    def render(self, *, arm: str, version: str, stage: str) -> str:
        """The query for one arm, its placeholders filled in."""
        values = {"arm": arm, "version": version, "stage": stage}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.query)

    def expected_samples(self, stage: Stage) -> float:
        """Interval values per arm the stage is expected to give: the time scale of the test."""
        return max(float(self.min_samples), stage.min_duration / self.interval)


class Guardrail(_Strict):
    """A comparison of candidate against baseline (or an absolute bound on the candidate)."""

    metric: Name
    source: Source | None = Field(default=None, description="defaults from the metric")
    direction: Direction | None = Field(
        default=None, description="the direction in which the metric gets worse"
    )
    above: float | None = Field(
        default=None, description="judge the share of observations above this value instead"
    )
    tolerance: float | None = Field(
        default=None, ge=0, description="absolute non-inferiority margin"
    )
    relative_tolerance: Share | None = Field(
        default=None, description="relative non-inferiority margin, e.g. 5%"
    )
    max: float | None = Field(default=None, description="absolute upper bound on the candidate")
    min: float | None = Field(default=None, description="absolute lower bound on the candidate")
    strict: bool = Field(default=False, description="roll back on any proven harm, however small")
    stage: Annotated[
        list[Name] | None,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                  {"type": "null"}],
                        "description": "only judge in this stage or these stages"}),
    ] = None
    segments: bool = Field(default=True, description="also judge each segment")
    range: Annotated[
        tuple[float, float] | None,
        WithJsonSchema({"anyOf": [{"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "number", "minimum": -OUTCOME_LIMIT, "maximum": OUTCOME_LIMIT}},
            {"type": "null"}]}),
    ] = Field(
        default=None, description="outcome metrics sent as feedback only: the values an "
        f"outcome may take, [low, high] within ±{OUTCOME_LIMIT:g}; feedback outside is refused "
        f"(defaults to ±{OUTCOME_LIMIT:g})")
    prometheus: PrometheusQuery | None = Field(
        default=None, description="take the measurements from Prometheus (source: prometheus): "
        "one PromQL value per arm and interval")

    @field_validator("range")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is None:
            return None
        low, high = value
        if not low < high:
            raise ValueError(f"the range's low end ({low:g}) must be below its high end ({high:g})")
        if not (low >= -OUTCOME_LIMIT and high <= OUTCOME_LIMIT):
            raise ValueError(f"a range must lie within ±{OUTCOME_LIMIT:g}: larger values would "
                             "swamp the guardrails' sums; measure the outcome in a larger unit")
        return value

    @field_validator("stage", mode="before")
    @classmethod
    def _one_stage(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def info(self) -> MetricInfo:
        builtin = BUILTIN_METRICS.get(self.metric)
        source = self.source or (Source.PROMETHEUS if self.prometheus is not None
                                 else builtin.source if builtin else Source.FEEDBACK)
        bad = self.direction or (builtin.bad if builtin else Direction.INCREASE)
        rate = self.above is not None or (builtin.rate if builtin else False)
        return MetricInfo(source=source, bad=bad, rate=rate)

    @property
    def key(self) -> str:
        """The telemetry signal this guardrail reads, e.g. ``latency_ms>250``."""
        return self.metric if self.above is None else f"{self.metric}>{self.above:g}"

    @property
    def is_bound(self) -> bool:
        return self.max is not None or self.min is not None

    def applies_to(self, stage: Stage) -> bool:
        if self.stage is not None:
            return stage.name in self.stage
        # pairwise shadow metrics only exist where both models answer the same input
        return self.info.source is not Source.SHADOW or stage.is_shadow

    def describe(self) -> str:
        text = self.metric if self.above is None else f"share of {self.metric} > {self.above:g}"
        return text.replace("_", " ")


class Analysis(_Strict):
    """How evidence becomes decisions."""

    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="false-decision rate")
    on_inconclusive: Literal["hold", "rollback", "promote"] = Field(
        default="hold", description="what to do when a stage reaches max_duration undecided"
    )
    expected_samples: int = Field(
        default=2000, gt=0, description="default candidate samples per stage (tunes the test)"
    )
    srm_alpha: float = Field(default=0.001, gt=0, lt=0.5)
    srm_min_deviation: float = Field(
        default=0.05, ge=0, lt=1,
        description="smallest relative deviation of the candidate's share that can count as a "
        "sample-ratio mismatch (5%: 30% observed as 28.5%)")
    segment_min_samples: int = Field(
        default=100, ge=1, description="a segment smaller than this per arm is not judged"
    )
    max_segment_values: int = Field(
        default=50, ge=1, description="values per segment attribute beyond this are pooled"
    )
    unit_buckets: int = Field(
        default=64, ge=16, le=1024,
        description="hash buckets units are grouped into for the unit-level variance")
    protected: Annotated[
        dict[SegmentName, Annotated[list[SegmentValue], Field(min_length=1)]],
        WithJsonSchema({"type": "object", "propertyNames": _SEGMENT_NAME_SCHEMA,
                        "additionalProperties": {"type": "array", "minItems": 1,
                                                 "items": _SEGMENT_VALUE_SCHEMA}}),
    ] = Field(
        default_factory=dict,
        description="segment values that must each prove safety before promotion, by segment "
        "attribute, e.g. {country: [BR, IN]}")


class Serving(_Strict):
    """Data-plane settings."""

    candidate_timeout: PositiveDuration = Field(default=0.25,
                                                description="per-call candidate timeout")
    breaker_failures: int = Field(default=20, ge=1, description="failures that open the breaker")
    breaker_window: PositiveDuration = Field(
        default=10.0, description="how far back the breaker counts failures")
    breaker_cooldown: PositiveDuration = Field(
        default=5.0, description="how long an open breaker keeps the candidate out")
    shadow_queue: int = Field(default=1000, ge=1, description="pending shadow copies kept")
    label_window: PositiveDuration = Field(default=7 * 86400.0,
                                           description="how long feedback is joined")
    telemetry_window: PositiveDuration = Field(default=60.0, description="aggregation window")
    refresh: PositiveDuration = Field(default=0.5,
                                      description="how often replicas re-read the stage")


class Consent(_Strict):
    """Which units may take part: those whose context ``attribute`` is one of ``granted``. The
    others are served by the baseline while a stage runs, never mirrored to the candidate, and
    counted in a cohort of their own that no comparison or split check reads."""

    attribute: SegmentName = Field(description="the context attribute that carries consent")
    granted: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["true", "yes", "1"], min_length=1,
        description="values (compared without case) that mean consent given")


class Retention(_Strict):
    """How long the store keeps each kind of record of the rollout (unset: as long as the
    store lives; request records also expire with the label window). The controller applies it
    as it runs; ``safeshift purge`` applies it, or another age, by hand."""

    requests: PositiveDuration | None = Field(
        default=None, description="request records (and their labels), by when they were served")
    reports: PositiveDuration | None = Field(
        default=None, description="the redacted text of user reports")
    telemetry: PositiveDuration | None = Field(
        default=None, description="telemetry windows, and decision inputs, of stages that ended "
        "(a running stage keeps its evidence)")
    snapshots: PositiveDuration | None = Field(
        default=None, description="verdict snapshots (the dashboard's bands over time)")


RETENTION_KINDS = ("requests", "reports", "telemetry", "snapshots")


class Plan(_Strict):
    """A whole rollout plan. Build one with :meth:`Plan.load` or :meth:`Plan.from_dict`."""

    rollout: RolloutName = Field(description="the rollout's unique name")
    endpoint: Name = Field(description="the logical model name clients call")
    baseline: ModelSpec
    candidate: ModelSpec
    challengers: list[Challenger] = Field(
        default_factory=list, description="more candidates, for an experiment stage")
    change: Change
    unit: str = Field(default="unit", min_length=1, description="the key that makes it sticky")
    segments: list[SegmentName] = Field(
        default_factory=list, max_length=MAX_SEGMENTS, json_schema_extra={"uniqueItems": True},
        description=f"context attributes analysed apart (at most {MAX_SEGMENTS}, each name at "
                    f"most {MAX_SEGMENT_NAME} characters, none of them the unit)")
    personal: list[SegmentName] = Field(
        default_factory=list, json_schema_extra={"uniqueItems": True},
        description="context attributes whose values are personal (e-mail, customer id): "
                    "replaced by a keyed pseudonym before anything is stored, logged or shown; "
                    "plan rules on them list pseudonyms (safeshift pseudonym ATTR VALUE)")
    consent: Consent | None = Field(
        default=None, description="only units that consented take part in the comparison")
    targeting: Targeting = Field(default_factory=Targeting)
    stages: list[Stage] = Field(min_length=1)
    guardrails: list[Guardrail] = Field(default_factory=list)
    analysis: Analysis = Field(default_factory=Analysis)
    serving: Serving = Field(default_factory=Serving)
    notifications: list[Webhook] = Field(
        default_factory=list, description="webhooks told of the rollout's decisions")
    retention: Retention = Field(default_factory=Retention)
    registry: Registry | None = Field(
        default=None, description="the MLflow model registry of models:/ references, and the "
        "alias a promotion moves")
    probes: list[Probe] = Field(
        default_factory=list, max_length=MAX_PROBES, description="golden inputs sent to the "
        "candidate on a schedule in every stage, never to users; a failing probe rolls back")

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """Directory that relative model paths are resolved against."""
        return self._base_dir

    @property
    def registry_uri(self) -> str | None:
        """The MLflow registry its ``models:/`` references live in (None: MLflow's environment)."""
        return self.registry.uri if self.registry else None

    @property
    def salt(self) -> str:
        """Per-rollout hashing salt: units are re-shuffled between rollouts."""
        return self.rollout

    def stage_index(self, name: str) -> int:
        for i, stage in enumerate(self.stages):
            if stage.name == name:
                return i
        raise KeyError(name)

    def variant(self, name: str) -> ModelSpec:
        """The model spec of the candidate (``"candidate"``) or of a challenger, by name."""
        if name == "candidate":
            return self.candidate
        if name == "baseline":
            return self.baseline
        for c in self.challengers:
            if c.name == name:
                return c
        raise KeyError(f"no candidate or challenger named {name!r}")

    @property
    def variants(self) -> list[str]:
        """The candidate and the challengers, by name."""
        return ["candidate", *(c.name for c in self.challengers)]

    def outcome_ranges(self) -> dict[str, tuple[float, float]]:
        """The range each outcome metric's values must lie in, where a guardrail declares one
        (others: ±:data:`OUTCOME_LIMIT`, built-in rates [0, 1])."""
        return {g.metric: g.range for g in self.guardrails if g.range is not None}

    def guardrails_for(self, stage: Stage) -> list[Guardrail]:
        return [g for g in self.guardrails if g.applies_to(stage)]

    def canonical(self) -> dict[str, Any]:
        """The plan as plain JSON data with its defaults: what the store keeps, what the hash
        covers. Fields added after plans were first stored are left out at their defaults, so
        a plan that does not use them keeps the hash it was registered with."""
        data = self.model_dump(mode="json", exclude_none=True)
        for later in ("notifications", "personal", "retention", "probes"):  # added later: absent unless used
            if not data.get(later):
                data.pop(later, None)
        for stage in data["stages"]:
            if not stage.get("reviews"):
                stage.pop("reviews", None)
        for section, defaults in _LATER_DEFAULTS.items():
            for name, default in defaults.items():
                if data[section].get(name) == default:
                    del data[section][name]
        return data

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON form: two plans with one meaning share one hash."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: Any, *, base_dir: Path | str | None = None, source: str = "plan"
    ) -> Plan:
        """Validate ``data``; raise :class:`PlanValidationError` listing every problem."""
        if not isinstance(data, dict):
            raise PlanValidationError(
                [Problem("", "a plan must be a mapping of fields (rollout, endpoint, stages, ...)")],
                source,
            )
        non_finite = non_finite_problems(data)
        try:
            plan = cls.model_validate(data)
        except ValidationError as exc:
            # a NaN is named once, by the scan, however the field's own parser words it
            rest = [pr for pr in _problems(exc)
                    if not any(_within(pr.path, bad.path) for bad in non_finite)]
            raise PlanValidationError([*non_finite, *rest], source) from None
        if non_finite:  # every field refuses them already; this is the safety net
            raise PlanValidationError(non_finite, source)
        plan._base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        problems = semantic_problems(plan)
        if problems:
            raise PlanValidationError(problems, source)
        return plan

    @classmethod
    def load(cls, path: Path | str) -> Plan:
        """Read a YAML or JSON plan file; duplicate keys are listed with every other problem."""
        data, duplicates = _read_document(path)
        return cls._checked(data, duplicates, Path(path).resolve().parent, str(path))

    @classmethod
    def from_json_text(cls, text: str, *, source: str, base_dir: Path | str | None = None
                       ) -> Plan:
        """A plan sent as JSON text (the control API): duplicate keys are problems too."""
        data, duplicates = _parse_json(text, Path(source))
        return cls._checked(data, duplicates, base_dir, source)

    @classmethod
    def _checked(cls, data: Any, duplicates: list[Problem], base_dir: Path | str | None,
                 source: str) -> Plan:
        try:
            plan = cls.from_dict(data, base_dir=base_dir, source=source)
        except PlanValidationError as exc:
            if not duplicates:
                raise
            raise PlanValidationError([*duplicates, *exc.problems], source) from None
        if duplicates:
            raise PlanValidationError(duplicates, source)
        if DRILL_MARK in plan.rollout:
            raise PlanValidationError([Problem("rollout", f"{DRILL_MARK!r} names are kept for "
                                               "the copies safeshift drill makes; use "
                                               "another name")], source)
        return plan


_LATER_DEFAULTS: dict[str, dict[str, Any]] = {"analysis": {"unit_buckets": 64, "protected": {}}}
"""Canonical-form defaults that :meth:`Plan.canonical` leaves out (see there)."""


def read_plan_file(path: Path | str) -> Any:
    """Parse a plan file's YAML/JSON text; one clear :class:`PlanError` on failure, and a
    :class:`PlanValidationError` naming each duplicate key."""
    data, duplicates = _read_document(path)
    if duplicates:
        raise PlanValidationError(duplicates, str(path))
    return data


def _read_document(path: Path | str) -> tuple[Any, list[Problem]]:
    """The file's data and its duplicate keys (``.json`` files are read as strict JSON)."""
    p = Path(path)
    if not p.exists():
        raise PlanError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise PlanError(f"{p}: is a directory; give the plan file inside it")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{p}: cannot read it ({exc})") from None
    if p.suffix.lower() == ".json":
        return _parse_json(text, p)
    return _parse_yaml(text, p)


def _parse_yaml(text: str, p: Path) -> tuple[Any, list[Problem]]:
    loader = PlanLoader(text)
    try:
        return loader.load_plan_document()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        kind = "refused" if isinstance(exc, yaml.constructor.ConstructorError) else "not valid YAML"
        raise PlanError(f"{p}: {kind}{where}: {problem}") from None
    finally:
        loader.dispose()


class PlanLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (plain data only: no tag can run code) that also finds
    duplicate keys, which plain YAML loading settles silently by keeping the last one."""

    def refuse_tag(self, node: yaml.Node) -> Any:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise yaml.constructor.ConstructorError(
            None, None, f"the tag {tag} is not allowed: a plan is plain data and no code runs "
            "when it is loaded; remove the tag", node.start_mark)

    def load_plan_document(self) -> tuple[Any, list[Problem]]:
        """The single document's data, and a problem for each duplicate key in it."""
        node = self.get_single_node()
        if node is None:
            return None, []
        duplicates: list[Problem] = []
        self._find_duplicates(node, "", duplicates, set())
        return self.construct_document(node), duplicates

    def _find_duplicates(self, node: yaml.Node, path: str, out: list[Problem],
                         seen: set[int]) -> None:
        if id(node) in seen:  # an alias: checked where its anchor is (and no cycles)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._find_duplicates(item, _join(path, i), out, seen)
        elif isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: keys written next to it override, by design
                key = self.construct_object(key_node, deep=True) if isinstance(
                    key_node, yaml.ScalarNode) else None
                where = _join(path, key)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key) if key is not None else None
                    if first is None:
                        lines[key] = line
                except TypeError:  # an unhashable key; the schema refuses it anyway
                    first = None
                if first is not None:
                    out.append(Problem(where, f"duplicate key {key!r} (line {first}, again at line "
                                       f"{line}): only the last would count; keep one"))
                self._find_duplicates(value_node, where, out, seen)


PlanLoader.add_constructor(None, PlanLoader.refuse_tag)  # every tag SafeLoader does not know


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers the keys it saw more than once."""

    duplicates: dict[str, int]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = {}
    for key, value in pairs:
        if key in obj:
            obj.duplicates[key] = obj.duplicates.get(key, 1) + 1
        obj[key] = value
    return obj


def _parse_json(text: str, p: Path) -> tuple[Any, list[Problem]]:
    try:
        data = json.loads(text.lstrip("\ufeff"), object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{p}: not valid JSON at line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}") from None
    duplicates: list[Problem] = []
    return _plain_json(data, "", duplicates), duplicates


def _plain_json(value: Any, path: str, out: list[Problem]) -> Any:
    """``value`` with plain dicts, noting each duplicate key with its path."""
    if isinstance(value, list):
        return [_plain_json(v, _join(path, i), out) for i, v in enumerate(value)]
    if isinstance(value, _JsonObject):
        for key, n in value.duplicates.items():
            out.append(Problem(_join(path, key), f"duplicate key {key!r} ({n} times): only the "
                               "last would count; keep one"))
        return {k: _plain_json(v, _join(path, k), out) for k, v in value.items()}
    return value


def _join(path: str, part: Any) -> str:
    return f"{path}.{part}" if path else str(part)


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def non_finite_problems(data: Any, path: str = "") -> list[Problem]:
    """NaN and infinity anywhere in raw plan data (YAML ``.nan``/``.inf``, JSON
    ``NaN``/``Infinity``): they compare false with every bound, so they switch checks off."""
    if isinstance(data, float) and not math.isfinite(data):
        return [Problem(path, f"{data} is not allowed: NaN and infinity compare false with every "
                        "bound and would switch this check off; write a finite number")]
    if isinstance(data, dict):
        return [pr for k, v in data.items() for pr in non_finite_problems(v, _join(path, k))]
    if isinstance(data, list | tuple):
        return [pr for i, v in enumerate(data) for pr in non_finite_problems(v, _join(path, i))]
    return []


_UNION_TAGS = frozenset({"rule", "word"})


def _problems(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        # union tags (which branch of a tagged union failed) are not fields of the plan
        path = ".".join(str(part) for part in err["loc"] if part not in _UNION_TAGS)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "literal_error" and path.endswith(".approval"):
            msg = ("write required, none, true, false, or {role, approvers, "
                   "creator_may_approve}")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against `safeshift schema`"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "finite_number":
            msg = ("NaN and infinity are not allowed: they compare false with every bound and "
                   "would switch this check off; write a finite number")
        out.append(Problem(path, msg))
    return out


def semantic_problems(plan: Plan) -> list[Problem]:
    """Checks that span fields: unique names, references between fields, reachable stages,
    and that no stage can pass, nor a guardrail go quiet, without anything being judged."""
    problems: list[Problem] = []
    names = [s.name for s in plan.stages]
    probe_names = [p.name for p in plan.probes]
    for i, name in enumerate(probe_names):
        if name in probe_names[:i]:
            problems.append(Problem(f"probes.{i}.name", f"probe name {name!r} is used twice; "
                                    "name each probe once"))
    last = len(plan.stages) - 1
    for i, stage in enumerate(plan.stages):
        where = f"stages.{i}"
        problems += _holdback_problems(plan, i, where, is_last=i == last)
        if stage.is_full and i != last:
            problems.append(Problem(f"{where}.traffic", "a 100% stage is promotion, so the stages "
                                    "after it would never run; make it the last stage"))
        passes_on_evidence = not stage.is_full or stage.holdback is not None
        if passes_on_evidence and not plan.guardrails_for(stage):
            problems.append(Problem(where, _unjudged(plan, stage)))
        if names.count(stage.name) > 1:
            problems.append(Problem(f"{where}.name", f"stage name {stage.name!r} is used twice"))
        if stage.traffic == 0 and stage.shadow == 0 and not _has_rules(plan):
            problems.append(Problem(where, "give the stage traffic (e.g. 5%) or shadow (e.g. 100%)"))
        if stage.traffic > 0 and stage.shadow > 0:
            problems.append(Problem(f"{where}.shadow", "a stage is either shadow or canary, not both"))
        if stage.max_duration is not None and stage.max_duration < stage.min_duration:
            problems.append(Problem(f"{where}.max_duration", "must not be shorter than min_duration"))
        arms = 1 + len(plan.challengers)
        if stage.experiment is not None and stage.experiment.floor * arms > BASIS_POINTS:
            problems.append(Problem(f"{where}.experiment.floor", f"{arms} arms at a floor of "
                                    f"{format_share(stage.experiment.floor)} each need more than "
                                    "all of the stage's traffic; lower the floor"))
        if i > 0 and 0 < stage.traffic < plan.stages[i - 1].traffic:
            problems.append(
                Problem(f"{where}.traffic", "traffic must not shrink from one stage to the next")
            )
    if plan.registry is not None and plan.registry.promote_alias is not None \
            and not plan.candidate.model.startswith("models:"):
        problems.append(Problem("registry.promote_alias", "only a registry model has an alias "
                                "to move: make candidate.model models:/NAME@ALIAS or "
                                "models:/NAME/VERSION, or remove promote_alias"))
    if plan.stages and plan.stages[-1].is_full and plan.stages[-1].min_samples:
        problems.append(Problem(f"stages.{len(names) - 1}.min_samples",
                                "a 100% stage has no baseline to compare with; remove min_samples"))
    experiments = [i for i, st in enumerate(plan.stages) if st.experiment is not None]
    for i in experiments:
        stage = plan.stages[i]
        if not plan.challengers:
            problems.append(Problem(f"stages.{i}.experiment",
                                    "an experiment needs challengers: add them under challengers"))
        if stage.traffic == 0 or stage.is_full:
            problems.append(Problem(f"stages.{i}.traffic",
                                    "an experiment stage needs a traffic share between 0% and 100%"))
    if len(experiments) > 1:
        problems.append(Problem(f"stages.{experiments[1]}.experiment",
                                "only one experiment stage per plan"))
    if plan.challengers and not experiments:
        problems.append(Problem("challengers", "challengers compete only in an experiment stage; "
                                "add experiment: {objective: ...} to a stage"))
    seen: set[str] = set()
    for i, c in enumerate(plan.challengers):
        if c.name in {"baseline", "candidate"} or c.name in seen:
            problems.append(Problem(f"challengers.{i}.name",
                                    f"{c.name!r} is taken; give each challenger its own name"))
        seen.add(c.name)
    for i, g in enumerate(plan.guardrails):
        where = f"guardrails.{i}"
        margins = [g.tolerance is not None, g.relative_tolerance is not None, g.is_bound]
        if sum(margins) == 0 and not g.strict:
            problems.append(Problem(where, "give tolerance, relative_tolerance, max or min"))
        if g.tolerance is not None and g.relative_tolerance is not None:
            problems.append(Problem(f"{where}.relative_tolerance",
                                    "give tolerance or relative_tolerance, not both"))
        if g.is_bound and (g.tolerance is not None or g.relative_tolerance is not None):
            problems.append(Problem(where, "an absolute bound (max/min) takes no tolerance"))
        for name in g.stage or []:
            if name not in names:
                problems.append(Problem(f"{where}.stage",
                                        f"no stage named {name!r}; stages are {', '.join(names)}"))
        if g.metric == "prediction_drift" and (g.max is None or g.tolerance is not None
                                               or g.relative_tolerance is not None):
            problems.append(Problem(where, "prediction_drift takes a max (a PSI, e.g. 0.1 or 0.25)"))
        if g.metric not in BUILTIN_METRICS and g.direction is None and g.source is None:
            problems.append(Problem(
                f"{where}.direction",
                f"{g.metric!r} is not a built-in metric ({', '.join(BUILTIN_METRICS)}); "
                "say which way is worse with direction: increase|decrease",
            ))
        if g.min is not None and g.max is not None and g.min > g.max:
            problems.append(Problem(f"{where}.min", f"min {g.min:g} is above max {g.max:g}, so no "
                                    "value could pass; swap them"))
        if all(name in names for name in g.stage or []) and not _judged_by(plan, g):
            problems.append(Problem(where, _judges_nothing(plan, g)))
    problems += _duplicate_guardrails(plan)
    problems += _range_problems(plan)
    problems += _prometheus_problems(plan)
    for kind in ("always_candidate", "never_candidate"):
        for key in getattr(plan.targeting, kind):
            if not key:
                problems.append(Problem(f"targeting.{kind}", "empty attribute name"))
    problems += _segment_problems(plan)
    problems += _review_problems(plan)
    return problems


def _runs_guardrails(plan: Plan, index: int) -> bool:
    """Whether the controller runs the guardrails in stage ``index``: every stage below 100%;
    a 100% stage only when the rollout starts in it (entering one later is promotion) or when
    a holdback keeps comparing after promotion."""
    stage = plan.stages[index]
    return not stage.is_full or index == 0 or stage.holdback is not None


def _judged_by(plan: Plan, guardrail: Guardrail) -> list[str]:
    """The names of the stages in which ``guardrail`` is run."""
    return [s.name for i, s in enumerate(plan.stages)
            if _runs_guardrails(plan, i) and guardrail.applies_to(s)]


def _holdback_problems(plan: Plan, index: int, where: str, *, is_last: bool) -> list[Problem]:
    stage = plan.stages[index]
    problems = []
    if stage.holdback is not None:
        if index == 0:
            problems.append(Problem(f"{where}.holdback", "a holdback watches the candidate after "
                                    "promotion, so a stage must come before it"))
        elif stage.is_full and plan.stages[index - 1].traffic > stage.served:
            before = plan.stages[index - 1]
            problems.append(Problem(
                f"{where}.holdback", f"a holdback of {format_share(stage.holdback)} after stage "
                f"{before.name!r} at {format_share(before.traffic)} would move units that had "
                "the candidate back to the baseline; keep the holdback at most "
                f"{format_share(BASIS_POINTS - before.traffic)}"))
        if not is_last:
            problems.append(Problem(f"{where}.holdback", "only the last stage can have a holdback: "
                                    "it runs after promotion"))
        if not stage.is_full:
            problems.append(Problem(f"{where}.holdback", "a holdback needs traffic: 100% (it is "
                                    "the share that stays on the baseline after promotion)"))
        if stage.watch is None:
            problems.append(Problem(f"{where}.watch", "required with holdback: how long the "
                                    "holdback runs after promotion, e.g. 24h"))
    elif stage.watch is not None:
        problems.append(Problem(f"{where}.watch", "watch applies only with a holdback; add "
                                "holdback (e.g. 2%) or remove watch"))
    return problems


def _unjudged(plan: Plan, stage: Stage) -> str:
    what = ("the holdback after promotion" if stage.is_full else f"stage {stage.name!r}")
    text = (f"no guardrail judges {what}, so it would pass on time and samples alone; add a "
            "guardrail that applies to it")
    if plan.guardrails:
        text += (" (check the guardrails' stage lists; shadow metrics apply only to shadow "
                 "stages)")
    return text


def _judges_nothing(plan: Plan, g: Guardrail) -> str:
    text = "this guardrail judges no stage, so it could never stop the rollout: "
    if g.stage is not None:
        return text + ("the stages it names are entered by promotion at 100%, where nothing "
                       "is compared; name a stage before it (or give that stage a holdback)")
    if g.info.source is Source.SHADOW:
        return text + ("a shadow metric is judged only in shadow stages and this plan has none; "
                       "add a shadow stage, or name the stages with stage:")
    return text + "name the stages it should judge with stage:"


def _checks(g: Guardrail) -> set[str]:
    """What a guardrail tests on its signal: a comparison in a direction, or a side of a bound."""
    if not g.is_bound:
        return {f"compare:{g.info.bad}"}
    return {side for side, value in (("max", g.max), ("min", g.min)) if value is not None}


def _range_problems(plan: Plan) -> list[Problem]:
    problems: list[Problem] = []
    declared: dict[str, tuple[float, float]] = {}
    for i, g in enumerate(plan.guardrails):
        if g.range is None:
            continue
        where = f"guardrails.{i}.range"
        builtin = BUILTIN_METRICS.get(g.metric)
        if builtin is not None:
            why = ("a rate's values are 0 to 1 already" if builtin.rate else
                   f"{g.metric} is measured by safeshift, not sent as an outcome")
            problems.append(Problem(where, f"range applies to outcome metrics sent as feedback; "
                                    f"{why}: remove range"))
        elif g.info.source is not Source.FEEDBACK:
            problems.append(Problem(where, "range applies to outcome metrics sent as feedback "
                                    f"(source: feedback), not to source: {g.info.source}"))
        elif declared.setdefault(g.metric, g.range) != g.range:
            low, high = declared[g.metric]
            problems.append(Problem(where, f"another guardrail on {g.metric!r} declares the range "
                                    f"[{low:g}, {high:g}]: an outcome has one range; give both "
                                    "the same"))
    return problems


def _prometheus_problems(plan: Plan) -> list[Problem]:
    """A guardrail measured by Prometheus must be one whose test can be valid: its own metric
    name (the gateway's built-in signals are measured per request), a mean of interval values
    (no ``above``). It is judged on all traffic: Prometheus series carry no safeshift
    segments."""
    problems = []
    sources: dict[str, set[Source]] = {}
    for g in plan.guardrails:
        sources.setdefault(g.metric, set()).add(g.info.source)
    for i, g in enumerate(plan.guardrails):
        where = f"guardrails.{i}"
        if g.source is Source.PROMETHEUS and g.prometheus is None:
            problems.append(Problem(f"{where}.prometheus", "required with source: prometheus: "
                                    "{url: http://prometheus:9090, query: ...{{arm}}...}"))
        if g.prometheus is None:
            continue
        if g.source is not None and g.source is not Source.PROMETHEUS:
            problems.append(Problem(f"{where}.source", f"a guardrail with prometheus: takes its "
                                    f"measurements from Prometheus, not from {g.source}; remove "
                                    "source or write source: prometheus"))
        if g.metric in BUILTIN_METRICS:
            problems.append(Problem(f"{where}.metric", f"{g.metric!r} is measured by safeshift "
                                    "itself, request by request; give the Prometheus "
                                    "measurement a name of its own, e.g. p95_latency_ms"))
        elif len(sources[g.metric]) > 1:
            problems.append(Problem(f"{where}.metric", f"another guardrail measures {g.metric!r} "
                                    "from another source; one name, one source: rename one"))
        if g.strict:
            problems.append(Problem(f"{where}.strict", "a Prometheus guardrail needs a tolerance "
                                    "or a bound: each arm's values carry that arm's fixed mix of "
                                    "units, a difference more intervals never average away, so "
                                    "'any harm' would in time be proven by the mix alone"))
        if g.above is not None:
            problems.append(Problem(f"{where}.above", "a Prometheus value is judged as a mean of "
                                    "interval values; write the share in PromQL instead (e.g. "
                                    "the fraction of requests slower than 250ms) and compare it"))
    return problems


def _duplicate_guardrails(plan: Plan) -> list[Problem]:
    """Two guardrails that read the same signal (metric, ``above``, source) with the same kind
    of test in a common stage: their verdicts share one name and one would shadow the other."""
    problems = []
    stages = [set(_judged_by(plan, g)) for g in plan.guardrails]
    for j, g in enumerate(plan.guardrails):
        for i, h in enumerate(plan.guardrails[:j]):
            common = stages[i] & stages[j]
            if ((g.key, g.info.source) == (h.key, h.info.source) and _checks(g) & _checks(h)
                    and common):
                where = ", ".join(s.name for s in plan.stages if s.name in common)
                problems.append(Problem(f"guardrails.{j}", f"duplicates guardrails.{i}: both "
                                        f"judge {g.key} the same way in {where}; remove one, or "
                                        "give them stage lists that do not overlap"))
                break
    return problems


def _review_problems(plan: Plan) -> list[Problem]:
    problems = []
    for i, stage in enumerate(plan.stages):
        roles = [r.role for r in stage.reviews]
        for k, role in enumerate(roles):
            if role in roles[:k]:
                problems.append(Problem(f"stages.{i}.reviews.{k}", f"the {role} review is "
                                        "listed twice; a review is signed once"))
    return problems


def _segment_problems(plan: Plan) -> list[Problem]:
    problems = []
    for i, name in enumerate(plan.segments):
        if name == plan.unit:
            problems.append(Problem(f"segments.{i}", f"{name!r} is the unit attribute: every unit "
                                    "would be a segment of its own, too small to judge; segment by "
                                    "an attribute units share, such as country"))
        if name in plan.segments[:i]:
            problems.append(Problem(f"segments.{i}", f"{name!r} is listed twice; keep one"))
    from safeshift.pseudonym import is_pseudonym

    personal = set(plan.personal)
    for i, name in enumerate(plan.personal):
        if name in plan.personal[:i]:
            problems.append(Problem(f"personal.{i}", f"{name!r} is listed twice; keep one"))
    rules = [(f"targeting.{kind}", getattr(plan.targeting, kind))
             for kind in ("always_candidate", "never_candidate")]
    rules.append(("analysis.protected", plan.analysis.protected))
    for section, by_attr in rules:
        for attr, values in by_attr.items():
            if attr not in personal:
                continue
            for k, value in enumerate(values):
                if not is_pseudonym(str(value)):
                    problems.append(Problem(
                        f"{section}.{attr}.{k}", f"{attr} is personal, so the plan (which the "
                        "store keeps) must not hold its values: list the pseudonym instead, "
                        f"printed by: safeshift pseudonym {attr} VALUE"))
    never = plan.targeting.never_candidate
    for attr, values in plan.analysis.protected.items():
        where = f"analysis.protected.{attr}"
        if attr not in plan.segments:
            listed = ", ".join(plan.segments) or "none"
            problems.append(Problem(where, f"{attr!r} is not one of segments ({listed}); protect "
                                    f"values of a segment attribute, or add {attr!r} to segments"))
        for k, value in enumerate(values):
            if value in never.get(attr, []):
                problems.append(Problem(f"{where}.{k}", f"{attr}={value} never gets the candidate "
                                        "(targeting.never_candidate), so it could never prove "
                                        "safety; remove it from one of the two"))
    return problems




def _has_rules(plan: Plan) -> bool:
    return bool(plan.targeting.always_candidate)


def tolerance_warnings(plan: Plan) -> list[str]:
    """Things that validate but will not behave as the author probably hopes."""
    warnings = []
    for i, g in enumerate(plan.guardrails):
        if g.tolerance == 0 and g.relative_tolerance in (None, 0):
            warnings.append(
                f"guardrails.{i}: tolerance 0 means safety can never be proven, so stages "
                "judged by it will not advance on evidence; give a small margin"
            )
    for i, s in enumerate(plan.stages):
        if s.max_duration is None and plan.analysis.on_inconclusive != "hold" and not s.is_full:
            warnings.append(f"stages.{i}: no max_duration, so on_inconclusive never applies")
    return warnings


def plan_warnings(plan: Plan) -> list[str]:
    """Everything ``safeshift validate`` warns of: :func:`tolerance_warnings`, and references
    written the old way."""
    warnings = tolerance_warnings(plan)
    sides = [("baseline", plan.baseline), ("candidate", plan.candidate)]
    sides += [(f"challengers.{i}", c) for i, c in enumerate(plan.challengers)]
    for where, spec in sides:
        if spec.model.startswith("mlflow:"):
            warnings.append(f"{where}.model: mlflow: is the older name of mlflow-server: (an "
                            "MLflow scoring server); write mlflow-server:URL (a registry model is "
                            "models:/NAME@ALIAS)")
    return warnings


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema of a plan file, for editors and CI checks. Checks that span fields
    (:func:`semantic_problems`) are left to ``safeshift validate`` where JSON Schema cannot
    say them; the at-most-one 100% stage part of "a 100% stage comes last" it can."""
    schema = Plan.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "safeshift rollout plan"
    schema["properties"]["stages"].update({
        "contains": {"required": ["traffic"], "properties": {"traffic": FULL_TRAFFIC_SCHEMA}},
        "minContains": 0, "maxContains": 1})
    return schema
