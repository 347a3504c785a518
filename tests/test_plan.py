from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import ROOT, plan_dict

from safeshift import Plan, PlanError, PlanValidationError
from safeshift._units import format_duration, parse_duration, parse_share
from safeshift.plan import Stage, plan_json_schema, read_plan_file, tolerance_warnings

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
    data["guardrails"][0]["stage"] = "canary"  # one stage by name; `half` by a list
    data["guardrails"].append({"metric": "error_rate", "stage": ["half"], "tolerance": 0.01})
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


# -- guardrails cannot be switched off by accident ----------------------------------------


def _problems(data: dict[str, Any]) -> dict[str, str]:
    """Every problem of a plan that must not validate, by path."""
    with pytest.raises(PlanValidationError) as info:
        Plan.from_dict(data)
    return {p.path: p.message for p in info.value.problems}


def _file_problems(path: Path) -> dict[str, str]:
    with pytest.raises(PlanValidationError) as info:
        Plan.load(path)
    return {p.path: p.message for p in info.value.problems}


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``data`` with the field at the dotted ``path`` (list indices as numbers) set."""
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_a_stage_no_guardrail_judges_is_an_error() -> None:
    data = plan_dict()
    data["guardrails"][0]["stage"] = "canary"
    by_path = _problems(data)
    assert set(by_path) == {"stages.1"}
    assert "no guardrail judges stage 'half'" in by_path["stages.1"]
    # shadow metrics judge only shadow stages, so they leave canary stages unjudged
    data = plan_dict(guardrails=[{"metric": "disagreement", "max": 0.1}])
    data["stages"].insert(0, {"name": "shadow", "shadow": "100%"})
    assert set(_problems(data)) == {"stages.1", "stages.2"}
    # no guardrails at all: every stage but the 100% one that is promotion
    assert set(_problems(plan_dict(guardrails=[]))) == {"stages.0", "stages.1"}
    # a last stage below 100% is passed too (into promotion), so it needs one as well
    data = plan_dict(stages=[{"name": "canary", "traffic": "5%"}], guardrails=[])
    assert set(_problems(data)) == {"stages.0"}
    # only a 100% stage compares nothing: a plan that goes straight there is valid
    Plan.from_dict(plan_dict(stages=[{"name": "full", "traffic": "100%"}], guardrails=[]))


def test_a_guardrail_that_judges_no_stage_is_an_error() -> None:
    # a rollout that starts at 100% runs its first stage, so its guardrails do judge it
    Plan.from_dict(plan_dict(stages=[{"name": "all", "traffic": "100%", "min_duration": "1h"}],
                             guardrails=[{"metric": "error_rate", "max": 0.05}]))
    data = plan_dict(guardrails=[*plan_dict()["guardrails"], {"metric": "disagreement", "max": 0.1}])
    by_path = _problems(data)
    assert set(by_path) == {"guardrails.1"} and "shadow" in by_path["guardrails.1"]
    data = plan_dict()
    data["guardrails"].append({"metric": "latency_ms", "tolerance": 5, "stage": "full"})
    by_path = _problems(data)
    assert set(by_path) == {"guardrails.1"} and "promotion" in by_path["guardrails.1"]


NAN_FIELDS = [
    "guardrails.0.tolerance", "guardrails.0.above", "guardrails.0.max",
    "stages.0.min_duration", "stages.0.max_duration", "stages.0.traffic", "stages.0.min_samples",
    "stages.0.expected_samples", "analysis.alpha", "analysis.srm_min_deviation",
    "analysis.unit_buckets", "serving.label_window", "serving.candidate_timeout",
    "candidate.timeout", "targeting.always_candidate.plan.0", "change.summary",
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", NAN_FIELDS)
def test_nan_and_infinity_are_errors_naming_the_field(tmp_path: Path, field: str,
                                                      value: float) -> None:
    data = _set(plan_dict(targeting={"always_candidate": {"plan": ["internal"]}}), field, value)
    yaml_path, json_path = tmp_path / "plan.yaml", tmp_path / "plan.json"
    yaml_path.write_text(yaml.safe_dump(data))  # .nan, .inf, -.inf
    json_path.write_text(json.dumps(data))  # NaN, Infinity, -Infinity
    assert ".nan" in yaml_path.read_text().lower() or ".inf" in yaml_path.read_text().lower()
    for problems in (_problems(data), _file_problems(yaml_path), _file_problems(json_path)):
        assert list(problems) == [field], problems  # named once, nothing else wrong
        assert "NaN and infinity" in problems[field]


def test_nan_written_as_text_is_an_error_too() -> None:
    data = plan_dict()
    data["guardrails"][0]["tolerance"] = "nan"  # pydantic would read the text as a float
    data["guardrails"].append({"metric": "latency_ms", "above": "-Infinity", "tolerance": 0.01})
    by_path = _problems(data)
    assert set(by_path) == {"guardrails.0.tolerance", "guardrails.1.above"}
    assert all("NaN and infinity" in m for m in by_path.values())


def test_a_nan_is_listed_with_the_plans_other_problems() -> None:
    data = plan_dict()
    data["guardrails"][0]["tolerance"] = math.nan
    data["stages"][0]["traffic"] = "150%"
    assert set(_problems(data)) == {"guardrails.0.tolerance", "stages.0.traffic"}


def test_a_100_percent_stage_must_be_the_last() -> None:
    data = plan_dict()
    data["stages"][1]["traffic"] = "100%"
    by_path = _problems(data)
    assert set(by_path) == {"stages.1.traffic"}
    assert "make it the last stage" in by_path["stages.1.traffic"]


PLAN_YAML = """\
rollout: dup-test
endpoint: score
baseline: {version: v1, model: "fake:a"}
candidate: {version: v2, model: "fake:b"}
change: {summary: a change}
stages:
  - name: canary
    traffic: 5%
    traffic: 50%
  - {name: full, traffic: 100%}
