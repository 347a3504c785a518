"""The decision engine on hand-made telemetry: each verdict, its evidence and its sentence."""

from __future__ import annotations

import math
import random

import pytest
from tests.conftest import plan_dict

from safeshift import Plan
from safeshift.analysis import Status, analyse, compare, effective_n, tuning_samples, unexcluded_harm
from safeshift.telemetry import Moments, Summary


def summary_of(cells: dict[tuple[str, str], dict[str, Moments]]) -> Summary:
    """cells[(arm, segment)][signal] -> a Summary of the hash cohort."""
    s = Summary()
    for (arm, segment), signals in cells.items():
        s.cells[(arm, "hash", segment, -1)] = signals
    return s


def rate(n: int, x: int) -> Moments:
    return Moments(n, x, x)


def plan_with(*guardrails: dict[str, object], traffic: str = "50%") -> Plan:
    data = plan_dict(guardrails=list(guardrails))
    data["stages"][0]["traffic"] = traffic
    return Plan.from_dict(data)


def test_clear_harm_names_guardrail_and_evidence() -> None:
    plan = plan_with({"metric": "error_rate", "tolerance": 0.002})
    s = summary_of({("baseline", "country=US"): {"error_rate": rate(20_000, 200),
                                                  "requests": rate(20_000, 20_000)},
                    ("candidate", "country=US"): {"error_rate": rate(20_000, 400),
                                                   "requests": rate(20_000, 20_000)}})
    a = analyse(plan, 0, s)
    g = a.global_verdicts[0]
    assert g.status is Status.HARM
    assert g.lower > 0.002 and g.estimate == pytest.approx(0.01)
    assert g.sentence.startswith("error rate +1.00 pt [")
    assert "exceeds the 0.20 pt tolerance" in g.sentence
    assert a.harms and a.harms[0].n_candidate == 20_000


def test_equal_arms_pass_and_small_arms_hold() -> None:
    plan = plan_with({"metric": "error_rate", "tolerance": 0.01})
    big = summary_of({("baseline", ""): {"error_rate": rate(50_000, 500)},
                      ("candidate", ""): {"error_rate": rate(50_000, 500)}})
    assert analyse(plan, 0, big).global_verdicts[0].status is Status.PASS
    small = summary_of({("baseline", ""): {"error_rate": rate(200, 2)},
                        ("candidate", ""): {"error_rate": rate(200, 2)}})
    assert analyse(plan, 0, small).global_verdicts[0].status is Status.HOLD
    tiny = summary_of({("baseline", ""): {"error_rate": rate(10, 0)},
                       ("candidate", ""): {"error_rate": rate(10, 0)}})
    v = analyse(plan, 0, tiny).global_verdicts[0]
    assert v.status is Status.NO_DATA and "not judged yet" in v.sentence


def test_zero_events_do_not_prove_safety_instantly() -> None:
    """With no errors on either arm a naive standard error is 0; the engine must still hold."""
    plan = plan_with({"metric": "error_rate", "tolerance": 0.002})
    s = summary_of({("baseline", ""): {"error_rate": rate(100, 0)},
                    ("candidate", ""): {"error_rate": rate(100, 0)}})
    assert analyse(plan, 0, s).global_verdicts[0].status is Status.HOLD


def test_decrease_is_bad_for_accuracy() -> None:
    plan = plan_with({"metric": "accuracy", "tolerance": 0.01})
    s = summary_of({("baseline", ""): {"accuracy": rate(20_000, 18_000)},
                    ("candidate", ""): {"accuracy": rate(20_000, 16_000)}})
    v = analyse(plan, 0, s).global_verdicts[0]
    assert v.status is Status.HARM
    assert v.estimate == pytest.approx(-0.1)
    assert "falls short by more than the 1.00 pt tolerance" in v.sentence


