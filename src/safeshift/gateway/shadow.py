"""Shadow copies off the critical path: a bounded asyncio queue and a few worker tasks.

The user's request is answered by the baseline before its copy is even looked at. A copy that
finds the queue full is dropped and counted (``Recorder.record_shadow_dropped``), never waited
for. Workers hand each copy to ``call``: the shared serving steps
(:meth:`safeshift.serving.Serving.shadow`), which call the candidate under the same protection
as live calls (timeout, breaker) and feed both answers to ``Recorder.record_shadow``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from safeshift.assign import Assignment
from safeshift.gateway.logs import gateway_logger
from safeshift.models import ModelResult
from safeshift.rollout import Rollout


@dataclass(slots=True)
class ShadowItem:
    assignment: Assignment
    rows: list[Any]
    baseline: ModelResult
    context: Mapping[str, Any] | None
    request_id: str


CopyCall = Callable[[ShadowItem], Awaitable[ModelResult]]
"""Serves one copy: calls the candidate and counts both answers; returns its result."""


class ShadowQueue:
    """Bounded queue of shadow copies for one rollout, served by ``workers`` tasks."""

    def __init__(self, rollout: Rollout, call: CopyCall, *, maxsize: int, workers: int,
                 on_result: Callable[[str], None] | None = None) -> None:
        self.rollout = rollout
        self.call = call
        self.maxsize = maxsize
        self.workers = workers
        self.on_result = on_result  # "ok" | "error" | "dropped", for metrics
        self.dropped = 0
        self.done = 0
        self._queue: asyncio.Queue[ShadowItem] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the workers on the running loop (the app's lifespan does this)."""
        self._queue = asyncio.Queue(self.maxsize)
        self._tasks = [asyncio.create_task(self._work(), name=f"safeshift-shadow-{i}")
                       for i in range(self.workers)]

    def submit(self, item: ShadowItem) -> bool:
        """Queue a copy; returns False (and counts the drop) when the queue is full or the
        workers are not running."""
        queue = self._queue
        if queue is not None and self._tasks:
            try:
                queue.put_nowait(item)
                return True
            except asyncio.QueueFull:
                pass
        self.dropped += 1
        self.rollout.recorder.record_shadow_dropped(item.assignment, item.baseline,
                                           context=item.context, request_id=item.request_id)
        if self.on_result is not None:
            self.on_result("dropped")
        return False

    async def _work(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            item = await queue.get()
            try:
                result = await self.call(item)
                self.done += 1
                if self.on_result is not None:
                    self.on_result("ok" if result.ok else "error")
            except Exception:  # a bug here must not kill the worker
                gateway_logger.exception("shadow call failed", extra={
                    "request_id": item.request_id, "rollout": self.rollout.plan.rollout})
            finally:
                queue.task_done()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued copy is processed (at most ``timeout`` seconds)."""
        queue = self._queue
        if queue is None or not self._tasks:
            return True
        try:
            await asyncio.wait_for(queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float) -> None:
        """Finish what is queued (bounded by ``timeout``), then stop the workers."""
        await self.drain(timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