guardrails:
  - {metric: error_rate, tolerance: 0.01}
"""


def test_duplicate_yaml_keys_are_errors_with_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN_YAML)
    by_path = _file_problems(path)
    assert set(by_path) == {"stages.0.traffic"}
    assert "duplicate key 'traffic' (line 8, again at line 9)" in by_path["stages.0.traffic"]
    # at the top level, in a flow mapping on one line, and inside a nested mapping
    text = PLAN_YAML.replace("    traffic: 50%\n", "").replace(
        "rollout: dup-test\n", "rollout: dup-test\nrollout: dup-two\n").replace(
        "{metric: error_rate, tolerance: 0.01}", "{metric: error_rate, tolerance: 0.01, tolerance: 0.02}")
    text += "targeting:\n  always_candidate:\n    plan: [internal]\n    plan: [staff]\n"
    path.write_text(text)
    by_path = _file_problems(path)
    assert set(by_path) == {"rollout", "guardrails.0.tolerance", "targeting.always_candidate.plan"}
    assert "'rollout' (line 1, again at line 2)" in by_path["rollout"]
    # read_plan_file refuses them as well
    with pytest.raises(PlanValidationError, match="duplicate key 'rollout'"):
        read_plan_file(path)


def test_duplicate_keys_are_listed_with_the_plans_other_problems(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN_YAML.replace("tolerance: 0.01", "tolerance: -1"))
    assert set(_file_problems(path)) == {"stages.0.traffic", "guardrails.0.tolerance"}


MERGE_YAML = """\
rollout: merge-test
endpoint: score
baseline: &model {version: v1, model: "fake:a"}
candidate: {<<: *model, version: v2}
change: {summary: a change}
stages:
  - &step {name: canary, traffic: 5%, min_duration: 5m}
  - {<<: *step, name: half, traffic: 50%}
  - {name: full, traffic: 100%}
guardrails:
  - {metric: error_rate, tolerance: 0.01}
