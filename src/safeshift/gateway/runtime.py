"""The gateway's running state: endpoints, background tasks and the feedback join.

Background tasks, all with their SQL in worker threads:

- *refresh* every ``serving.refresh / 2``: re-read each rollout's stage from the store, so a
  decision taken anywhere (another replica, the CLI, the control API) reaches every new
  request within ``serving.refresh``; publish stage and traffic gauges;
- *flush* every ``flush_interval``: write telemetry and request records (``Rollout.flush``);
- *controller* (unless disabled) every ``tick_interval``: ``Rollout.tick`` for each rollout
  whose controller lease this process holds; a decision refreshes the split at once;
- *notify* every ``notify_interval``: send the webhook notifications due in the store's outbox
  (:func:`safeshift.notify.deliver_due`; every replica may, the claim keeps them apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import httpx

from safeshift import notify, ops
from safeshift.clock import Clock
from safeshift.controller import Lease
from safeshift.errors import SafeshiftError
from safeshift.gateway._http import HTTPError
from safeshift.gateway.auth import DenialLog
from safeshift.gateway.drills import DRILL_TTL, ServedDrill
from safeshift.gateway.logs import flush_logs, gateway_logger
from safeshift.gateway.metrics import GatewayMetrics
from safeshift.gateway.serving import Endpoint, cached_split
from safeshift.gateway.settings import GatewaySettings
from safeshift.rollout import Rollout
from safeshift.state import Decision, RequestRecord
from safeshift.store import Store

T = TypeVar("T")


class Gateway:
    """Everything one gateway app serves and runs."""

    def __init__(self, rollouts: Sequence[Rollout], store: Store, *, settings: GatewaySettings,
                 metrics: GatewayMetrics, controller: bool, tick_interval: float,
                 owns_store: bool) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.controller = controller
        self.tick_interval = tick_interval
        self.owns_store = owns_store
        self.endpoints: dict[str, Endpoint] = {}
        self.rollouts: dict[str, Rollout] = {}
        self.denials = DenialLog(metrics)
        self._denials_lock = threading.Lock()
        for rollout in rollouts:
            ep = Endpoint(rollout, metrics.endpoint(rollout.plan.endpoint,
                                                    tuple(rollout.plan.variants)),
                          threads=settings.candidate_threads,
                          shadow_workers=settings.shadow_workers)
            self.endpoints[ep.name] = ep
            self.rollouts[rollout.plan.rollout] = rollout
        self._foreign: dict[str, Rollout] = {}  # rollouts met only through feedback
        self.drills: dict[str, ServedDrill] = {}  # drill copies served here (gateway.drills)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        lease = Lease(self.holder, max(settings.controller_lease, 3 * tick_interval))
        for rollout in rollouts:
            rollout.controller.lease = lease  # of several replicas, one decides
        self.ready = False
        self.started_at = 0.0
        self.last_refresh_error: str | None = None
        self._phase: dict[str, str] = {}
        self._phase_at: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Event | None = None
        self._http: httpx.Client | None = None  # webhook deliveries, while started

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        for ep in self.endpoints.values():
            ep.shadow.start()
        await self._run(self._refresh_all)
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="safeshift-refresh"))
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="safeshift-flush"))
        if self.controller:
            self._tasks.append(asyncio.create_task(self._control_loop(),
                                                   name="safeshift-controller"))
        if self.settings.notify_interval is not None:
            self._http = httpx.Client(timeout=self.settings.notify_timeout)
            self._tasks.append(asyncio.create_task(self._notify_loop(), name="safeshift-notify"))
        self.started_at = time.time()
        self.ready = True
        gateway_logger.info("gateway started", extra={
            "endpoints": {n: ep.rollout.plan.rollout for n, ep in self.endpoints.items()},
            "controller": self.controller})

    async def stop(self) -> None:
        """Stop taking decisions, finish shadow copies, flush telemetry, close models."""
        self.ready = False
        if self._stopping is not None:
            self._stopping.set()  # background loops finish their current step (SQL included)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._http is not None:
            self._http.close()
            self._http = None
        for ep in self.endpoints.values():
            await ep.shadow.stop(self.settings.drain_timeout)
        for ep in self.endpoints.values():
            for model in ep.models():
                aclose = getattr(model, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
        written = await self._run(self._close_all)
        for ep in self.endpoints.values():
            ep.close()
        gateway_logger.info("gateway stopped", extra={"flushed": written})
        flush_logs()

    def _close_all(self) -> int:
        written = 0
        for drill in self.drills.values():
            with contextlib.suppress(Exception):
                drill.end("drill over: the gateway stopped")
        self.drills.clear()
        for rollout in [*self.rollouts.values(), *self._foreign.values()]:
            if rollout.promql is not None:
                rollout.promql.close()
            try:
                written += rollout.flush()
            except Exception as exc:
                gateway_logger.error("final flush failed", extra={
                    "rollout": rollout.plan.rollout, "error": str(exc)})
            for ep in self.endpoints.values():
                if ep.rollout is rollout:
                    for model in ep.models():
                        with contextlib.suppress(Exception):
                            model.close()
        if self.owns_store:
            self.store.close()
        return written

    @staticmethod
    async def _run(fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; False when the gateway is stopping (the loop should end)."""
        stopping = self._stopping
        if stopping is None or stopping.is_set():
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
        return not stopping.is_set()

    # -- background tasks ----------------------------------------------------------------

    def _refresh_all(self) -> None:
        """Re-read every rollout's split; the phase (for the gauges) only when the split
        changed or every few seconds — one query per rollout per period otherwise."""
        now = time.monotonic()
        for ep in self.endpoints.values():
            before = cached_split(ep.rollout)
            split = ep.rollout.refresh()
            name = ep.rollout.plan.rollout
            if split != before or now - self._phase_at.get(name, 0.0) > 5.0:
                self._phase[name] = str(ep.rollout.state().phase)
                self._phase_at[name] = now
            ep.metrics.split(name, split, self._phase.get(name, "unknown"))

    async def _refresh_loop(self) -> None:
        period = max(0.05, min(ep.rollout.plan.serving.refresh
                               for ep in self.endpoints.values()) / 2)
        while await self._wait(period):
            try:
                await self._run(self._refresh_all)
                self.last_refresh_error = None
            except Exception as exc:
                self._background_error("refresh", exc)
                self.last_refresh_error = str(exc)

    @property
    def clock(self) -> Clock:
        return next(iter(self.rollouts.values())).clock

    def refresh(self, rollout: str) -> None:
        """Re-read a served rollout's split now (after an action taken through this app)."""
        served = self.rollouts.get(rollout)
        if served is not None:
            served.refresh()

    def flush_denials(self) -> None:
        """Write the refused requests noted since the last flush to the store's denial log
        (one flush at a time: a reader that flushes first then sees every refusal)."""
        with self._denials_lock:
            denied = self.denials.drain()
            if not denied:
                return
            try:
                self.store.add_denials(denied)
            except Exception as exc:
                self.metrics.denials_dropped.inc(len(denied))
                self._background_error("denials", exc)

    def flush_all(self) -> int:
        """Write buffered telemetry, request records and refused requests to the store."""
        self.flush_denials()
        return sum(r.flush() for r in self.rollouts.values())

    async def _flush_loop(self) -> None:
        while await self._wait(self.settings.flush_interval):
            try:
                await self._run(self.flush_all)
            except Exception as exc:
                self._background_error("flush", exc)
            flush_logs()

    async def tick(self) -> list[Decision]:
        """One controller tick for every rollout (what the controller task runs), then for
        the drill copies (a drill older than its time to live is ended): a drill never delays
        a real rollout's decision."""
        decisions = []
        for ep in self.endpoints.values():
            decision = await self._run(ep.rollout.tick)
            if decision is None:
                continue
            decisions.append(decision)
            ep.metrics.decision(decision.action)
            self._phase[decision.rollout] = str(decision.phase)
            ep.metrics.split(ep.rollout.plan.rollout, cached_split(ep.rollout), str(decision.phase))
            gateway_logger.info("decision", extra={
                "rollout": decision.rollout, "action": str(decision.action),
                "phase": str(decision.phase), "reason": decision.reason})
        for name, drill in list(self.drills.items()):
            if time.monotonic() - drill.started > DRILL_TTL:
                del self.drills[name]
                await self._run(functools.partial(
                    drill.end, f"drill over: nobody ended it within {DRILL_TTL:.0f} s"))
            else:
                await self._run(drill.rollout.tick)
        return decisions

    async def _control_loop(self) -> None:
        while await self._wait(self.tick_interval):
            try:
                await self.tick()
            except Exception as exc:
                self._background_error("tick", exc)

    def deliver_notifications(self) -> notify.DeliveryReport:
        """Send the due webhook notifications (in a worker thread: it posts and waits) and
        publish the outbox's pending and dead-letter counts."""
        s = self.settings
        client = self._http
        if client is None:
            raise RuntimeError("the gateway is not started: no HTTP client for notifications")
        report = notify.deliver_due(self.store, self.clock.now(), client=client,
                                    max_attempts=s.notify_max_attempts,
                                    backoff_base=s.notify_backoff, backoff_cap=s.notify_backoff_cap)
        m = self.metrics
        for outcome, n in (("delivered", report.delivered), ("failed", report.failed),
                           ("dead", report.dead)):
            if n:
                m.notifications.labels(outcome).inc(n)
        counts = self.store.outbox_counts()
        m.notifications_pending.set(counts["pending"])
        m.notifications_dead.set(counts["dead"])
        if report.dead:
            gateway_logger.warning("notifications dead-lettered", extra={
                "dead": report.dead, "dead_letter": counts["dead"]})
        return report

    async def _notify_loop(self) -> None:
        interval = self.settings.notify_interval or 0.5
        while await self._wait(interval):
            try:
                await self._run(self.deliver_notifications)
            except Exception as exc:
                self._background_error("notify", exc)

    def _background_error(self, operation: str, exc: Exception) -> None:
        self.metrics.store_errors.labels(operation).inc()
        gateway_logger.error(f"{operation} failed", exc_info=exc,
                             extra={"operation": operation})

    # -- the feedback join ---------------------------------------------------------------

    def rollout_named(self, name: str) -> Rollout:
        """The rollout a request record names: served here, or built from the stored plan
        (a request served by another replica that runs other plans)."""
        rollout = self.rollouts.get(name) or self._foreign.get(name)
        if rollout is None:
            plan = ops.stored_plan(self.store, name)
            rollout = self._foreign[name] = Rollout(plan, self.store, clock=self.clock)
        return rollout

    def _lookup(self, ids: Sequence[str]) -> dict[str, RequestRecord]:
        return self.store.get_requests(list(dict.fromkeys(ids)))

    async def join(self, ids: Sequence[str], fields: Sequence[str]
                   ) -> dict[str, tuple[Rollout, RequestRecord]]:
        """Find the live request record of every id, or raise 404 naming the first missing
        one (nothing is written either way)."""
        found = await self._run(lambda: self._lookup(ids))
        missing = [rid for rid in ids if rid not in found]
        if missing:  # maybe still buffered here: finish shadow copies, flush, look again
            for ep in self.endpoints.values():
                await ep.shadow.drain(min(self.settings.drain_timeout, 2.0))
            await self._run(self.flush_all)
            found.update(await self._run(lambda: self._lookup(missing)))
        out: dict[str, tuple[Rollout, RequestRecord]] = {}
        for rid, field in zip(ids, fields, strict=True):
            rec = found.get(rid)
            if rec is None:
                raise HTTPError(404, f"no request {rid!r}: it was never served, or its record "
                                     "expired; send the id that predict returned", field=field)
            try:
                rollout = await self._run(lambda r=rec: self.rollout_named(r.rollout))  # type: ignore[misc]
            except SafeshiftError:
                raise HTTPError(404, f"request {rid!r} belongs to rollout {rec.rollout!r}, "
                                     "which is not in the store", field=field) from None
            if rec.expires_at <= rollout.clock.now():
                raise HTTPError(404, f"request {rid!r} is past its label window "
                                     f"({rollout.plan.serving.label_window:g} s); feedback is "
                                     "no longer joined", field=field)
            out[rid] = (rollout, rec)
        return out

    def status(self) -> dict[str, Any]:
        out = {}
        for name, ep in self.endpoints.items():
            split = cached_split(ep.rollout)
            rollout = ep.rollout.plan.rollout
            phase = self._phase.get(rollout, "unknown")
            # active: a stage runs and the controller decides (a paused split is frozen)
            out[name] = {"rollout": rollout, "stage": split.stage, "phase": phase,
                         "active": split.active and phase != "paused",
                         "candidate_share": split.traffic / 10_000,
                         "breakers": {n: c.breaker.state.name.lower()
                                      for n, c in ep.candidates.items()},
                         "hung_calls": {n: c.guard.pool.hung for n, c in ep.candidates.items()},
                         "shadow_queue": ep.shadow.depth}
        return out
