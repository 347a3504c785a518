"""Synthetic probes: golden inputs sent to the candidate on a schedule, never to users.

Real traffic can take days to hit a rare but consequential input (a country the candidate
was never trained on, an extreme value, the one feature that must only ever raise a risk
score). A plan's ``probes`` name such inputs and what the answers must be — exactly the
expected outputs, within a range, in a set of classes, or monotonic in one feature — and the
process that holds the rollout's controller sends each of them to every candidate variant of
the running stage (shadow stages included) every ``every`` seconds, after its controller tick.
Users never see a probe's answer, and a probe never reaches the candidate's circuit breaker.

Each run is one observation of the telemetry signal ``probe:NAME`` on the candidate arm, in a
cohort of its own (``probe``) that no guardrail comparison reads: ``n`` counts runs and ``s``
failed runs. Being ordinary additive telemetry, runs from a restarted process or another
replica add up, and a decision's frozen inputs carry them (``safeshift explain`` re-derives a
probe's verdict). :func:`probe_verdicts` turns them into one verdict per probe and variant:
``harm`` once a stage has seen ``max_failures`` failed runs — a golden input answered wrongly
is a fact, not a sample, so no statistical test is involved — ``pass`` after a run with no
harm, ``no_data`` before the first run. Harm rolls back like any guardrail's; a stage waits for
every probe to pass before it advances.

What a failed run got wrong (which input, what came back) is logged at WARNING on the
``safeshift.probes`` logger and kept as the runner's ``last_failure``. The verdict's sentence
says only what the telemetry says (the check, runs and failed runs), so that a decision made
on it can be re-derived from its frozen inputs word for word.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safeshift.models.base import ModelResult

if TYPE_CHECKING:
    from safeshift.analysis import Verdict
    from safeshift.plan import Plan, Probe
    from safeshift.telemetry import Summary

log = logging.getLogger(__name__)

COHORT = "probe"
"""The telemetry cohort of probe runs (no comparison reads it)."""

_EPS = 1e-12  # monotonic: answers this close count as equal


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _same(got: Any, want: Any, tolerance: float) -> bool:
    g, w = _number(got), _number(want)
    if g is not None and w is not None:
        return abs(g - w) <= tolerance
    return bool(got == want)


def _values(result: ModelResult) -> tuple[list[float] | None, str]:
    """The numbers a range or a monotonic check reads: the scores, else numeric outputs."""
    if result.scores is not None:
        return list(result.scores), "score"
    numbers = [_number(v) for v in result.outputs or ()]
    if all(n is not None for n in numbers):
        return [n for n in numbers if n is not None], "output"
    return None, "output"


def check(probe: Probe, result: ModelResult) -> str | None:
    """What is wrong with the candidate's answer to ``probe`` (None: every check holds)."""
    if not result.ok:
        return f"the candidate failed: {result.error}"
    outputs = result.outputs or []
    if probe.expect is not None:
        for i, (got, want) in enumerate(zip(outputs, probe.expect, strict=True)):
            if not _same(got, want, probe.tolerance):
                return f"input {i}: expected {want!r}, got {got!r}"
    if probe.classes is not None:
        for i, got in enumerate(outputs):
            if not any(_same(got, c, 0.0) for c in probe.classes):
                return f"input {i}: {got!r} is not one of the classes {probe.classes!r}"
    if probe.range is not None or probe.monotonic is not None:
        values, what = _values(result)
        if values is None:
            return "the candidate's outputs are not numbers and it gave no scores"
        if probe.range is not None:
            low, high = probe.range
            for i, v in enumerate(values):
                if not low <= v <= high:
                    return f"input {i}: {what} {v:g} is outside [{low:g}, {high:g}]"
        if probe.monotonic is not None:
            feature, sign = probe.monotonic.feature, 1.0
            if probe.monotonic.direction == "decreasing":
                sign = -1.0
            order = sorted(range(len(values)), key=lambda i: probe.inputs[i][feature])
            for a, b in itertools.pairwise(order):
                if sign * (values[b] - values[a]) < -_EPS:
                    return (f"{what} {values[a]:g} at {feature}={probe.inputs[a][feature]:g} "
                            f"but {values[b]:g} at {feature}={probe.inputs[b][feature]:g}: not "
                            f"{probe.monotonic.direction}")
    return None


@dataclass(slots=True)
class Failure:
    """What the last failed run of one probe on one variant got wrong."""

    at: float
    stage: int
    problem: str


class ProbeRunner:
    """Sends a plan's probes when they are due and records each run as telemetry."""

    def __init__(self, plan: Plan, call: Callable[[str, list[Any]], ModelResult],
                 observe: Callable[[int, str, str, float], None]) -> None:
        self.plan = plan
        self._call = call  # (variant, rows) -> the candidate's protected answer
        self._observe = observe  # (stage, variant, signal, 1.0 failed / 0.0 passed)
        self._due: dict[tuple[str, str, int], float] = {}  # (probe, variant, stage) -> next run
        self.last_failure: dict[tuple[str, str], Failure] = {}
        self.runs = 0

    def run_due(self, stage: int, variants: Sequence[str], now: float) -> int:
        """Run every probe due in ``stage`` on each variant; return how many ran."""
        ran = 0
        for probe in self.plan.probes:
            for variant in variants:
                key = (probe.name, variant, stage)
                if now < self._due.get(key, -math.inf):
                    continue
                self._due[key] = now + probe.every
                problem = check(probe, self._call(variant, list(probe.inputs)))
                self._observe(stage, variant, probe.signal, 0.0 if problem is None else 1.0)
                if problem is not None:
                    self.last_failure[(probe.name, variant)] = Failure(now, stage, problem)
                    log.warning("probe %s failed on %s of rollout %s in stage %d: %s",
                                probe.name, variant, self.plan.rollout, stage, problem)
                ran += 1
        self.runs += ran
        return ran


def probe_verdicts(plan: Plan, summary: Summary, variants: Sequence[str]) -> list[Verdict]:
    """One verdict per probe and variant from the stage's probe runs (see the module)."""
    from safeshift.analysis import Status, Verdict

    out = []
    for probe in plan.probes:
        for arm in variants:
            m = summary.total(arm, probe.signal, cohort=COHORT)
            runs, failed = int(m.n), int(m.s)
            if failed >= probe.max_failures:
                status = Status.HARM
                said = f"{probe.describe()}: failed {failed} of {runs} runs in this stage"
            elif runs:
                status = Status.PASS
                said = f"{probe.describe()}: passed {runs - failed} of {runs} runs"
                if failed:
                    said += f" ({failed} failed, {probe.max_failures} would prove harm)"
            else:
                status = Status.NO_DATA
                said = f"{probe.describe()}: not run yet in this stage"
            share = failed / runs if runs else math.nan
            out.append(Verdict(
                guardrail=probe.signal, segment=None, status=status, estimate=share,
                lower=share, upper=share, tolerance=0.0, relative=False, rate=True,
                n_baseline=0.0, n_candidate=float(runs), mean_baseline=math.nan,
                mean_candidate=share, bound="max", alpha_harm=0.0, alpha_pass=0.0,
                test="probe", sentence=said, harm=float(failed), arm=arm))
    return out


__all__ = ["COHORT", "Failure", "ProbeRunner", "check", "probe_verdicts"]
