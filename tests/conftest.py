"""Shared fixtures: plans, virtual clocks and stores."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safeshift import MemoryStore, Plan, VirtualClock
from safeshift.store import SQLStore, Store, sqlite_url

ROOT = Path(__file__).resolve().parent.parent

BASE_PLAN: dict[str, Any] = {
    "rollout": "test-rollout",
    "endpoint": "score",
    "baseline": {"version": "v1", "model": "fake:base?output=1"},
    "candidate": {"version": "v2", "model": "fake:cand?output=1"},
    "change": {"summary": "a test change", "owner": "tests"},
    "unit": "user_id",
    "segments": ["country"],
    "stages": [
        {"name": "canary", "traffic": "10%", "min_duration": "5m", "min_samples": 300},
        {"name": "half", "traffic": "50%", "min_duration": "5m", "min_samples": 300},
        {"name": "full", "traffic": "100%"},
    ],
    "guardrails": [{"metric": "error_rate", "tolerance": 0.02}],
    "analysis": {"alpha": 0.05, "expected_samples": 1000},
}


def plan_dict(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE_PLAN)
    data.update(changes)
    return data


@pytest.fixture
def plan() -> Plan:
    return Plan.from_dict(plan_dict())


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else SQLStore(
        sqlite_url(tmp_path / "store.db"))
    yield s
    s.close()
