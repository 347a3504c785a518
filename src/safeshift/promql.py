"""Guardrails measured by Prometheus: one PromQL value per arm and interval, judged like any
other guardrail.

A team's service metrics often live in Prometheus already — a p95 from the model server's own
histogram, GPU memory, a downstream error rate — and a guardrail can read them there. A plan's
``prometheus: {url, query, interval}`` on a guardrail makes the process that holds the
rollout's controller lease read, every ``interval``, the query once per arm (``{{arm}}``,
``{{version}}`` and ``{{stage}}`` filled in), all arms at the same instant (the query's
``time``). Each answer is one observation of the guardrail's signal on that arm, in the
ordinary additive telemetry (cohort ``hash``, no unit cluster), and the difference of each
candidate value from the baseline's value at the same instant is one observation of the
signal ``METRIC:paired``. The controller then judges them with the same always-valid
confidence sequences as every guardrail (:func:`safeshift.analysis.compare_paired`; a relative
tolerance compares the two arms' means, an absolute bound the candidate's alone).

What the test assumes, and what the plan refuses for it
-------------------------------------------------------
The confidence sequence treats the interval values as independent draws around the arm's
mean. That holds, approximately, when each value summarises its own requests:

- **no range selector longer than the interval** (``validate`` refuses one): with
  ``rate(x[5m])`` read every 15 s, consecutive values share 95% of their requests and are
  almost the same number; the test would count twenty observations where there is one;
- **a query per arm** (``{{arm}}`` or ``{{version}}`` required): both arms reading one series
  compare a series with itself;
- **not the gateway's own signals** (``error_rate``, ``latency_ms``, … are refused as names):
  those are measured request by request, unit-clustered, with more information;
- **one number per answer**: a query that returns several series is a problem of the plan,
  reported and held on, never averaged silently.

- **a tolerance, never** ``strict``: an arm keeps its units, and two arms' mixes of units
  differ by about sd(unit level)·√(2/units per arm) however many intervals are read; a
  tolerance above that is what makes "harm proven" mean the model, not the mix.

What it cannot check: slow drifts that both arms share (load, time of day) make consecutive
values correlated. Pairing removes them — the test is on ``candidate - baseline`` at the same
instant — which is why absolute tolerances are judged on the pairs. A relative tolerance or an
absolute bound is judged on the arms' values themselves and is only as valid as the values
are independent: prefer an absolute tolerance when the metric follows the load.

No data holds and never fails: an interval where an arm has no requests gives no value (an
empty vector, or NaN from ``0/0``), and no observation is recorded. A Prometheus that cannot be
reached, rejects the query or answers with several series holds the rollout (no stage starts,
nothing is promoted; a rollback proven by other guardrails still happens), and the rollout's
reason says so until it answers again.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from safeshift.assign import BASELINE

if TYPE_CHECKING:
    from safeshift.plan import Guardrail, Plan, PrometheusQuery, Stage

log = logging.getLogger(__name__)

PAIRED = ":paired"
"""Suffix of the signal holding candidate-minus-baseline differences at the same instants."""


class PromError(Exception):
    """Prometheus did not give one usable answer: unreachable, refused, or ambiguous."""


def parse_answer(body: Any) -> float | None:
    """The number in a Prometheus ``/api/v1/query`` answer; None when it has no data (an empty
    vector, NaN or an infinity). Raises :class:`PromError` for an error or several series."""
    if not isinstance(body, dict):
        raise PromError("answered something that is not a Prometheus query result")
    if body.get("status") != "success":
        raise PromError(f"rejected the query ({body.get('errorType', 'error')}: "
                        f"{body.get('error', 'no reason given')})")
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        raw = result[1]
    elif kind == "vector" and isinstance(result, list):
        if not result:
            return None
        if len(result) > 1:
            labels = sorted({k for series in result for k in (series.get("metric") or {})})
            raise PromError(f"answered {len(result)} series (labels {', '.join(labels)}); the "
                            "query must give one number per arm: aggregate it, e.g. sum(...) or "
                            "histogram_quantile(0.95, sum by (le) (...))")
        value = result[0].get("value")
        if not isinstance(value, list) or len(value) != 2:
            raise PromError("answered a vector without a value")
        raw = value[1]
    else:
        raise PromError(f"answered a {kind} result; the query must be an instant vector or a "
                        "scalar (no range selector at its top level)")
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise PromError(f"answered {raw!r}, not a number") from None
    return number if math.isfinite(number) else None


def query(client: httpx.Client, source: PrometheusQuery, promql: str, at: float) -> float | None:
    """One instant query at time ``at`` (Unix seconds): its number, or None for no data."""
    headers = {}
    if source.token_env is not None:
        token = os.environ.get(source.token_env)
        if not token:
            raise PromError(f"the environment variable {source.token_env} (token_env) is not set")
        headers["Authorization"] = f"Bearer {token}"
    try:
        r = client.get(f"{source.url.rstrip('/')}/api/v1/query", headers=headers,
                       params={"query": promql, "time": f"{at:.3f}"}, timeout=source.timeout)
    except httpx.TimeoutException:
        raise PromError(f"did not answer within {source.timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise PromError(f"cannot be reached ({type(exc).__name__}: {exc})") from None
    try:
        body = r.json()
    except ValueError:
        raise PromError(f"answered HTTP {r.status_code} without JSON") from None
    if r.status_code >= 500 and not (isinstance(body, dict) and body.get("status") == "error"):
        raise PromError(f"answered HTTP {r.status_code}")
    return parse_answer(body)


@dataclass(slots=True)
class SourceProblem:
    """Why a Prometheus guardrail has no fresh values."""

    url: str
    error: str
    since: float  # wall-clock time of the first failed read in a row


Observe = Callable[[int, str, str, float], None]
"""(stage, arm, signal, value): record one observation."""


class PromSampler:
    """Reads a plan's Prometheus guardrails when they are due, in a background thread (a slow
    Prometheus never delays a tick, so never a rollback), and records the values."""

    def __init__(self, plan: Plan, observe: Observe, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.plan = plan
        self.guardrails = [g for g in plan.guardrails if g.prometheus is not None]
        self._observe = observe
        self._wall = wall
        self._due: dict[tuple[str, int], float] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[int] | None = None
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self.problems: dict[str, SourceProblem] = {}  # guardrail key -> why it has no fresh value
        self.reads = 0  # successful reads of all arms of one guardrail

    def run_due(self, stage_index: int, variants: Sequence[str], now: float) -> int:
        """Collect the values read since the last call (returns how many were recorded) and
        start reading the guardrails that are due in stage ``stage_index``."""
        recorded = 0
        if self._pending is not None and self._pending.done():
            pending, self._pending = self._pending, None
            try:
                recorded = pending.result()
            except Exception:  # a bug, not Prometheus: said, and the next read goes ahead
                log.exception("rollout %s: reading Prometheus failed", self.plan.rollout)
        stage = self.plan.stages[stage_index]
        applicable = [g for g in self.guardrails if g.applies_to(stage)]
        with self._lock:  # a guardrail this stage does not run holds nothing
            for key in set(self.problems) - {g.key for g in applicable}:
                del self.problems[key]
        if self._pending is None:
            due = [g for g in applicable
                   if now >= self._due.get((g.key, stage_index), -math.inf)]
            for g in due:
                assert g.prometheus is not None
                self._due[(g.key, stage_index)] = now + g.prometheus.interval
            if due:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="safeshift-promql")
                self._pending = self._pool.submit(self._read, due, stage_index, stage,
                                                  list(variants))
        return recorded

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the reads in flight (tests and shutdown)."""
        pending = self._pending
        if pending is not None:
            pending.exception(timeout)

    def _read(self, due: list[Guardrail], stage_index: int, stage: Stage,
              variants: list[str]) -> int:
        if self._client is None:
            self._client = httpx.Client()
        at = self._wall()
        recorded = 0
        for g in due:
            source = g.prometheus
            assert source is not None
            try:
                values = {arm: query(self._client, source, source.render(
                    arm=arm, version=self.plan.variant(arm).version, stage=stage.name), at)
                    for arm in (BASELINE, *variants)}
            except PromError as exc:
                with self._lock:
                    was = self.problems.get(g.key)
                    self.problems[g.key] = SourceProblem(source.url, str(exc),
                                                   was.since if was else at)
                if was is None:
                    log.warning("rollout %s: guardrail %s: Prometheus at %s %s; holding",
                                self.plan.rollout, g.key, source.url, exc)
                continue
            with self._lock:
                if self.problems.pop(g.key, None) is not None:
                    log.warning("rollout %s: guardrail %s: Prometheus at %s answers again",
                                self.plan.rollout, g.key, source.url)
            self.reads += 1
            base = values.pop(BASELINE)
            answered = {arm: v for arm, v in values.items() if v is not None}
            if base is None or not answered:
                continue  # no data: holds, never fails
            self._observe(stage_index, BASELINE, g.key, base)
            for arm, value in answered.items():
                self._observe(stage_index, arm, g.key, value)
                self._observe(stage_index, arm, g.key + PAIRED, value - base)
                recorded += 1
        return recorded

    def blocker(self) -> str | None:
        """Why the rollout must hold (a Prometheus guardrail without fresh values), or None."""
        with self._lock:
            problems = sorted(self.problems.items())
        if not problems:
            return None
        parts = [f"guardrail {key}: Prometheus at {p.url} {p.error} (since "
                 f"{time.strftime('%H:%M:%S', time.gmtime(p.since))} UTC)"
                 for key, p in problems]
        return "holding, no fresh measurements: " + "; ".join(parts)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()


__all__ = ["PAIRED", "PromError", "PromSampler", "parse_answer", "query"]
