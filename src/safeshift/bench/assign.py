"""``safeshift bench assign``: in-process ``Rollout.assign`` throughput on one core.

Measures three paths side by side: the bare bucket function, ``Rollout.assign`` for a hashed
unit, and ``Rollout.assign`` with targeting rules that the unit does not match.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safeshift.assign import bucket
from safeshift.clock import VirtualClock
from safeshift.models import FakeModel
from safeshift.plan import Plan
from safeshift.rollout import Rollout
from safeshift.store import MemoryStore

TARGET = 200_000


def _plan(targeting: bool) -> Plan:
    data: dict[str, Any] = {
        "rollout": "bench-assign", "endpoint": "bench",
        "baseline": {"version": "v1", "model": "fake:a"},
        "candidate": {"version": "v2", "model": "fake:b"},
        "change": {"summary": "benchmark"},
        "unit": "user_id", "segments": ["country"],
        "stages": [{"name": "canary", "traffic": "5%"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.01}],
    }
    if targeting:
        data["targeting"] = {"always_candidate": {"plan": ["internal"]},
                             "never_candidate": {"country": ["DE"]}}
    return Plan.from_dict(data)


def _rate(fn: Any, units: list[str], repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        fn(units)
        elapsed = time.perf_counter() - start
        best = max(best, len(units) / elapsed)
    return best


def main(*, quick: bool, json_path: Path | None, console: Console) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    units = [f"user-{i}" for i in range(n)]
    context = {"country": "BR", "plan": "pro"}
    results: dict[str, float] = {}

    def run_bucket(us: list[str]) -> None:
        for u in us:
            bucket("bench-assign", u)

    results["bucket"] = _rate(run_bucket, units, 3)
    for name, targeting in (("assign", False), ("assign_targeting", True)):
        rollout = Rollout.from_plan(_plan(targeting), store=MemoryStore(), clock=VirtualClock(),
                                    models={"baseline": FakeModel(), "candidate": FakeModel()})
        assign = rollout.assign

        def run_assign(us: list[str], assign: Any = assign) -> None:
            for u in us:
                assign(u, context)

        results[name] = _rate(run_assign, units, 3)
    table = Table(title=f"assignments per second, one core, {n:,} units, best of 3")
    table.add_column("path")
    table.add_column("per second", justify="right")
    table.add_column("µs each", justify="right")
    table.add_column(f"vs target {TARGET:,}/s", justify="right")
    for name, rate in results.items():
        table.add_row(name, f"{rate:,.0f}", f"{1e6 / rate:.2f}", f"{rate / TARGET:.1f}×")
    console.print(table)
    out = {"units": n, "per_second": results, "target": TARGET}
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=2))
    return out
