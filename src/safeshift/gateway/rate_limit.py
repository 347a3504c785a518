"""Per-client rate limiting, as a pure-ASGI middleware: a token bucket per client, keyed by the
authenticated principal (the token's holder) or, without one, the peer address — never by
anything the client chooses, which it could change on every request. Over the limit: 429 with
a JSON error and ``Retry-After``. Health, readiness and metrics paths are never limited."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from safeshift.gateway._http import ASGIApp, HTTPError, Receive, Scope, Send, send_error

EXEMPT = ("/healthz", "/readyz", "/metrics", "/v2/health/")


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; one token a request."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token; returns 0 when allowed, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimitMiddleware:
    """Token buckets per client, the least recently seen forgotten beyond ``max_clients``."""

    def __init__(self, app: ASGIApp, *, rate: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate_limit must be > 0 and rate_burst >= 1")
        self.app = app
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def client_key(self, scope: Scope) -> str:
        principal = scope.get("safeshift.principal")
        token = getattr(principal, "token_id", "")
        if token:
            return "token:" + str(token)
        client = scope.get("client")
        return "ip:" + (client[0] if client else "unknown")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXEMPT):
            await self.app(scope, receive, send)
            return
        key = self.client_key(scope)
        now = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self.buckets) > self.max_clients:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        wait = bucket.take(now)
        if wait > 0:
            retry = str(max(1, math.ceil(wait))).encode()
            await send_error(send, HTTPError(
                429, f"rate limit exceeded: {self.rate:g} requests/s per client "
                     f"(burst {int(self.burst)}); retry later", field=None,
                headers=[(b"retry-after", retry)]))
            return
        await self.app(scope, receive, send)
