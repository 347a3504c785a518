"""The shared serving steps (safeshift.serving) in library mode: whose fault a failure is, the
circuit breaker, and a candidate pool in which hung calls starve nobody."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from safeshift import MemoryStore, Plan
from safeshift.assign import BASELINE, CANDIDATE
from safeshift.breaker import BreakerState
from safeshift.errors import RejectedInputError, RolloutError
from safeshift.models import ModelResult
from safeshift.models.python import PythonModel
from safeshift.rollout import Rollout
from safeshift.serving import SATURATED, CandidatePool, fallback_reason, run_sync


def _plan(**serving: Any) -> Plan:
    return Plan.from_dict({
        "rollout": "r", "endpoint": "e",
        "baseline": {"version": "v1", "model": "fake:base?output=1"},
        "candidate": {"version": "v2", "model": "fake:cand?output=2"},
        "change": {"summary": "test"},
        "stages": [{"name": "canary", "traffic": "99%", "min_duration": "1h"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.01}],
        "serving": serving,
    })


def _needs_x(rows: list[Any]) -> list[Any]:
    return [row["x"] for row in rows]  # KeyError on a row without "x": a bad input


def _totals(rollout: Rollout, arm: str) -> dict[str, tuple[float, float]]:
    rollout.flush()
    out: dict[str, tuple[float, float]] = {}
    for r in rollout.store.telemetry(rollout.plan.rollout, 0):
        if r.arm == arm:
            n, s = out.get(r.signal, (0.0, 0.0))
            out[r.signal] = (n + r.n, s + r.s)
    return out


def _units(rollout: Rollout, arm: str, n: int) -> list[str]:
    units = [f"u{i}" for i in range(5000) if rollout.assign(f"u{i}").arm == arm]
    assert len(units) >= n
    return units[:n]


# -- whose fault ---------------------------------------------------------------------------------


def test_inputs_both_models_reject_are_request_faults_and_never_open_the_breaker() -> None:
    rollout = Rollout.from_plan(_plan(breaker_failures=3), store=MemoryStore(),
                                models={"baseline": PythonModel(_needs_x),
                                        "candidate": PythonModel(_needs_x)})
    cand, base = _units(rollout, CANDIDATE, 10), _units(rollout, BASELINE, 3)
    for unit in cand + base:
        with pytest.raises(RejectedInputError, match="rejected the inputs: KeyError"):
            rollout.predict({"y": 1}, unit=unit)
    with pytest.raises(RejectedInputError):  # rejected before any model runs
        rollout.predict([], unit=cand[0])
    guard = rollout.serving.guards[CANDIDATE]
    assert guard.breaker.state is BreakerState.CLOSED and guard.breaker.opened == 0
    ok = rollout.predict({"x": 7}, unit=cand[0])
    assert (ok.outputs, ok.arm, ok.fallback) == ([7], CANDIDATE, False)
    c, b = _totals(rollout, CANDIDATE), _totals(rollout, BASELINE)
    assert c["request_fault"] == (11.0, 11.0) and b["request_fault"] == (3.0, 3.0)
    assert c["error_rate"] == (1.0, 0.0) and "error_rate" not in b  # only the good request
    status = rollout.status().to_json()["request_faults"]
    assert status[CANDIDATE]["count"] == 11 and status[BASELINE]["count"] == 3
    assert status[CANDIDATE]["share"] == pytest.approx(11 / 12)


def test_units_follow_assignment_even_when_their_inputs_are_refused() -> None:
    """A lenient candidate answers inputs a strict baseline rejects: were units counted only on
    answered requests, the candidate arm would count more units than the split sends it and
    the sample-ratio check would pause a healthy rollout."""
    rollout = Rollout.from_plan(_plan(), store=MemoryStore(),
                                models={"baseline": PythonModel(_needs_x),
                                        "candidate": PythonModel(lambda rows: [0] * len(rows))})
    base = _units(rollout, BASELINE, 5)
    for unit in base:
        with pytest.raises(RejectedInputError):
            rollout.predict({"y": 1}, unit=unit)  # the baseline rejects it: a request fault
    rollout.predict({"x": 1}, unit=base[0])  # the same unit again: counted once
    b = _totals(rollout, BASELINE)
    assert b["units"] == (5.0, 5.0) and b["request_fault"] == (5.0, 5.0)


def test_a_candidate_that_fails_where_the_baseline_answers_is_at_fault() -> None:
    def strict(rows: list[Any]) -> list[Any]:  # the candidate needs a feature the baseline does not
        return [row["x"] + row["age"] for row in rows]

    rollout = Rollout.from_plan(_plan(breaker_failures=3, breaker_cooldown="1h"),
                                store=MemoryStore(),
                                models={"baseline": PythonModel(_needs_x),
                                        "candidate": PythonModel(strict)})
    cand = _units(rollout, CANDIDATE, 6)
    answers = [rollout.predict({"x": 1}, unit=u) for u in cand]
    assert all(p.fallback and p.arm == BASELINE and p.outputs == [1] for p in answers)
    # library mode has the gateway's breaker: three failures open it, the rest are refused
    assert rollout.serving.guards[CANDIDATE].breaker.state is BreakerState.OPEN
    c = _totals(rollout, CANDIDATE)
    assert c["error_rate"] == (6.0, 6.0) and c["latency_ms"][0] == 3.0  # refusals: no latency
    assert "request_fault" not in c


def test_a_baseline_failure_that_is_not_the_inputs_is_counted_and_raised() -> None:
    def broken(rows: list[Any]) -> list[Any]:
        raise RuntimeError("out of memory")

    rollout = Rollout.from_plan(_plan(), store=MemoryStore(),
                                models={"baseline": PythonModel(broken)})
    with pytest.raises(RolloutError, match="baseline model failed: RuntimeError") as info:
        rollout.predict({"x": 1}, unit=_units(rollout, BASELINE, 1)[0])
    assert not isinstance(info.value, RejectedInputError)
    assert _totals(rollout, BASELINE)["error_rate"] == (1.0, 1.0)


def test_refused_calls_never_feed_the_breaker() -> None:
    """A call refused by a saturated pool, or by a half-open breaker whose probe is in flight,
    has no outcome: it counts as a failure in the telemetry, but must not reopen the breaker
    (nor free the probe's slot)."""
    rollout = Rollout.from_plan(_plan(breaker_failures=2, breaker_cooldown="5s"),
                                store=MemoryStore())
    a = rollout.assign(_units(rollout, CANDIDATE, 1)[0])
    guard = rollout.serving.guards[CANDIDATE]
    now = [0.0]
    guard.breaker.clock = lambda: now[0]

    def serve(candidate: ModelResult) -> Any:
        def call(arm: str) -> ModelResult:
            return ModelResult(outputs=[1]) if arm == BASELINE else candidate
        return run_sync(rollout.serving.serve(a, [{"x": 1}], context=None, request_id="r"), call)

    saturated = guard.pool.refused("test")
    assert serve(saturated).fallback == "saturated"
    assert serve(saturated).fallback == "saturated"
    assert guard.breaker.state is BreakerState.CLOSED  # two refusals are not two failures
    assert serve(ModelResult(error="RuntimeError: x")).fallback == "error"
    assert serve(ModelResult(error="RuntimeError: x")).fallback == "error"
    assert guard.breaker.state is BreakerState.OPEN
    now[0] = 10.0  # half-open: one probe at a time
    probe = rollout.serving.serve(a, [{"x": 1}], context=None, request_id="probe")
    assert next(probe) == CANDIDATE  # the probe is in flight
    assert serve(ModelResult(outputs=[2])).fallback == "breaker_open"  # refused meanwhile
    assert guard.breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(StopIteration):
        probe.send(ModelResult(outputs=[2]))
    assert guard.breaker.state is BreakerState.CLOSED


# -- the candidate pool --------------------------------------------------------------------------


def _model(seconds: float, release: threading.Event | None = None) -> Any:
    def call(rows: Any) -> ModelResult:
        if release is not None:
            release.wait(seconds)
        else:
            time.sleep(seconds)
        return ModelResult(outputs=[1] * len(rows))
    return call


def test_a_call_queued_behind_a_hung_one_is_not_charged_its_timeout() -> None:
    release = threading.Event()
    pool = CandidatePool(1)
    try:
        with ThreadPoolExecutor(2) as callers:
            hung = callers.submit(pool.run, _model(5, release), [1], 0.1)
            time.sleep(0.01)
            queued = callers.submit(pool.run, _model(0.0), [1], 0.1)
            first, second = hung.result(2), queued.result(2)
        assert first.timed_out and first.latency_ms >= 100
        assert second.ok  # it ran on the thread that replaced the hung call's
        assert pool.hung == 1
    finally:
        release.set()
    deadline = time.monotonic() + 2
    while pool.hung and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.hung == 0
    pool.close()


def test_the_timeout_runs_from_the_start_of_the_call_not_from_the_queue() -> None:
    pool = CandidatePool(1)
    with ThreadPoolExecutor(2) as callers:
        slow = callers.submit(pool.run, _model(0.06), [1], 0.1)  # healthy, within its timeout
        time.sleep(0.01)
        queued = callers.submit(pool.run, _model(0.06), [1], 0.1)  # waits ~50 ms, runs 60
        assert slow.result(2).ok
        assert queued.result(2).ok  # 110 ms after it was queued, 60 ms after it started
    pool.close()


def test_a_pool_with_every_allowed_call_hung_refuses_as_saturated() -> None:
    release = threading.Event()
    pool = CandidatePool(1, max_hung=2)
    try:
        assert pool.run(_model(5, release), [1], 0.05).timed_out
        assert pool.run(_model(5, release), [1], 0.05).timed_out  # on the replacement thread
        assert pool.hung == 2
        refused = pool.run(_model(0.0), [1], 0.05)  # two hung: no more
        assert refused.not_called and refused.latency_ms == 0
        assert fallback_reason(refused) == "saturated"
        assert refused.error is not None and refused.error.startswith(SATURATED)
        release.set()
        deadline = time.monotonic() + 2
        while pool.hung and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.run(_model(0.0), [1], 0.05).ok  # the hung calls ended: calls go through
    finally:
        release.set()
        pool.close()


def test_a_call_that_never_got_a_thread_is_refused_and_never_runs() -> None:
    release = threading.Event()
    ran: list[int] = []
    pool = CandidatePool(1)

    def record(rows: Any) -> ModelResult:
        ran.append(1)
        return ModelResult(outputs=[1])

    try:
        with ThreadPoolExecutor(2) as callers:
            # healthy but slow: it holds the only thread within its own (long) timeout
            busy = callers.submit(pool.run, _model(0.5, release), [1], 5.0)
            time.sleep(0.01)
            starved = pool.run(record, [1], 0.05)
            release.set()
            assert busy.result(2).ok
        assert starved.not_called and fallback_reason(starved) == "saturated"
        time.sleep(0.05)
        assert ran == []
    finally:
        release.set()
        pool.close()


# -- measured: 2 % of calls hang ------------------------------------------------------------------


class HangsEvery:
    """A candidate that hangs on every ``k``-th call (for ``seconds``, or until released)."""

    def __init__(self, k: int, seconds: float) -> None:
        self.k = k
        self.seconds = seconds
        self.calls = 0
        self.hangs = 0
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, rows: list[Any]) -> list[Any]:
        with self._lock:
            self.calls += 1
            hang = self.calls % self.k == 0
            self.hangs += hang
        if hang:
            self.release.wait(self.seconds)
        return [2] * len(rows)


