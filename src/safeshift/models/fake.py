"""A configurable fake model for tests, simulations and drills: ``fake:NAME?error_rate=0.1``.

Options (query string): ``output`` (constant output, default 0), ``error_rate`` (share of calls
that raise), ``latency_ms`` (sleep per call), ``slow_rate`` and ``slow_ms`` (share of calls that
sleep longer), ``nan_rate`` (share of calls that answer NaN), ``seed``.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any
from urllib.parse import parse_qsl

from safeshift.errors import ModelLoadError
from safeshift.models.base import ModelResult, Rows, SyncBackend, validate_result


class FakeModel(SyncBackend):
    """Answers ``output`` for every row, with injectable faults and delays."""

    def __init__(
        self,
        name: str = "fake",
        *,
        output: Any = 0,
        error_rate: float = 0.0,
        latency_ms: float = 0.0,
        slow_rate: float = 0.0,
        slow_ms: float = 0.0,
        nan_rate: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        self.name = name
        self.output = output
        self.error_rate = error_rate
        self.latency_ms = latency_ms
        self.slow_rate = slow_rate
        self.slow_ms = slow_ms
        self.nan_rate = nan_rate
        self._rng = random.Random(seed)
        self.calls = 0

    @classmethod
    def parse(cls, spec: str) -> FakeModel:
        name, _, query = spec.partition("?")
        kwargs: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "output":
                try:
                    kwargs[key] = float(value) if "." in value else int(value)
                except ValueError:
                    kwargs[key] = value
                continue
            if key not in {"seed", "error_rate", "latency_ms", "slow_rate", "slow_ms", "nan_rate"}:
                raise ModelLoadError(f"fake:{spec}: unknown option {key!r}")
            try:
                kwargs[key] = int(value) if key == "seed" else float(value)
            except ValueError:
                raise ModelLoadError(f"fake:{spec}: {key} must be a number, not {value!r}") from None
        return cls(name or "fake", **kwargs)

    def _plan_call(self) -> tuple[float, str | None]:
        self.calls += 1
        delay = self.latency_ms
        if self.slow_rate and self._rng.random() < self.slow_rate:
            delay = self.slow_ms
        fault = None
        if self.error_rate and self._rng.random() < self.error_rate:
            fault = "error"
        elif self.nan_rate and self._rng.random() < self.nan_rate:
            fault = "nan"
        return delay / 1000.0, fault

    def _answer(self, rows: Rows, fault: str | None, start: float) -> ModelResult:
        elapsed = (time.perf_counter() - start) * 1000
        if fault == "error":
            return ModelResult(error="RuntimeError: injected fault", latency_ms=elapsed)
        value = float("nan") if fault == "nan" else self.output
        return validate_result(ModelResult(outputs=[value] * len(rows), latency_ms=elapsed), len(rows))

    def predict(self, rows: Rows) -> ModelResult:
        start = time.perf_counter()
        delay, fault = self._plan_call()
        if delay:
            time.sleep(delay)
        return self._answer(rows, fault, start)

    async def apredict(self, rows: Rows) -> ModelResult:
        start = time.perf_counter()
        delay, fault = self._plan_call()
        if delay:
            await asyncio.sleep(delay)
        return self._answer(rows, fault, start)
