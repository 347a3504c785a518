"""A circuit breaker for a candidate model, shared by library mode and the gateway.

Closed: calls go through; failures are remembered for ``window`` seconds. ``failures`` of them
within the window open it. Open: calls are refused (the baseline answers) for ``cooldown``
seconds. Then half-open: one probe call at a time goes through; a success closes the breaker,
a failure opens it again for another cooldown. Time is monotonic and injectable for tests.

Only failures known to be the candidate's are recorded (see :mod:`safeshift.serving`): a call
that failed on inputs the baseline rejects too is :meth:`CircuitBreaker.abandon`-ed, so bad
client input can never open it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    """Exported as the ``safeshift_breaker_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Thread-safe: library mode calls it from the caller's threads, the gateway from its loop."""

    def __init__(self, failures: int, window: float, cooldown: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState], None] | None = None) -> None:
        self.failures = failures
        self.window = window
        self.cooldown = cooldown
        self.clock = clock
        self.on_change = on_change
        self._state = BreakerState.CLOSED
        self._recent: deque[float] = deque()
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()
        self.opened = 0  # how many times it opened

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._current()

    def _current(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.cooldown:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """May a call go to the candidate now? In half-open, only one probe at a time."""
        with self._lock:
            state = self._current()
            if state is BreakerState.CLOSED:
                return True
            if state is BreakerState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def record(self, ok: bool) -> None:
        """Report the outcome of a call that :meth:`allow` let through."""
        with self._lock:
            now = self.clock()
            if self._state is BreakerState.HALF_OPEN:
                self._probing = False
                if ok:
                    self._recent.clear()
                    self._set(BreakerState.CLOSED)
                else:
                    self._open(now)
                return
            if ok or self._state is BreakerState.OPEN:
                return
            recent = self._recent
            recent.append(now)
            cutoff = now - self.window
            while recent and recent[0] <= cutoff:
                recent.popleft()
            if len(recent) >= self.failures:
                self._open(now)

    def abandon(self) -> None:
        """A call that :meth:`allow` let through ended without an outcome that is the
        candidate's (cancelled, refused by the pool, or failed on inputs that are bad)."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._probing = False

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._recent.clear()
        self.opened += 1
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(state)
