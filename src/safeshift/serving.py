"""How one request is served, in library mode (:meth:`Rollout.predict`) and in the gateway alike.

The steps are written once, as generators that *yield* the arm whose model must be called and
receive its result: :func:`run_sync` drives them with blocking calls (library mode),
:func:`run_async` with awaited ones (the gateway). Everything that decides what the user gets
and what is counted — the circuit breaker, the fallback to the baseline, whose fault a failure
is — lives here; the drivers only call models (an earlier release kept this logic in three
places, and library mode lost its circuit breaker).

Whose fault a failure is (docs/decisions.md, "Whose error is it"): when the baseline rejects
the inputs as malformed (its model raises ``ValueError``, ``KeyError``, ``TypeError`` or
``IndexError``), or the inputs are rejected before any model runs, the failure is the
*request's*: it is counted as ``request_fault`` on the assigned arm, never in ``error_rate``,
and never reaches the candidate's breaker. A candidate that fails on inputs the baseline
answers is the candidate's fault. On the candidate arm the baseline is called on every
candidate failure anyway (it answers the user), so the rule costs nothing; on the baseline arm
it needs no candidate call.

A synchronous candidate runs in its own :class:`CandidatePool`, where a call that overruns its
timeout hands its thread's place to a new one: hung calls never starve the calls behind them,
and a call is only charged a timeout after running (not waiting) for the whole timeout.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from safeshift.assign import BASELINE, Assignment
from safeshift.breaker import CircuitBreaker
from safeshift.clock import SystemClock
from safeshift.models.base import ModelResult, Rows

if TYPE_CHECKING:
    from safeshift.rollout import Rollout

T = TypeVar("T")

BREAKER_OPEN = "circuit breaker open: the candidate was not called"
SATURATED = "candidate pool saturated: the candidate was not called"
INPUT_ERRORS = ("ValueError", "KeyError", "TypeError", "IndexError")
"""Exceptions a model raises on inputs it cannot read (a missing feature, a wrong type)."""
INPUTS = "inputs"
BASELINE_FAILED = "baseline"
HUNG_PER_THREAD = 16
"""Calls past their timeout a pool keeps running (each on its own thread) per pool thread,
before it refuses new calls (``saturated``)."""

Steps = Generator[str, ModelResult, T]
"""A serving routine: yields the arm to call, is sent its result, returns what it decided."""


@dataclass(slots=True)
class Answer:
    """What a request gets: the served result, or why there is none."""

    result: ModelResult  # the answer served; on a failure, the result that explains it
    arm: str  # the arm whose model answered
    version: str
    fallback: str | None = None  # why the candidate's answer was replaced, if it was
    shadow: bool = False  # a shadow stage: a copy of the request goes to the candidate
    failure: str | None = None  # INPUTS (the request's fault) or BASELINE_FAILED

    @property
    def outputs(self) -> list[Any]:
        return self.result.outputs or []


def is_input_error(result: ModelResult) -> bool:
    """The model could not read the inputs (it raised one of :data:`INPUT_ERRORS`)."""
    return result.error is not None and result.error.startswith(INPUT_ERRORS)


def fallback_reason(result: ModelResult) -> str:
    """``breaker_open`` | ``saturated`` | ``timeout`` | ``invalid`` (NaN, wrong shape) | ``error``."""
    error = result.error or ""
    if error == BREAKER_OPEN:
        return "breaker_open"
    if error.startswith(SATURATED):
        return "saturated"
    if result.timed_out:
        return "timeout"
    if error.startswith(("wrong shape", "non-finite")):
        return "invalid"
    return "error"


def rows_problem(rows: Rows) -> str | None:
    """Why ``rows`` cannot go to any model (an empty batch, a null row), or None."""
    if not rows:
        return "ValueError: no rows: send one row or a non-empty list of rows"
    if any(row is None for row in rows):
        return "ValueError: a row cannot be null"
    return None


def failed(exc: Exception, start: float | None = None) -> ModelResult:
    """A backend that broke the protocol by raising, as the failed result it should have been."""
    latency = 0.0 if start is None else (time.perf_counter() - start) * 1000
    return ModelResult(error=f"{type(exc).__name__}: {exc}", latency_ms=latency)


# -- the candidate's threads -------------------------------------------------------------------


class PoolCall:
    """One call in a :class:`CandidatePool`."""

    __slots__ = ("detached", "finished", "fn", "future", "rows", "started", "submitted")

    def __init__(self, fn: Callable[[Rows], ModelResult], rows: Rows) -> None:
        self.fn = fn
        self.rows = rows
        self.future: Future[ModelResult] = Future()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.finished = False
        self.detached = False  # nobody waits for it any more; its thread leaves when it ends

    def deadline(self, timeout: float) -> float:
        """When to stop waiting: ``timeout`` after it started running, or after it was queued
        while it has not started (then it is refused, not charged a timeout)."""
        return (self.started if self.started is not None else self.submitted) + timeout


class CandidatePool:
    """Threads for a synchronous candidate called under a timeout, where a hung call cannot
    starve the others.

    ``threads`` workers take calls from a queue. A call that has *run* for its whole timeout is
    a timeout (the candidate's fault) and is detached: its thread finishes it in the background
    and then exits, and a new worker takes its place at once, so the calls behind it are not
    kept waiting. At most ``max_hung`` detached calls run at a time; beyond that new calls are
    refused (``saturated``, no latency), as is a call still queued when its timeout has passed
    since it was queued. Nothing is charged a timeout for time spent waiting for a thread."""

    def __init__(self, threads: int, *, max_hung: int | None = None,
                 name: str = "safeshift-candidate") -> None:
        self.threads = max(1, threads)
        self.max_hung = self.threads * HUNG_PER_THREAD if max_hung is None else max_hung
        self.name = name
        self.hung = 0  # detached calls still running
        self._queue: queue.SimpleQueue[PoolCall | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers = 0  # workers that are not finishing a detached call
        self._spawned = 0
        self._closed = False

    def refused(self, why: str) -> ModelResult:
        return ModelResult(error=f"{SATURATED} ({why})", not_called=True)

    def hung_calls(self) -> float:
        """Detached calls still running (a gauge)."""
        return float(self.hung)

    def refusal(self) -> ModelResult:
        """The result of a call :meth:`submit` refused."""
        return self.refused("the pool is closed" if self._closed
                            else f"{self.hung} calls hung past their timeout")

    def submit(self, fn: Callable[[Rows], ModelResult], rows: Rows) -> PoolCall | None:
        """Queue a call; None when ``max_hung`` calls are hung already (or the pool is closed)."""
        with self._lock:
            if self._closed or self.hung >= self.max_hung:
                return None
            if self._workers < self.threads:
                self._spawn()
        call = PoolCall(fn, rows)
        self._queue.put(call)
        return call

    def expire(self, call: PoolCall, timeout: float) -> ModelResult | None:
        """At ``call``'s deadline: its failure (a timeout, or refused if it never started), or
        None when it finished or has run for less than ``timeout`` (wait until its deadline)."""
        now = time.perf_counter()
        with self._lock:
            if call.finished:
                return None
            if call.started is None:
                if call.future.cancel():
                    return self.refused(f"no thread free for {timeout * 1000:.0f} ms")
                return None  # it started just now
            if now - call.started < timeout:
                return None
            self._detach(call)
        return ModelResult(error=f"timeout after {timeout * 1000:.0f} ms", timed_out=True,
                           latency_ms=(now - call.started) * 1000)

    def abandon(self, call: PoolCall) -> None:
        """Nobody waits for ``call`` any more (the request was cancelled)."""
        with self._lock:
            if call.finished or call.detached or call.future.cancel():
                return
            self._detach(call)

    def run(self, fn: Callable[[Rows], ModelResult], rows: Rows, timeout: float) -> ModelResult:
        """``fn(rows)`` in the pool, waited for in the calling thread (library mode)."""
        call = self.submit(fn, rows)
        if call is None:
            return self.refusal()
        while True:
            wait = call.deadline(timeout) - time.perf_counter()
            if wait > 0:
                try:
                    return call.future.result(wait)
                except FutureTimeout:
                    continue
            failure = self.expire(call, timeout)
            if failure is not None:
                return failure
            if call.finished:
                return call.future.result()

    async def run_async(self, call: PoolCall, timeout: float) -> ModelResult:
        """Await a submitted ``call`` without blocking the event loop (the gateway)."""
        waiter = asyncio.wrap_future(call.future)
        try:
            while True:
                wait = call.deadline(timeout) - time.perf_counter()
                if wait > 0:
                    done, _ = await asyncio.wait((waiter,), timeout=wait)
                    if done:
                        return waiter.result()
                    continue
                failure = self.expire(call, timeout)
                if failure is not None:
                    waiter.cancel()  # the thread's late answer is discarded
                    return failure
                if call.finished:
                    return await waiter
        except asyncio.CancelledError:
            self.abandon(call)
            raise

    def close(self) -> None:
        """Stop the workers once they finish their current call; refuse new calls."""
        with self._lock:
            self._closed = True
            workers = self._workers
        for _ in range(workers):
            self._queue.put(None)

    def _spawn(self) -> None:  # under the lock
        self._workers += 1
        self._spawned += 1
        threading.Thread(target=self._work, name=f"{self.name}-{self._spawned}",
                         daemon=True).start()

    def _detach(self, call: PoolCall) -> None:  # under the lock
        call.detached = True
        self.hung += 1
        self._workers -= 1
        if not self._closed:
            self._spawn()  # the calls queued behind it get a thread now

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            call.started = time.perf_counter()
            if not call.future.set_running_or_notify_cancel():
                continue  # refused while queued
            try:
                result = call.fn(call.rows)
            except Exception as exc:  # a backend that breaks the protocol by raising
                result = failed(exc, call.started)
            with self._lock:
                call.finished = True
                detached = call.detached
                if detached:
                    self.hung -= 1
            call.future.set_result(result)
            if detached:
                return  # another worker took this one's place


# -- the serving steps -------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Guard:
    """One candidate variant's protection: its timeout, circuit breaker and thread pool."""

    name: str
    timeout: float
    breaker: CircuitBreaker
    pool: CandidatePool
    typical: float = 0.001  # moving average of successful calls' latency, seconds


class Serving:
    """The serving logic of one rollout; one per rollout (``Rollout.serving``), whichever
    process mode carries the requests."""

    def __init__(self, rollout: Rollout, *, threads: int = 4) -> None:
        self.rollout = rollout
        self.recorder = rollout.recorder
        s = rollout.plan.serving
        # breakers count seconds as the rollout does: monotonic in production, virtual time in
        # a simulation (where hours pass in seconds)
        elapsed = time.monotonic if isinstance(rollout.clock, SystemClock) else rollout.clock.now
        self.guards = {
            name: Guard(name, rollout.timeout(name),
                        CircuitBreaker(s.breaker_failures, s.breaker_window, s.breaker_cooldown,
                                       clock=elapsed),
                        CandidatePool(threads, name=f"safeshift-{name}"))
            for name in rollout.plan.variants}

    def close(self) -> None:
        for guard in self.guards.values():
            guard.pool.close()

    def serve(self, a: Assignment, rows: Rows, *, context: Mapping[str, Any] | None,
              request_id: str) -> Steps[Answer]:
        """Serve one request on its assigned arm and count it. A candidate failure falls back
        to the baseline; see the module's docstring for whose fault a failure is."""
        rec = self.recorder
        problem = rows_problem(rows)
        if problem is not None:  # rejected before any model runs
            rec.record_request_fault(a, context=context)
            return Answer(ModelResult(error=problem), a.arm, a.version, failure=INPUTS)
        if not a.is_candidate:
            base = yield BASELINE
            if not base.ok:
                if is_input_error(base):
                    rec.record_request_fault(a, context=context)
                    return Answer(base, BASELINE, a.version, failure=INPUTS)
                rec.record(a, base, context=context, request_id=request_id)
                return Answer(base, BASELINE, a.version, failure=BASELINE_FAILED)
            rec.record(a, base, context=context, request_id=request_id, keep=not a.shadow)
            return Answer(base, BASELINE, a.version, shadow=a.shadow)
        guard = self.guards[a.variant]
        cand = yield from self._call(guard)
        if cand.ok:
            rec.record(a, cand, context=context, request_id=request_id)
            return Answer(cand, a.arm, a.version)
        base_version = self.rollout.plan.baseline.version
        settled = cand.not_called  # a refused call has no outcome for the breaker
        try:
            base = yield BASELINE
            if is_input_error(base):  # both fail on these inputs: the request's fault
                rec.record_request_fault(a, context=context)
                return Answer(base, BASELINE, base_version, failure=INPUTS)
            if not settled:  # the baseline read these inputs: the candidate's fault
                guard.breaker.record(False)
                settled = True
        finally:
            if not settled:
                guard.breaker.abandon()
        rec.record(a, cand, context=context, request_id=request_id)
        if not base.ok:
            return Answer(base, BASELINE, base_version, failure=BASELINE_FAILED)
        return Answer(base, BASELINE, base_version, fallback=fallback_reason(cand))

    def shadow(self, a: Assignment, rows: Rows, base: ModelResult, *,
               context: Mapping[str, Any] | None, request_id: str | None) -> Steps[ModelResult]:
        """A shadow copy: the candidate's answer to inputs the baseline answered (so a failure
        is the candidate's), compared pairwise and counted."""
        guard = self.guards[self.rollout.shadow_variant]
        result = yield from self._call(guard)
        if not result.ok and not result.not_called:
            guard.breaker.record(False)
        self.recorder.record_shadow(a, guard.name, base, result, context=context, request_id=request_id)
        return result

    @staticmethod
    def _call(guard: Guard) -> Steps[ModelResult]:
        """The candidate's result, unless its breaker refuses the call. A success is reported
        to the breaker at once; a failure is left to the caller, who knows whose it is."""
        if not guard.breaker.allow():
            return ModelResult(error=BREAKER_OPEN, not_called=True)
        try:
            result = yield guard.name
        except BaseException:  # the request was cancelled: the call has no outcome
            guard.breaker.abandon()
            raise
        if result.not_called:  # refused by the pool
            guard.breaker.abandon()
        elif result.ok:
            guard.breaker.record(True)
        return result


def run_sync(steps: Steps[T], call: Callable[[str], ModelResult]) -> T:
    """Drive serving ``steps`` with blocking model calls: ``call(arm)`` → its result."""
    try:
        arm = next(steps)
        while True:
            arm = steps.send(call(arm))
    except StopIteration as done:
        return cast(T, done.value)
    finally:
        steps.close()


async def run_async(steps: Steps[T], call: Callable[[str], Awaitable[ModelResult]]) -> T:
    """Drive serving ``steps`` with awaited model calls: ``await call(arm)`` → its result."""
    try:
        arm = next(steps)
        while True:
            arm = steps.send(await call(arm))
    except StopIteration as done:
        return cast(T, done.value)
    finally:
        steps.close()
