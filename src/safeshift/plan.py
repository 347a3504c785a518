"""The rollout plan: what changes, for whom, in which stages, judged by which guardrails.

A plan is a YAML or JSON file validated by pydantic. :func:`load_plan` reads one and
reports every problem at once, each with its field path; :func:`plan_json_schema` gives
the JSON Schema for editors.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from safeshift._units import (
    BASIS_POINTS,
    format_duration,
    format_share,
    parse_duration,
    parse_share,
)
from safeshift.errors import PlanError, PlanValidationError, Problem

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d)?|(\d+(\.\d+)?(ms|s|m|h|d))+)$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "a duration: 500ms, 30s, 10m, 2h, 7d, or seconds",
        }
    ),
]
"""Seconds, written in a plan as ``30s``, ``10m``, ``2h``."""

Share = Annotated[
    int,
    BeforeValidator(parse_share),
    PlainSerializer(format_share, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)?%$"},
                {"type": "number", "minimum": 0, "maximum": 1},
            ],
            "description": "a share of traffic: 5% or 0.05",
        }
    ),
]
"""Basis points (0..10000), written in a plan as ``5%`` or ``0.05``."""

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


def _check_segment(value: str) -> str:
    if not 1 <= len(value) <= MAX_SEGMENT_NAME or "|" in value or "=" in value:
        raise ValueError(f"a segment is a context key of 1-{MAX_SEGMENT_NAME} characters "
                         "without '|' or '='")
    return value


SegmentName = Annotated[
    str, BeforeValidator(lambda v: _check_segment(v) if isinstance(v, str) else v),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_SEGMENT_NAME,
                    "pattern": r"^[^|=]+$"})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelSpec(_Strict):
    """One side of the comparison: a version label and where its model comes from."""

    version: str = Field(min_length=1, description="the version label reported to clients")
    model: str = Field(
        min_length=1,
        description="model reference: joblib:PATH, python:MODULE:CALLABLE, fake:NAME, "
        "oip:URL#MODEL or mlflow:URL (paths relative to the plan file)",
    )
    timeout: Duration | None = Field(
        default=None, description="per-call timeout (defaults to serving.candidate_timeout)"
    )

    @field_validator("model")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if ":" not in value or scheme not in MODEL_SCHEMES:
            raise ValueError(
                f"unknown model reference {value!r}; start it with one of "
                + ", ".join(f"{s}:" for s in MODEL_SCHEMES)
            )
        return value


MODEL_SCHEMES = ("joblib", "python", "fake", "oip", "mlflow")


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


class Stage(_Strict):
    """One step of the rollout."""

    name: Name
    traffic: Share = Field(default=0, description="share of units served by the candidate")
    shadow: Share = Field(
        default=0, description="share of requests mirrored to the candidate (users see baseline)"
    )
    min_duration: Duration = 0.0
    max_duration: Duration | None = Field(
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
        Literal["required", "none"],
        WithJsonSchema({"anyOf": [{"enum": ["required", "none"]}, {"type": "boolean"}],
                        "description": "whether a person must approve before this stage starts"}),
    ] = "none"
    experiment: Experiment | None = Field(
        default=None, description="split the candidate traffic among the candidate and the "
        "plan's challengers with a bandit, and pick a winner")

    @field_validator("approval", mode="before")
    @classmethod
    def _bool_approval(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "required" if value else "none"
        return value

    @property
    def is_shadow(self) -> bool:
        return self.shadow > 0 and self.traffic == 0

    @property
    def is_full(self) -> bool:
        return self.traffic >= BASIS_POINTS


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

    @field_validator("stage", mode="before")
    @classmethod
    def _one_stage(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def info(self) -> MetricInfo:
        builtin = BUILTIN_METRICS.get(self.metric)
        source = self.source or (builtin.source if builtin else Source.FEEDBACK)
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


class Serving(_Strict):
    """Data-plane settings."""

    candidate_timeout: Duration = Field(default=0.25, description="per-call candidate timeout")
    breaker_failures: int = Field(default=20, ge=1, description="failures that open the breaker")
    breaker_window: Duration = 10.0
    breaker_cooldown: Duration = 5.0
    shadow_queue: int = Field(default=1000, ge=1, description="pending shadow copies kept")
    label_window: Duration = Field(default=7 * 86400.0, description="how long feedback is joined")
    telemetry_window: Duration = Field(default=60.0, gt=0, description="aggregation window")
    refresh: Duration = Field(default=0.5, description="how often replicas re-read the stage")


class Plan(_Strict):
    """A whole rollout plan. Build one with :meth:`Plan.load` or :meth:`Plan.from_dict`."""

    rollout: Name = Field(description="the rollout's unique name")
    endpoint: Name = Field(description="the logical model name clients call")
    baseline: ModelSpec
    candidate: ModelSpec
    challengers: list[Challenger] = Field(
        default_factory=list, description="more candidates, for an experiment stage")
    change: Change
    unit: str = Field(default="unit", min_length=1, description="the key that makes it sticky")
    segments: list[SegmentName] = Field(
        default_factory=list, max_length=MAX_SEGMENTS,
        description=f"context attributes analysed apart (at most {MAX_SEGMENTS}, each name at "
                    f"most {MAX_SEGMENT_NAME} characters)")
    targeting: Targeting = Field(default_factory=Targeting)
    stages: list[Stage] = Field(min_length=1)
    guardrails: list[Guardrail] = Field(default_factory=list)
    analysis: Analysis = Field(default_factory=Analysis)
    serving: Serving = Field(default_factory=Serving)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """Directory that relative model paths are resolved against."""
        return self._base_dir

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

    def guardrails_for(self, stage: Stage) -> list[Guardrail]:
        return [g for g in self.guardrails if g.applies_to(stage)]

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

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
        try:
            plan = cls.model_validate(data)
        except ValidationError as exc:
            raise PlanValidationError(_problems(exc), source) from None
        plan._base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        problems = semantic_problems(plan)
        if problems:
            raise PlanValidationError(problems, source)
        return plan

    @classmethod
    def load(cls, path: Path | str) -> Plan:
        """Read a YAML or JSON plan file."""
        return cls.from_dict(read_plan_file(path), base_dir=Path(path).resolve().parent,
                             source=str(path))


def read_plan_file(path: Path | str) -> Any:
    """Parse a plan file's YAML/JSON text; one clear :class:`PlanError` on failure."""
    p = Path(path)
    if not p.exists():
        raise PlanError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise PlanError(f"{p}: is a directory; give the plan file inside it")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{p}: cannot read it ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise PlanError(f"{p}: not valid YAML{where}: {problem}") from None


