"""The model backend protocol and its result type. Errors and timeouts are data, not exceptions."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Rows = Sequence[Any]
"""One or more input rows: each a mapping of feature name to value, or a list of values."""


@dataclass(slots=True)
class ModelResult:
    """What a model call produced: outputs (one per row), optional scores, or an error."""

    outputs: list[Any] | None = None
    scores: list[float] | None = None  # e.g. probability of the positive class, per row
    error: str | None = None
    latency_ms: float = 0.0
    timed_out: bool = False
    not_called: bool = False  # refused before the model ran (an open circuit breaker): no latency

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class ModelBackend(Protocol):
    """Something that answers rows with outputs. Implementations never raise from predict."""

    name: str

    def predict(self, rows: Rows) -> ModelResult: ...

    async def apredict(self, rows: Rows) -> ModelResult: ...

    def close(self) -> None: ...


class SyncBackend:
    """Base for in-process backends: ``apredict`` runs ``predict`` inline (it is CPU-bound and
    short; a thread hop costs more than the call)."""

    name: str = "model"

    def _call(self, rows: Rows) -> tuple[list[Any], list[float] | None]:
        raise NotImplementedError

    def predict(self, rows: Rows) -> ModelResult:
        start = time.perf_counter()
        try:
            outputs, scores = self._call(rows)
        except Exception as exc:  # a model fault is data
            return ModelResult(error=f"{type(exc).__name__}: {exc}",
                               latency_ms=(time.perf_counter() - start) * 1000)
        result = ModelResult(outputs=outputs, scores=scores,
                             latency_ms=(time.perf_counter() - start) * 1000)
        return validate_result(result, len(rows))

    async def apredict(self, rows: Rows) -> ModelResult:
        return self.predict(rows)

    def close(self) -> None:
        return None


def validate_result(result: ModelResult, n_rows: int) -> ModelResult:
    """Turn wrong-shaped or non-finite outputs into an error result."""
    if result.error is not None:
        return result
    outputs = result.outputs
    if outputs is None or len(outputs) != n_rows:
        got = "none" if outputs is None else len(outputs)
        result.error = f"wrong shape: {got} outputs for {n_rows} rows"
        return result
    for value in outputs:
        if not _finite(value):
            result.error = "non-finite output (NaN or infinity)"
            return result
    return result


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


async def call_with_timeout(model: ModelBackend, rows: Rows, timeout: float | None) -> ModelResult:
    """``apredict`` bounded by ``timeout`` seconds; a timeout comes back as an error result."""
    if timeout is None:
        return await model.apredict(rows)
    start = time.perf_counter()
    try:
        return await asyncio.wait_for(model.apredict(rows), timeout)
    except TimeoutError:
        return ModelResult(error=f"timeout after {timeout * 1000:.0f} ms", timed_out=True,
                           latency_ms=(time.perf_counter() - start) * 1000)


def oip_datatype(values: list[Any]) -> tuple[str, list[Any]]:
    """The Open Inference Protocol datatype that fits ``values``, and the values in it."""
    if all(isinstance(v, bool) for v in values):
        return "BOOL", values
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64", values
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "FP64", [float(v) for v in values]
    return "BYTES", [v if isinstance(v, str) else json.dumps(v, default=str) for v in values]
