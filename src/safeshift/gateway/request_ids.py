"""Client request ids must be fresh: a request whose id an earlier request has gets 409.

Feedback joins on the request id, and the store keeps the first record written for an id, so a
second request with the same id could never get a label (or would take the first one's). Ids
the gateway makes itself are 128-bit random and not checked. A client's own — the body's
``id``, or its ``X-Request-ID`` header when the body has none — is checked twice:

1. in memory, at once: every id given to a request in this process (served, in flight, or with
   its record still buffered or waiting for a shadow copy), held until its label window ends
   (:class:`~safeshift.rollout.RecentRequestIds`, bounded);
2. in the store, for an id this process has not seen: a lookup by primary key, batched (one
   query in flight, for every id that arrived meanwhile) and waited for at most
   :data:`LOOKUP_TIMEOUT`. It finds the records any replica has flushed, about a second after
   they were served, until they are purged.

The check fails open — the request is served, checked in memory only — when the store is down
or slower than the timeout: serving does not depend on the store. Two replicas that receive
one new id within that second can both serve it; the store keeps the first record, so the
other's feedback joins to the first. Clients that need certainty send unique ids (UUIDs).

A request that leaves no record (the model refused its inputs: a 422) releases its id.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from safeshift.feedback import RecentRequestIds, request_id_taken
from safeshift.gateway._http import HTTPError
from safeshift.gateway.runtime import Gateway
from safeshift.gateway.serving import Endpoint
from safeshift.store import Store

T = TypeVar("T")

LOOKUP_TIMEOUT = 0.1
"""Seconds a request waits for the store to say whether its id is taken (then it is served)."""

MAX_WAITING = 10_000
"""Ids waiting for a lookup beyond which new ones are checked in memory only (a stalled store)."""

HEADER = "X-Request-ID"


class RequestIdGuard:
    """The request-id check of one gateway (see the module docstring)."""

    def __init__(self, store: Store, *, timeout: float = LOOKUP_TIMEOUT,
                 on_error: Callable[[], object] | None = None) -> None:
        self.recent = RecentRequestIds()
        self.store = store
        self.timeout = timeout
        self._on_error = on_error
        self._waiting: dict[str, list[asyncio.Future[float | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def claim(self, request_id: str, field: str, *, until: float, now: float,
                    check_store: bool = True) -> None:
        """Hold ``request_id`` for a new request until ``until``, or raise 409 naming ``field``
        (``id`` or ``X-Request-ID``) when an earlier request has it."""
        if not self.recent.claim(request_id, until, now):
            raise taken(request_id, field)
        if not check_store:
            return
        expires = await self._stored(request_id)
        if expires is not None:
            self.recent.hold(request_id, expires)
            raise taken(request_id, field)

    def release(self, request_id: str) -> None:
        """Free the id of a request that left no record."""
        self.recent.release(request_id)

    async def _stored(self, request_id: str) -> float | None:
        """The expiry of the store's record for ``request_id``; None when it has none, or
        cannot say within the timeout."""
        if len(self._waiting) >= MAX_WAITING:
            return None
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            self._task, self._waiting = None, {}  # the app was started again on another loop
        future: asyncio.Future[float | None] = loop.create_future()
        self._waiting.setdefault(request_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._lookups(), name="safeshift-request-ids")
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            return None

    async def _lookups(self) -> None:
        """Look up every waiting id, one query at a time, until none waits."""
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            try:
                found = await asyncio.to_thread(self.store.get_requests, list(batch))
            except Exception:  # the store is down: serve, checked in memory only
                found = {}
                if self._on_error is not None:
                    self._on_error()
            for request_id, futures in batch.items():
                rec = found.get(request_id)
                for future in futures:
                    if not future.done():
                        future.set_result(None if rec is None else rec.expires_at)


def taken(request_id: str, field: str) -> HTTPError:
    """The 409 for a request id an earlier request has."""
    source = f"from the {HEADER} header" if field == HEADER else None
    return HTTPError(409, request_id_taken(request_id, source), field=field)


_GUARDS: weakref.WeakKeyDictionary[Gateway, RequestIdGuard] = weakref.WeakKeyDictionary()


def guard(gw: Gateway) -> RequestIdGuard:
    """The gateway's guard, made on first use (one per gateway: ids are unique store-wide)."""
    found = _GUARDS.get(gw)
    if found is None:
        found = _GUARDS[gw] = RequestIdGuard(
            gw.store, on_error=gw.metrics.store_errors.labels("request_id").inc)
    return found


async def serve_once(gw: Gateway, ep: Endpoint, request_id: str, field: str | None,
                     serve: Callable[[], Awaitable[T]]) -> T:
    """``serve()`` under the id check: 409 when ``request_id`` is taken. ``field`` says where
    the client gave the id (``id``, ``X-Request-ID``); None for an id the gateway made, which
    is not checked. A request refused with 422 (its inputs) leaves no record: its id is freed."""
    if field is None:
        return await serve()
    ids = guard(gw)
    rollout = ep.rollout
    now = rollout.clock.now()
    await ids.claim(request_id, field, until=now + rollout.plan.serving.label_window, now=now,
                    check_store=gw.last_refresh_error is None)
    try:
        return await serve()
    except HTTPError as exc:
        if exc.status == 422:
            ids.release(request_id)
        raise
