from __future__ import annotations

import json
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import ROOT, plan_dict

from safeshift import Plan
from safeshift.assign import (
    ASSIGNMENT_VERSION,
    BASELINE,
    CANDIDATE,
    Assigner,
    Reason,
    Split,
    bucket,
)

GOLDEN = json.loads((ROOT / "tests" / "data" / "assignment-v1.json").read_text(encoding="utf-8"))


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """Reference MurmurHash3 x86_32 (Austin Appleby's algorithm), to check mmh3 against."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    h = seed
    n = len(data) // 4 * 4
    for i in range(0, n, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    tail = data[n:]
    k = 0
    for j, byte in enumerate(tail):
        k |= byte << (8 * j)
    if tail:
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def test_golden_vectors_match() -> None:
    assert GOLDEN["version"] == ASSIGNMENT_VERSION
    for case in GOLDEN["cases"]:
        assert bucket(case["salt"], case["unit"]) == case["bucket"], case


def test_golden_vectors_follow_the_reference_algorithm() -> None:
    for case in GOLDEN["cases"]:
        key = f"{case['salt']}/{case['unit']}".encode()
        assert murmur3_32(key) % 10_000 == case["bucket"]


def _split(traffic: int, shadow: int = 0) -> Split:
    return Split("s", 0, traffic, shadow, "v2", "v1", active=True)


@settings(max_examples=300, deadline=None)
@given(unit=st.text(min_size=1, max_size=40), lo=st.integers(0, 10_000), hi=st.integers(0, 10_000))
def test_monotone_in_share(unit: str, lo: int, hi: int) -> None:
    lo, hi = sorted((lo, hi))
    assigner = Assigner(Plan.from_dict(plan_dict()))
    if assigner.assign(unit, {}, _split(lo)).is_candidate:
        assert assigner.assign(unit, {}, _split(hi)).is_candidate


@settings(max_examples=20, deadline=None)
@given(share=st.integers(100, 9_900), salt=st.text(min_size=1, max_size=8))
def test_share_within_tolerance(share: int, salt: str) -> None:
    n = 20_000
    hits = sum(bucket(salt, f"unit-{i}") < share for i in range(n))
    p = share / 10_000
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(hits / n - p) < 5 * sd


def test_buckets_are_uniform() -> None:
    counts = Counter(bucket("uniformity", f"u{i}") // 1000 for i in range(50_000))
    assert len(counts) == 10
    assert max(counts.values()) - min(counts.values()) < 700


def test_targeting_comes_first() -> None:
    data = plan_dict(targeting={"always_candidate": {"plan": ["internal"], "user_id": ["vip"]},
                                "never_candidate": {"country": ["DE"]}})
    assigner = Assigner(Plan.from_dict(data))
    split = _split(0)
    split = Split("s", 0, 1, 0, "v2", "v1", active=True)
    a = assigner.assign("anyone", {"plan": "internal"}, split)
    assert a.is_candidate and a.reason is Reason.TARGETED
    assert assigner.assign("vip", {}, split).is_candidate
    b = assigner.assign("anyone", {"plan": "internal", "country": "DE"}, _split(10_000))
    assert not b.is_candidate and b.reason is Reason.EXCLUDED


def test_targeted_units_are_not_exposed_during_shadow() -> None:
    data = plan_dict(targeting={"always_candidate": {"plan": ["internal"]}})
    assigner = Assigner(Plan.from_dict(data))
    a = assigner.assign("u1", {"plan": "internal"}, _split(0, shadow=10_000))
    assert not a.is_candidate and a.shadow


def test_anonymous_requests_get_the_baseline() -> None:
    assigner = Assigner(Plan.from_dict(plan_dict()))
    for unit in (None, ""):
        a = assigner.assign(unit, {}, _split(10_000 - 1))
        assert not a.is_candidate and a.reason is Reason.ANONYMOUS


def test_inactive_split_serves_baseline_and_promoted_serves_candidate() -> None:
    assigner = Assigner(Plan.from_dict(plan_dict()))
    off = Split("s", 0, 5_000, 0, "v2", "v1", active=False)
    assert not assigner.assign("u", {}, off).is_candidate
    promoted = Split("s", 0, 10_000, 0, "v2", "v1", active=False, serve_candidate_to_all=True)
    assert assigner.assign("u", {}, promoted).is_candidate


def test_unit_ids_chosen_from_the_public_salt_do_not_land_on_one_arm() -> None:
    """The abuse: pick unit ids that the plan's public salt sends to the baseline, send only
    those, and the split looks broken (a sample-ratio mismatch pauses the rollout). The secret
    seed drawn at registration makes the choice blind: they land at the stage's share."""
    from safeshift import MemoryStore, Rollout, VirtualClock

    data = plan_dict()
    data["stages"][0]["traffic"] = "50%"
    plan = Plan.from_dict(data)
    public = Assigner(plan)  # what an outsider can compute from the plan
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=VirtualClock())
    split = rollout.split()
    chosen = [u for u in (f"attacker-{i}" for i in range(20_000))
              if public.assign(u, None, split).arm == BASELINE][:4000]
    assert len(chosen) == 4000
    seed = rollout.store.get_state(plan.rollout).salt_seed
    assert len(seed) == 32
    share = sum(rollout.assign(u, None).arm == CANDIDATE for u in chosen) / len(chosen)
    assert 0.46 < share < 0.54, share  # 50 % ± 5 standard errors
    # a second registration of another rollout draws another seed
    other = Rollout.from_plan(Plan.from_dict({**data, "rollout": "other"}), store=rollout.store,
                              clock=VirtualClock())
    assert other.store.get_state("other").salt_seed != seed