def test_library_mode_counts_two_percent_of_hung_calls_as_two_percent() -> None:
    """8 caller threads, 4 candidate threads, every 50th call hangs for a second against a
    50 ms timeout. Before each candidate had its own pool the hung calls held all four
    threads and the calls queued behind them timed out too (measured with 1 s hangs against
    100 ms: 18.6 % counted with 4 callers, 37.1 % with 8, for 2.3 % hung)."""
    model = HangsEvery(50, 1.0)
    rollout = Rollout.from_plan(_plan(candidate_timeout="50ms", breaker_failures=10_000),
                                store=MemoryStore(), models={"candidate": PythonModel(model)})
    try:
        with ThreadPoolExecutor(8) as callers:
            answers = list(callers.map(lambda i: rollout.predict({"x": i}, unit=f"u{i}"),
                                       range(1500)))
    finally:
        model.release.set()
    n, failures = _totals(rollout, CANDIDATE)["error_rate"]
    # every call was made but for a few refused as "saturated" while the threads were hung
    assert n - 0.005 * n <= model.calls <= n and model.hangs == model.calls // 50
    # the hung calls (2 %), give or take a healthy call a loaded machine descheduled for 50 ms
    assert model.hangs <= failures <= model.hangs + 0.005 * n
    assert sum(p.fallback for p in answers) == failures
    rollout.close()


def test_library_shadow_copies_are_protected_like_live_calls() -> None:
    """A shadow copy runs under the candidate's timeout (the shared serving steps): a hung
    candidate costs the copy 50 ms, not the shadow worker forever."""
    model = HangsEvery(1, 5.0)  # every call hangs
    plan = Plan.from_dict({**_plan().canonical(), "stages": [
        {"name": "shadow", "shadow": "100%", "min_duration": "1h"}],
        "serving": {"candidate_timeout": "50ms"}})
    rollout = Rollout.from_plan(plan, store=MemoryStore(), models={"candidate": PythonModel(model)})
    try:
        start = time.monotonic()
        for i in range(3):
            assert rollout.predict({"x": i}, unit=f"u{i}").outputs == [1]
        rollout.tick()  # finishes the copies first
        assert time.monotonic() - start < 2
    finally:
        model.release.set()
    c = _totals(rollout, CANDIDATE)
    assert c["error_rate"] == (3.0, 3.0) and model.calls == 3
    rollout.close()