def _problems(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(part) for part in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against `safeshift schema`"
        elif err["type"] == "missing":
            msg = "required field is missing"
        out.append(Problem(path, msg))
    return out


def semantic_problems(plan: Plan) -> list[Problem]:
    """Checks that span fields: unique names, references between fields, reachable stages."""
    problems: list[Problem] = []
    names = [s.name for s in plan.stages]
    for i, stage in enumerate(plan.stages):
        where = f"stages.{i}"
        if names.count(stage.name) > 1:
            problems.append(Problem(f"{where}.name", f"stage name {stage.name!r} is used twice"))
        if stage.traffic == 0 and stage.shadow == 0 and not _has_rules(plan):
            problems.append(Problem(where, "give the stage traffic (e.g. 5%) or shadow (e.g. 100%)"))
        if stage.traffic > 0 and stage.shadow > 0:
            problems.append(Problem(f"{where}.shadow", "a stage is either shadow or canary, not both"))
        if stage.max_duration is not None and stage.max_duration < stage.min_duration:
            problems.append(Problem(f"{where}.max_duration", "must not be shorter than min_duration"))
        if i > 0 and 0 < stage.traffic < plan.stages[i - 1].traffic:
            problems.append(
                Problem(f"{where}.traffic", "traffic must not shrink from one stage to the next")
            )
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
    for kind in ("always_candidate", "never_candidate"):
        for key in getattr(plan.targeting, kind):
            if not key:
                problems.append(Problem(f"targeting.{kind}", "empty attribute name"))
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


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema of a plan file, for editors and CI checks."""
    schema = Plan.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "safeshift rollout plan"
    return schema