"""


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(MERGE_YAML)  # keys next to `<<` override the merged ones, by design
    plan = Plan.load(path)
    assert plan.candidate.version == "v2" and plan.stages[1].min_duration == 300
    # a duplicate inside an anchored mapping is reported once, where it is written
    path.write_text(MERGE_YAML.replace("min_duration: 5m}", "min_duration: 5m, min_duration: 6m}"))
    assert set(_file_problems(path)) == {"stages.0.min_duration"}


def test_duplicate_json_keys_are_errors_with_their_path(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    text = json.dumps(plan_dict()).replace('"traffic": "10%"', '"traffic": "10%", "traffic": "20%"')
    text = text.replace('"unit": "user_id"', '"unit": "user_id", "unit": "account_id"')
    path.write_text(text)
    by_path = _file_problems(path)
    assert set(by_path) == {"stages.0.traffic", "unit"}
    assert "duplicate key 'traffic'" in by_path["stages.0.traffic"]
    path.write_text("{\"rollout\": ")
    with pytest.raises(PlanError, match="not valid JSON at line 1"):
        Plan.load(path)


def test_yaml_tags_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN_YAML.replace(
        "change: {summary: a change}",
        f"change: {{summary: !!python/object/apply:os.system ['touch {marker}']}}"))
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    assert not isinstance(info.value, PlanValidationError)
    message = str(info.value)
    assert "refused at line 5" in message and "!!python/object/apply:os.system" in message
    assert "no code runs" in message
    assert not marker.exists()
    path.write_text(PLAN_YAML.replace("rollout: dup-test", "rollout: !!python/name:os.getcwd"))
    with pytest.raises(PlanError, match="is not allowed"):
        Plan.load(path)


def test_min_above_max_is_an_error() -> None:
    data = plan_dict(guardrails=[{"metric": "accuracy", "min": 0.9, "max": 0.8}])
    by_path = _problems(data)
    assert set(by_path) == {"guardrails.0.min"} and "above max" in by_path["guardrails.0.min"]
    data = plan_dict()
    data["stages"][0]["max_duration"] = "1m"  # min_duration is 5m
    assert set(_problems(data)) == {"stages.0.max_duration"}
    data = plan_dict(challengers=[{"name": "b", "version": "v2b", "model": "fake:b"},
                                  {"name": "c", "version": "v2c", "model": "fake:c"}])
    data["stages"][0]["experiment"] = {"objective": "accuracy", "floor": "40%"}
    by_path = _problems(data)  # three arms cannot each get 40%
    assert set(by_path) == {"stages.0.experiment.floor"}
    data["stages"][0]["experiment"]["floor"] = "30%"
    Plan.from_dict(data)


def test_the_unit_is_not_a_segment() -> None:
    by_path = _problems(plan_dict(unit="user_id", segments=["country", "user_id"]))
    assert set(by_path) == {"segments.1"} and "unit attribute" in by_path["segments.1"]
    by_path = _problems(plan_dict(segments=["country", "country"]))
    assert set(by_path) == {"segments.1"} and "twice" in by_path["segments.1"]


ZERO_DURATIONS = [
    "serving.candidate_timeout", "serving.label_window", "serving.breaker_window",
    "serving.breaker_cooldown", "serving.telemetry_window", "serving.refresh",
    "baseline.timeout", "candidate.timeout", "stages.0.max_duration",
]


@pytest.mark.parametrize("value", [0, "0s", "0ms", "0.0004s"])
@pytest.mark.parametrize("field", ZERO_DURATIONS)
def test_zero_timeouts_and_windows_are_errors(field: str, value: object) -> None:
    data = _set(plan_dict(), field, value)
    if field == "stages.0.max_duration":
        data["stages"][0]["min_duration"] = 0
    by_path = _problems(data)
    assert set(by_path) == {field} and "at least 1ms" in by_path[field]
    Plan.from_dict(_set(plan_dict(), field, "1h" if field == "stages.0.max_duration" else "1ms"))


def test_negative_durations_are_errors() -> None:
    assert "negative" in _problems(_set(plan_dict(), "serving.label_window", -1))[
        "serving.label_window"]


def test_duplicate_guardrails_are_errors() -> None:
    same = {"metric": "error_rate", "tolerance": 0.02}
    by_path = _problems(plan_dict(guardrails=[same, dict(same)]))
    assert set(by_path) == {"guardrails.1"}
    assert "duplicates guardrails.0" in by_path["guardrails.1"]
    assert "canary, half" in by_path["guardrails.1"]
    # another margin on the same signal is still the same test, judged twice
    assert set(_problems(plan_dict(guardrails=[same, {**same, "tolerance": 0.05}]))) == {
        "guardrails.1"}
    # overlapping stage lists: both judge error_rate in `half`
    overlap = [{**same, "stage": ["canary", "half"]}, {**same, "stage": "half"}]
    by_path = _problems(plan_dict(guardrails=overlap))
    assert set(by_path) == {"guardrails.1"} and "in half;" in by_path["guardrails.1"]
    latency = {"metric": "latency_ms", "above": 250, "tolerance": 0.01}
    assert set(_problems(plan_dict(guardrails=[latency, {**latency, "tolerance": 0.02}]))) == {
        "guardrails.1"}


def test_guardrails_that_differ_are_not_duplicates() -> None:
    same = {"metric": "error_rate", "tolerance": 0.02}
    cases = [
        # disjoint stages: stricter later
        [{**same, "stage": "canary"}, {**same, "tolerance": 0.005, "stage": "half"}],
        # a comparison with the baseline and an absolute SLO on the same signal
        [same, {"metric": "error_rate", "max": 0.05}],
        # a max and a min are two sides of a bound
        [same, {"metric": "accuracy", "min": 0.8}, {"metric": "accuracy", "max": 0.99}],
        # other thresholds of one metric are other signals
        [same, {"metric": "latency_ms", "above": 250, "tolerance": 0.01},
         {"metric": "latency_ms", "above": 500, "tolerance": 0.01}],
        # one custom outcome from two sources
        [same, {"metric": "conversion", "source": "feedback", "direction": "decrease",
                "tolerance": 0.01},
         {"metric": "conversion", "source": "report", "direction": "decrease", "tolerance": 0.01}],
    ]
    for guardrails in cases:
        Plan.from_dict(plan_dict(guardrails=guardrails))


def test_duplicate_stage_names_are_errors() -> None:
    data = plan_dict()
    data["stages"][1]["name"] = "canary"
    by_path = _problems(data)
    assert "used twice" in by_path["stages.1.name"]


# -- new fields ----------------------------------------------------------------------------


def test_analysis_unit_buckets() -> None:
    assert Plan.from_dict(plan_dict()).analysis.unit_buckets == 64
    assert Plan.from_dict(_set(plan_dict(), "analysis.unit_buckets", 256)).analysis.unit_buckets == 256
    for bad in (15, 1025, 0, "many"):
        assert set(_problems(_set(plan_dict(), "analysis.unit_buckets", bad))) == {
            "analysis.unit_buckets"}


def test_analysis_protected_segments() -> None:
    assert Plan.from_dict(plan_dict()).analysis.protected == {}
    data = _set(plan_dict(segments=["country", "plan"]), "analysis.protected",
                {"country": ["BR", "IN"], "plan": ["free"]})
    assert Plan.from_dict(data).analysis.protected == {"country": ["BR", "IN"], "plan": ["free"]}
    by_path = _problems(_set(plan_dict(), "analysis.protected", {"plan": ["free"]}))
    assert set(by_path) == {"analysis.protected.plan"}
    assert "not one of segments (country)" in by_path["analysis.protected.plan"]
    for values, where in (([""], "analysis.protected.country.0"),
                          (["x" * 65], "analysis.protected.country.0"),
                          (["BR", "a|b"], "analysis.protected.country.1"),
                          ([], "analysis.protected.country"),
                          ("BR", "analysis.protected.country")):
        assert set(_problems(_set(plan_dict(), "analysis.protected", {"country": values}))) == {
            where}, values
    Plan.from_dict(_set(plan_dict(), "analysis.protected", {"country": ["x" * 64]}))
    # a value that never gets the candidate can never prove safety
    data = _set(plan_dict(), "analysis.protected", {"country": ["BR", "DE"]})
    data["targeting"] = {"never_candidate": {"country": ["DE"]}}
    by_path = _problems(data)
    assert set(by_path) == {"analysis.protected.country.1"}
    assert "never_candidate" in by_path["analysis.protected.country.1"]


def _holdback(**last: Any) -> dict[str, Any]:
    data = plan_dict()
    data["stages"][-1].update(last)
    return data


def test_stage_holdback_and_watch() -> None:
    full = Stage.model_validate({"name": "full", "traffic": "100%", "holdback": "2%",
                                 "watch": "1d"})
    assert full.holdback == 200 and full.watch == 86400 and full.is_full
    assert Stage.model_validate({"name": "full", "traffic": "100%", "holdback": 0.5,
                                 "watch": 60}).holdback == 5000
    plan = Plan.from_dict(_holdback(holdback="2%", watch="1d"))
    assert plan.stages[2].served == 9_800 and plan.stages[0].served == 1_000


@pytest.mark.parametrize(("guardrail", "where", "words"), [
    ({"metric": "revenue", "direction": "decrease", "tolerance": 1, "range": [5, 1]}, "guardrails.1.range",
     "low end (5) must be below its high end (1)"),
    ({"metric": "revenue", "direction": "decrease", "tolerance": 1, "range": [0, 1e12]},
     "guardrails.1.range", "within ±1e+09"),
    ({"metric": "revenue", "direction": "decrease", "tolerance": 1,
      "range": [0, float("nan")]}, "guardrails.1.range.1", "finite"),
    ({"metric": "accuracy", "tolerance": 0.01, "range": [0, 1]}, "guardrails.1.range",
     "values are 0 to 1 already"),
    ({"metric": "latency_ms", "above": 250, "tolerance": 0.01, "range": [0, 10]},
     "guardrails.1.range", "measured by safeshift"),
    ({"metric": "score", "source": "request", "tolerance": 1, "range": [0, 10]},
     "guardrails.1.range", "not to source: request"),
])
def test_bad_outcome_ranges(guardrail: dict[str, Any], where: str, words: str) -> None:
    data = plan_dict()
    data["guardrails"].append(guardrail)
    by_path = _problems(data)
    assert where in by_path and words in by_path[where], by_path


def test_an_outcome_range_is_one_per_metric_and_keeps_old_hashes() -> None:
    data = plan_dict()
    data["guardrails"] += [{"metric": "revenue", "direction": "decrease", "tolerance": 1,
                            "range": [0, 500]},
                           {"metric": "revenue", "direction": "decrease", "min": 10,
                            "range": [0, 500]}]
    plan = Plan.from_dict(data)
    assert plan.outcome_ranges() == {"revenue": (0.0, 500.0)}
    data["guardrails"][2]["range"] = [0, 600]
    assert "declares the range [0, 500]" in _problems(data)["guardrails.2.range"]
    assert "range" not in Plan.from_dict(plan_dict()).canonical()["guardrails"][0]


def test_a_holdback_cannot_move_units_back_nor_start_the_rollout() -> None:
    # stage "half" is at 50%: a 60% holdback is refused by its range, 50% is the edge
    data = plan_dict(stages=[{"name": "most", "traffic": "99%"},
                             {"name": "full", "traffic": "100%", "holdback": "2%", "watch": "1d"}])
    by_path = _problems(data)
    assert set(by_path) == {"stages.1.holdback"}
    assert "back to the baseline" in by_path["stages.1.holdback"]
    assert "at most 1%" in by_path["stages.1.holdback"]
    data["stages"][0]["traffic"] = "98%"
    Plan.from_dict(data)
    only = plan_dict(stages=[{"name": "full", "traffic": "100%", "holdback": "2%", "watch": "1d"}])
    assert "a stage must come before it" in _problems(only)["stages.0.holdback"]


@pytest.mark.parametrize(("change", "where", "words"), [
    ({"holdback": "2%"}, "stages.2.watch", "required with holdback"),
    ({"watch": "1d"}, "stages.2.watch", "only with a holdback"),
    ({"holdback": "0%", "watch": "1d"}, "stages.2.holdback", "more than 0%"),
    ({"holdback": "60%", "watch": "1d"}, "stages.2.holdback", "at most 50%"),
    ({"holdback": "2%", "watch": "0s"}, "stages.2.watch", "at least 1ms"),
    ({"holdback": "2%", "watch": "1d", "traffic": "60%"}, "stages.2.holdback", "traffic: 100%"),
])
def test_bad_holdbacks(change: dict[str, Any], where: str, words: str) -> None:
    by_path = _problems(_holdback(**change))
    assert where in by_path and words in by_path[where], by_path


def test_only_the_last_stage_has_a_holdback() -> None:
    data = plan_dict(stages=[{"name": "canary", "traffic": "10%"},
                             {"name": "full", "traffic": "100%", "holdback": "2%", "watch": "1d"},
                             {"name": "after", "shadow": "100%"}])
    by_path = _problems(data)
    assert "only the last stage" in by_path["stages.1.holdback"]
    del data["stages"][2]
    Plan.from_dict(data)


def test_a_holdback_needs_a_guardrail_to_judge_it() -> None:
    data = _holdback(holdback="2%", watch="1d")
    data["guardrails"][0]["stage"] = ["canary", "half"]
    by_path = _problems(data)
    assert set(by_path) == {"stages.2"}
    assert "holdback after promotion" in by_path["stages.2"]


def test_the_hash_of_a_plan_without_the_new_fields_is_unchanged() -> None:
    plan = Plan.from_dict(plan_dict())
    canonical = plan.canonical()
    assert "unit_buckets" not in canonical["analysis"] and "protected" not in canonical["analysis"]
    assert all("holdback" not in s and "watch" not in s for s in canonical["stages"])
    # writing a default out does not change the meaning, nor the hash
    explicit = Plan.from_dict(_set(plan_dict(), "analysis.unit_buckets", 64))
    assert explicit.hash == plan.hash
    assert Plan.from_dict(_set(plan_dict(), "analysis.protected", {})).hash == plan.hash
    assert Plan.from_dict(_set(plan_dict(), "analysis.unit_buckets", 128)).hash != plan.hash
    # the example's hash as computed before these fields existed: stored rollouts still match
    assert Plan.load(EXAMPLE).hash == (
        "e7f2f75ca6eea2194b34face0447a6754fb2364520067c7a555c54d2f323c929")


# -- the JSON Schema says what validate says, where JSON Schema can ------------------------


def _bad(mutate: Any) -> dict[str, Any]:
    data = plan_dict()
    mutate(data)
    return data


SCHEMA_REJECTS = {
    # each is refused by validate; JSON Schema can say these too
    "zero timeout": lambda d: _set(d, "serving.candidate_timeout", "0ms"),
    "zero label window": lambda d: _set(d, "serving.label_window", 0),
    "zero max_duration": lambda d: _set(d, "stages.0.max_duration", "0s"),
    "zero model timeout": lambda d: _set(d, "candidate.timeout", "0s"),
    "two 100% stages": lambda d: _set(d, "stages.1.traffic", "100%"),
    "segment twice": lambda d: _set(d, "segments", ["country", "country"]),
    "unit_buckets too small": lambda d: _set(d, "analysis.unit_buckets", 8),
    "unit_buckets too large": lambda d: _set(d, "analysis.unit_buckets", 2048),
    "protected value empty": lambda d: _set(d, "analysis.protected", {"country": [""]}),
    "protected value too long": lambda d: _set(d, "analysis.protected", {"country": ["x" * 65]}),
    "protected list empty": lambda d: _set(d, "analysis.protected", {"country": []}),
    "outcome range beyond the limit": lambda d: d["guardrails"].append(
        {"metric": "revenue", "direction": "decrease", "tolerance": 1, "range": [0, 1e12]}),
    "outcome range of three": lambda d: d["guardrails"].append(
        {"metric": "revenue", "direction": "decrease", "tolerance": 1, "range": [0, 1, 2]}),
    "holdback without watch": lambda d: _set(d, "stages.2.holdback", "2%"),
    "watch without holdback": lambda d: _set(d, "stages.2.watch", "1d"),
    "holdback 0%": lambda d: d["stages"][2].update(holdback="0%", watch="1d"),
    "holdback above 50%": lambda d: d["stages"][2].update(holdback="50.01%", watch="1d"),
    "holdback as fraction above 50%": lambda d: d["stages"][2].update(holdback=0.6, watch="1d"),
    "holdback below 100%": lambda d: d["stages"][1].update(holdback="2%", watch="1d"),
    "share above 100%": lambda d: _set(d, "stages.0.traffic", "150%"),
    "share finer than 0.01%": lambda d: _set(d, "stages.0.traffic", "0.001%"),
}

SCHEMA_CANNOT_SAY = {
    # refused by validate, but they compare fields with each other, or concern parsing: JSON
    # Schema has no way to say them, so the schema accepts them and validate refuses them
    "stage no guardrail judges": lambda d: _set(d, "guardrails.0.stage", "canary"),
    "guardrail that judges no stage": lambda d: d["guardrails"].append(
        {"metric": "disagreement", "max": 0.1}),
    "100% stage not last (only one)": lambda d: d["stages"].reverse(),
    "guardrail min above max": lambda d: _set(d, "guardrails", [
        {"metric": "accuracy", "min": 0.9, "max": 0.8}]),
    "min_duration above max_duration": lambda d: _set(d, "stages.0.max_duration", "1m"),
    "segment is the unit": lambda d: _set(d, "segments", ["user_id"]),
    "duplicate guardrails": lambda d: d["guardrails"].append(dict(d["guardrails"][0])),
    "duplicate stage names": lambda d: _set(d, "stages.1.name", "canary"),
    "protected attribute not a segment": lambda d: _set(d, "analysis.protected", {"plan": ["x"]}),
    "holdback not on the last stage": lambda d: (
        d["stages"][2].update(holdback="2%", watch="1d"),
        d["stages"].append({"name": "after", "shadow": "100%"})),
    "outcome range upside down": lambda d: d["guardrails"].append(
        {"metric": "revenue", "direction": "decrease", "tolerance": 1, "range": [5, 1]}),
    "outcome range on a built-in metric": lambda d: _set(d, "guardrails.0.range", [0, 1]),
    "two ranges for one outcome": lambda d: d["guardrails"].extend([
        {"metric": "revenue", "direction": "decrease", "tolerance": 1, "range": [0, 10]},
        {"metric": "revenue", "direction": "decrease", "max": 5, "range": [0, 20]}]),
    "holdback moving units back": lambda d: (
        _set(d, "stages.1.traffic", "99%"), d["stages"][2].update(holdback="2%", watch="1d")),
    "holdback on the first stage": lambda d: (
        d.update(stages=[{"name": "full", "traffic": "100%", "holdback": "2%", "watch": "1d"}])),
    "experiment floor beyond the arms": lambda d: (
        d.update(challengers=[{"name": "b", "version": "v2b", "model": "fake:b"}]),
        _set(d, "stages.0.experiment", {"objective": "accuracy", "floor": "60%"})),
    # a duration under 1ms is accepted by the schema's pattern only when written with units
    "half a millisecond": lambda d: _set(d, "serving.candidate_timeout", "0.5ms"),
    # JSON numbers cannot tell 1 (ambiguous, refused) from 1.0 (100%)
    "bare 1 as a share": lambda d: _set(d, "stages.2.traffic", 1),
}
# Not here at all: NaN and infinity (not JSON values: a schema validator cannot be given them
# from JSON, and jsonschema lets a Python NaN pass every bound) and duplicate keys (gone once
# the file is parsed).


@pytest.mark.parametrize("name", SCHEMA_REJECTS)
def test_json_schema_rejects_bad_plans_where_it_can(name: str) -> None:
    import jsonschema

    data = _bad(SCHEMA_REJECTS[name])
    with pytest.raises(PlanValidationError):
        Plan.from_dict(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, plan_json_schema())


@pytest.mark.parametrize("name", SCHEMA_CANNOT_SAY)
def test_json_schema_leaves_cross_field_checks_to_validate(name: str) -> None:
    import jsonschema

    data = _bad(SCHEMA_CANNOT_SAY[name])
    with pytest.raises(PlanValidationError):
        Plan.from_dict(data)
    jsonschema.validate(data, plan_json_schema())  # if this fails, move the case up


def test_json_schema_accepts_the_new_fields() -> None:
    import jsonschema

    data = plan_dict(segments=["country", "plan"])
    data["analysis"].update(unit_buckets=16, protected={"country": ["BR", "IN"], "plan": ["x" * 64]})
    data["stages"][2].update(holdback="50%", watch="7d")
    for holdback, traffic in (("2%", "100%"), ("0.01%", "100.0%"), (0.02, 1.0), ("50.00%", "100%")):
        data["stages"][2].update(holdback=holdback, traffic=traffic)
        Plan.from_dict(data)
        jsonschema.validate(data, plan_json_schema())
    del data["stages"][2]["holdback"], data["stages"][2]["watch"]
    for timeout in ("1ms", "0.25s", 0.001, "1h30m", "30 s", " 2h "):
        _set(data, "serving.candidate_timeout", timeout)
        Plan.from_dict(data)
        jsonschema.validate(data, plan_json_schema())