def test_relative_tolerance_and_strict() -> None:
    plan = plan_with({"metric": "latency_ms", "relative_tolerance": "10%"},
                     {"metric": "error_rate", "strict": True, "tolerance": 0.05})
    rng = random.Random(1)
    b, c = Moments(), Moments()
    for _ in range(5000):
        b.add(rng.gauss(100, 10))
        c.add(rng.gauss(103, 10))  # +3 %: within 10 %
    s = summary_of({("baseline", ""): {"latency_ms": b, "error_rate": rate(5000, 50)},
                    ("candidate", ""): {"latency_ms": c, "error_rate": rate(5000, 100)}})
    latency, errors = analyse(plan, 0, s).global_verdicts
    assert latency.relative and latency.status is Status.PASS
    assert latency.estimate == pytest.approx(0.03, abs=0.01)
    # +1 pt errors: inside the 5 pt tolerance, but strict rolls back on any proven harm
    assert errors.status is Status.HARM and "any harm (strict)" in errors.sentence


def test_absolute_bound_on_the_candidate_alone() -> None:
    plan = plan_with({"metric": "disagreement", "max": 0.05, "stage": ["canary", "half"]})
    high = summary_of({("candidate", ""): {"disagreement": rate(5000, 500)}})
    v = analyse(plan, 0, high).global_verdicts[0]
    assert v.status is Status.HARM and v.bound == "max"
    assert "breaks the max of 5.00%" in v.sentence
    low = summary_of({("candidate", ""): {"disagreement": rate(5000, 50)}})
    assert analyse(plan, 0, low).global_verdicts[0].status is Status.PASS


def test_segment_harm_is_caught_and_small_segments_are_not_judged() -> None:
    plan = plan_with({"metric": "error_rate", "tolerance": 0.01})
    s = summary_of({
        ("baseline", "country=US"): {"error_rate": rate(40_000, 400)},
        ("candidate", "country=US"): {"error_rate": rate(40_000, 400)},
        ("baseline", "country=BR"): {"error_rate": rate(4_000, 40)},
        ("candidate", "country=BR"): {"error_rate": rate(4_000, 400)},
        ("baseline", "country=JP"): {"error_rate": rate(50, 0)},
        ("candidate", "country=JP"): {"error_rate": rate(50, 40)},
    })
    a = analyse(plan, 0, s)
    by_segment = {v.segment: v for v in a.verdicts}
    assert by_segment["country=BR"].status is Status.HARM
    assert by_segment["country=JP"].status is Status.NO_DATA  # too small: never fails alone
    assert by_segment["country=US"].status is Status.PASS
    # the segment tests share half of alpha: stricter than the global one
    assert by_segment["country=BR"].alpha_harm < by_segment[None].alpha_harm


def test_prediction_drift_guardrail() -> None:
    plan = plan_with({"metric": "prediction_drift", "max": 0.1})
    same = {f"score_bin:{i}": Moments(1000, 1000, 1000) for i in range(10)}
    shifted = {f"score_bin:{i}": Moments(3000 if i > 6 else 200, 0, 0) for i in range(10)}
    a = analyse(plan, 0, summary_of({("baseline", ""): same, ("candidate", ""): shifted}))
    assert a.drift is not None and a.drift["kind"] == "scores"
    assert a.verdicts[0].status is Status.HARM and "PSI" in a.verdicts[0].sentence
    a = analyse(plan, 0, summary_of({("baseline", ""): same, ("candidate", ""): dict(same)}))
    assert a.verdicts[0].status is Status.PASS and a.drift is not None
    assert a.drift["psi"] == pytest.approx(0.0, abs=1e-9)


def test_prediction_drift_needs_a_max() -> None:
    with pytest.raises(Exception, match="prediction_drift takes a max"):
        plan_with({"metric": "prediction_drift", "tolerance": 0.1})


def test_effective_n_and_tuning() -> None:
    assert effective_n(500, 500) == 1000
    assert effective_n(99_000, 1_000) == pytest.approx(3960, rel=1e-3)
    assert effective_n(0, 10) == 0
    plan = plan_with({"metric": "error_rate", "tolerance": 0.01}, traffic="1%")
    assert math.isfinite(tuning_samples(plan, plan.stages[0]))


