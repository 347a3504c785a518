"""Gateway settings: a typed, frozen record read from keyword arguments or the environment.

Plan files hold what belongs to a rollout (timeouts, breaker, shadow queue, label window);
these settings hold what belongs to one gateway process: request limits, access logs and
background intervals. ``GatewaySettings.from_env()`` reads ``SAFESHIFT_<NAME>`` variables, e.g.
``SAFESHIFT_RATE_LIMIT=50`` or ``SAFESHIFT_MAX_BODY_BYTES=2097152``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Per-process settings of the gateway (see ``docs/gateway.md``)."""

    max_body_bytes: int = 1 << 20
    """Request bodies larger than this get 413."""
    rate_limit: float | None = None
    """Requests per second allowed per client (token bucket); ``None`` disables the limit."""
    rate_burst: int = 50
    """Bucket size: requests a client may send at once before the rate applies."""
    auth: bool = True
    """Require a bearer token on every route but health probes and ``/metrics``; off only
    for local demos (``serve --no-auth``, refused beyond loopback)."""
    rate_limit_clients: int = 10_000
    """Buckets kept (least recently used are forgotten)."""
    access_log: bool = True
    """One JSON log line per request on the ``safeshift.access`` logger."""
    candidate_threads: int = 4
    """Worker threads for synchronous candidate models called under a timeout."""
    shadow_workers: int = 2
    """Concurrent shadow calls per endpoint."""
    flush_interval: float = 1.0
    """Seconds between telemetry flushes to the store."""
    drain_timeout: float = 5.0
    """Seconds allowed at shutdown (and before a feedback join) for pending shadow copies."""
    controller_lease: float = 5.0
    """Seconds a controller lease lasts (renewed every tick), so one replica decides; when its
    holder dies another takes over within the lease plus a tick (at least 3 ticks are kept)."""
    notify_interval: float | None = 0.5
    """Seconds between sends of due webhook notifications from the store's outbox (every
    replica may send: the claim keeps two from sending one entry); ``None`` sends none."""
    notify_timeout: float = 2.0
    """Seconds one webhook delivery may take before it counts as failed."""
    notify_max_attempts: int = 12
    """Attempts before a notification is dead-lettered (about 19 minutes of retries)."""
    notify_backoff: float = 1.0
    """Seconds before the first retry; doubled after each failure, up to notify_backoff_cap."""
    notify_backoff_cap: float = 300.0
    """The longest wait between two attempts."""

    def with_overrides(self, overrides: Mapping[str, Any]) -> GatewaySettings:
        """A copy with ``overrides`` applied; an unknown name is an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown gateway setting(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **dict(overrides))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        """Settings from ``SAFESHIFT_<FIELD>`` variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"SAFESHIFT_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _convert(f.name, str(f.type), raw)
        return cls(**values)


def _convert(name: str, kind: str, raw: str) -> Any:
    text = raw.strip()
    try:
        if kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if "None" in kind and text.lower() in {"", "none", "off"}:
            return None
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"SAFESHIFT_{name.upper()}={raw!r} is not a valid {kind}") from None
    return text
