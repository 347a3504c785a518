from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import ROOT, plan_dict

from safeshift import Plan, PlanError, PlanValidationError
from safeshift._units import format_duration, parse_duration, parse_share
from safeshift.plan import plan_json_schema, tolerance_warnings

EXAMPLE = ROOT / "examples" / "churn" / "plan.yaml"


def test_example_plan_validates_as_written() -> None:
    plan = Plan.load(EXAMPLE)
    assert plan.rollout == "churn-v2"
    assert [s.name for s in plan.stages] == ["shadow", "canary", "early", "half", "full"]
    assert plan.stages[0].is_shadow and plan.stages[0].shadow == 10_000
    assert plan.stages[1].traffic == 100 and plan.stages[1].min_duration == 1800
    assert plan.stages[3].approval == "required"
    latency = plan.guardrails[1]
    assert latency.key == "latency_ms>250" and latency.info.rate
    assert plan.guardrails[2].info.bad == "decrease"
    assert plan.guardrails[3].applies_to(plan.stages[0])
    assert not plan.guardrails[3].applies_to(plan.stages[1])
    assert plan.base_dir == EXAMPLE.parent


def test_hash_is_stable_and_sensitive() -> None:
    a = Plan.from_dict(plan_dict())
    b = Plan.from_dict(plan_dict())
    assert a.hash == b.hash
    c = Plan.from_dict(plan_dict(unit="account_id"))
    assert c.hash != a.hash


def test_three_mistakes_reported_together_with_paths() -> None:
    data = plan_dict()
    data["stages"][0]["traffic"] = "150%"
    data["guardrails"][0]["tolerance"] = -1
    data["analysis"]["on_inconclusive"] = "shrug"
    with pytest.raises(PlanValidationError) as info:
        Plan.from_dict(data)
    paths = {p.path for p in info.value.problems}
    assert paths == {"stages.0.traffic", "guardrails.0.tolerance", "analysis.on_inconclusive"}
    message = str(info.value)
    assert "3 problems" in message and "hold" in message


def test_semantic_problems_name_fields() -> None:
    data = plan_dict()
    data["stages"][1]["name"] = "canary"
    data["guardrails"].append({"metric": "conversion", "tolerance": 0.01})
    data["guardrails"].append({"metric": "error_rate", "stage": "nope", "tolerance": 0.01})
    with pytest.raises(PlanValidationError) as info:
        Plan.from_dict(data)
    paths = [p.path for p in info.value.problems]
    assert "stages.1.name" in paths
    assert "guardrails.1.direction" in paths
    assert "guardrails.2.stage" in paths


def test_unknown_field_and_model_scheme() -> None:
    data = plan_dict(colour="blue")
    data["candidate"]["model"] = "s3://bucket/model"
    with pytest.raises(PlanValidationError) as info:
        Plan.from_dict(data)
    by_path = {p.path: p.message for p in info.value.problems}
    assert "unknown field" in by_path["colour"]
    assert "joblib:" in by_path["candidate.model"]


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("10m", 600), ("2h", 7200),
                                              ("7d", 604800), ("250ms", 0.25), (45, 45)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_duration_round_trip() -> None:
    assert format_duration(5400) == "1h30m"
    assert parse_duration(format_duration(5400)) == 5400


@pytest.mark.parametrize(("text", "bp"), [("5%", 500), ("0.5%", 50), (0.05, 500), ("100%", 10000),
                                         (1.0, 10000), (0, 0)])
def test_shares(text: str | float, bp: int) -> None:
    assert parse_share(text) == bp


@pytest.mark.parametrize("bad", ["5", 5, "0.001%", "-1%", "abc%", True])
def test_bad_shares(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_share(bad)


def test_a_bare_1_is_refused_as_ambiguous() -> None:
    with pytest.raises(ValueError, match="1 is ambiguous: write 1% or 100%"):
        parse_share(1)
    with pytest.raises(PlanError, match=r"stages\.0\.traffic.*1 is ambiguous"):
        Plan.from_dict(plan_dict(stages=[{"name": "canary", "traffic": 1}]))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no such file"):
        Plan.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML at line"):
        Plan.load(bad)


def test_plan_dumps_back_to_a_valid_plan() -> None:
    plan = Plan.load(EXAMPLE)
    again = Plan.from_dict(json.loads(json.dumps(plan.canonical())))
    assert again.hash == plan.hash


def test_zero_tolerance_warns() -> None:
    data = plan_dict()
    data["guardrails"][0]["tolerance"] = 0
    assert any("never be proven" in w for w in tolerance_warnings(Plan.from_dict(data)))


def test_json_schema_describes_the_plan() -> None:
    schema = plan_json_schema()
    assert "stages" in schema["required"]
    assert schema["title"] == "safeshift rollout plan"
    assert "Stage" in json.dumps(schema)


def test_json_schema_accepts_what_validate_accepts(tmp_path: Path) -> None:
    import jsonschema
    import yaml

    schema = plan_json_schema()
    for path in (EXAMPLE, ROOT / "examples" / "experiment" / "plan.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    data = plan_dict()
    data["stages"][0].update({"min_duration": "1h30m", "approval": True})
    data["guardrails"][0]["stage"] = "canary"
    Plan.from_dict(data)
    jsonschema.validate(data, schema)
    data["stages"][0]["min_duration"] = "soon"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_segments_are_bounded_so_their_key_fits_the_store() -> None:
    from safeshift.plan import MAX_SEGMENT_NAME, MAX_SEGMENTS
    from safeshift.telemetry import SegmentKeyer

    with pytest.raises(PlanError, match="segments"):
        Plan.from_dict(plan_dict(segments=[f"a{i}" for i in range(MAX_SEGMENTS + 1)]))
    with pytest.raises(PlanError, match=r"segments\.0"):
        Plan.from_dict(plan_dict(segments=["x" * (MAX_SEGMENT_NAME + 1)]))
    with pytest.raises(PlanError, match=r"segments\.0"):  # the key's separators
        Plan.from_dict(plan_dict(segments=["plan|tier"]))
    names = [f"{i}" * MAX_SEGMENT_NAME for i in range(MAX_SEGMENTS)]
    plan = Plan.from_dict(plan_dict(segments=names))
    key = SegmentKeyer(plan.segments).key({n: "v" * 500 for n in names})
    assert len(key) <= 512
