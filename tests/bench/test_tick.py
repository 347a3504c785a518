"""``safeshift bench tick``: the indexed summary gives the previous algorithm's analysis exactly,
reads each cell a constant number of times per tick (counted, not timed), and the benchmark's
telemetry looks like the store's."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from safeshift.analysis import analyse
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.bench import tick as bench
from safeshift.plan import Plan
from safeshift.telemetry import NO_CLUSTER, SegmentKeyer, Summary


@pytest.fixture(scope="module")
def plan() -> Plan:
    return bench.bench_plan()


@pytest.fixture(scope="module")
def small() -> bench.Telemetry:
    return bench.telemetry(800)


def test_telemetry_is_shaped_like_the_stores(small: bench.Telemetry) -> None:
    assert 700 <= small.cells <= 900
    keyer = SegmentKeyer(bench.ATTRIBUTES)
    cells: dict[tuple[str, str, str, int], set[str]] = {}
    for r in small.rows:
        assert (r.rollout, r.stage, r.window, r.cohort) == (bench.ROLLOUT, 0, 0, "hash")
        assert r.arm in (BASELINE, CANDIDATE)
        assert NO_CLUSTER <= r.cluster < bench.CLUSTERS
        assert keyer.key(dict(part.split("=") for part in r.segment.split("|"))) == r.segment
        cells.setdefault((r.arm, r.cohort, r.segment, r.cluster), set()).add(r.signal)
    assert len(cells) == small.cells
    for (_, _, _, cluster), signals in cells.items():
        if cluster == NO_CLUSTER:  # the latency histogram, kept without the cluster
            assert signals == {"latency_ms"}
        else:
            assert signals == {"requests", "error_rate", "latency_ms", "latency_ms>250", "units"}
    # Zipf-like: a large combination fills many clusters, a small one a single cluster
    per_segment: dict[str, int] = {}
    for (_, _, seg, cluster) in cells:
        per_segment[seg] = per_segment.get(seg, 0) + (cluster != NO_CLUSTER)
    assert max(per_segment.values()) >= 10 * min(per_segment.values()) == 10


def test_rescan_summary_answers_as_the_index(small: bench.Telemetry) -> None:
    new, old = Summary.from_rows(small.rows), bench.RescanSummary.from_rows(small.rows)
    assert isinstance(old, bench.RescanSummary)
    assert old.segment_values() == new.segment_values()
    assert old.arms() == new.arms() == {BASELINE, CANDIDATE}
    for where in [None, ("country", "BR"), ("device", "ios"), ("plan", "enterprise")]:
        for signal in ("requests", "error_rate", "latency_ms>250", "units"):
            assert old.pooled(CANDIDATE, signal, where=where) == new.pooled(CANDIDATE, signal,
                                                                            where=where)
    assert old.scans == 2 + 16


def test_both_algorithms_agree_and_the_new_one_reads_each_cell_once(
        plan: Plan, small: bench.Telemetry) -> None:
    r = bench.run_size(plan, 800, old=True, repeats=(1, 1, 1))
    assert r.identical is True
    assert len(r.verdicts) >= 3  # statuses of several kinds to agree on
    assert r.store_rows == r.rows  # the store hands back every row it was given
    old = bench.RescanSummary.from_rows(small.rows)
    assert bench.same(analyse(plan, 0, Summary.from_rows(small.rows)), analyse(plan, 0, old))

    # counted on the cells themselves: today's summary reads every cell twice per tick (the
    # index, and the arms for the sample-ratio check), the old one once per lookup
    assert r.new_reads <= 2 * r.cells
    assert r.lookups > 4 * r.values  # two guardrails × both arms per judged segment value
    assert bench.cell_visits(plan, small.rows, bench.RescanSummary) == r.cells * r.lookups
    assert isinstance(old, bench.RescanSummary) and old.scans == r.lookups


def test_the_new_summary_is_linear_in_cells(plan: Plan, small: bench.Telemetry) -> None:
    larger = bench.telemetry(2400)
    reads = {}
    for data in (small, larger):
        new = bench.cell_visits(plan, data.rows)
        old = bench.cell_visits(plan, data.rows, bench.RescanSummary)
        lookups, visits, _ = bench.instrumented(plan, data.rows)
        assert visits == new
        reads[data.cells] = (new / data.cells, old / data.cells, lookups)
    (new_small, old_small, lookups_small), (new_large, old_large, lookups_large) = reads.values()
    assert new_small == new_large <= 2  # per cell: constant
    assert (old_small, old_large) == (lookups_small, lookups_large)  # per cell: per lookup
    assert old_large >= 100 * new_large


def test_main_prints_writes_json_and_fails_on_a_difference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    out = bench.main(quick=True, json_path=tmp_path / "tick.json",
                     console=Console(file=buffer, width=200), sizes=(300,),
                     repeats=(1, 1, 1))
    text = buffer.getvalue()
    assert "speed-up" in text and "identical analyses" in text
    data = json.loads((tmp_path / "tick.json").read_text())
    assert data == json.loads(json.dumps(out))
    assert data["sizes"][0]["identical"] is True and data["sizes"][0]["old_measured"] is True

    monkeypatch.setattr(bench, "same", lambda a, b: False)
    with pytest.raises(SystemExit) as exc:
        bench.main(quick=True, json_path=None, console=Console(file=io.StringIO()), sizes=(300,),
                   repeats=(1, 1, 1))
    assert exc.value.code == 1


def test_the_old_algorithm_is_extrapolated_past_its_budget(plan: Plan) -> None:
    r = bench.run_size(plan, 300, per_read=1.0, store=False, repeats=(1, 1, 1))  # a second per cell read
    assert not r.old_measured and r.identical is None
    assert r.old_s == pytest.approx(r.cells * r.lookups) and r.speedup is not None