def test_compare_matches_between_entry_points() -> None:
    plan = plan_with({"metric": "error_rate", "tolerance": 0.002})
    g = plan.guardrails[0]
    v = compare(g, rate(10_000, 100), rate(10_000, 150), n_star=4000, alpha_harm=0.025,
                alpha_pass=0.05, min_n=30, segment=None)
    a = analyse(plan, 0, summary_of({("baseline", ""): {"error_rate": rate(10_000, 100)},
                                      ("candidate", ""): {"error_rate": rate(10_000, 150)}}))
    assert v.estimate == a.global_verdicts[0].estimate


def test_paired_shadow_labels_are_compared_pairwise() -> None:
    plan = plan_with({"metric": "accuracy", "tolerance": 0.01})
    # 2,000 labelled pairs; the models disagree on 2% of inputs, split evenly
    diffs = Moments()
    for i in range(2000):
        diffs.add(1.0 if i % 100 == 0 else -1.0 if i % 100 == 1 else 0.0)
    independent = {"accuracy": rate(2000, 1800)}
    s = summary_of({("baseline", ""): dict(independent),
                    ("candidate", ""): {**independent, "accuracy:paired": diffs}})
    v = analyse(plan, 0, s).global_verdicts[0]
    assert v.status is Status.PASS and "on the same inputs" in v.sentence
    # the same labels compared as independent samples cannot prove it yet
    unpaired = summary_of({("baseline", ""): dict(independent), ("candidate", ""): independent})
    assert analyse(plan, 0, unpaired).global_verdicts[0].status is Status.HOLD


def test_perfect_agreement_on_few_pairs_is_not_certainty() -> None:
    plan = plan_with({"metric": "accuracy", "tolerance": 0.01})
    s = summary_of({("baseline", ""): {"accuracy": rate(40, 36)},
                    ("candidate", ""): {"accuracy": rate(40, 36),
                                        "accuracy:paired": Moments(40, 0, 0)}})
    assert analyse(plan, 0, s).global_verdicts[0].status is Status.HOLD


def test_a_protected_segment_must_prove_safety_before_promotion() -> None:
    data = plan_dict(guardrails=[{"metric": "error_rate", "tolerance": 0.01}])
    data["stages"][0]["traffic"] = "50%"
    data["analysis"] = {"protected": {"country": ["BR"]}}
    plan = Plan.from_dict(data)
    big = {"error_rate": rate(50_000, 500), "requests": rate(50_000, 50_000)}
    only_us = summary_of({("baseline", "country=US"): dict(big), ("candidate", "country=US"): dict(big)})
    a = analyse(plan, 0, only_us)
    assert all(v.status is Status.PASS for v in a.global_verdicts)
    br = [v for v in a.verdicts if v.segment == "country=BR"]
    assert br and br[0].protected and br[0].status is Status.NO_DATA  # judged before any data
    assert not a.all_pass and a.waiting_on == br
    with_br = summary_of({("baseline", "country=US"): dict(big), ("candidate", "country=US"): dict(big),
                          ("baseline", "country=BR"): dict(big), ("candidate", "country=BR"): dict(big)})
    assert analyse(plan, 0, with_br).all_pass


def test_the_largest_harm_not_yet_excluded_is_named_per_segment() -> None:
    plan = plan_with({"metric": "error_rate", "tolerance": 0.01})
    big = {"error_rate": rate(50_000, 500), "requests": rate(50_000, 50_000)}
    small = {"error_rate": rate(400, 4), "requests": rate(400, 400)}
    s = summary_of({("baseline", "country=US"): dict(big), ("candidate", "country=US"): dict(big),
                    ("baseline", "country=BR"): dict(small), ("candidate", "country=BR"): dict(small)})
    a = analyse(plan, 0, s)
    text = unexcluded_harm(a)
    br = next(v for v in a.verdicts if v.segment == "country=BR")
    us = next(v for v in a.verdicts if v.segment == "country=US")
    assert br.harm_upper > us.harm_upper > 0
    assert text.startswith("error_rate up to +") and text.endswith("worse in country=BR")
