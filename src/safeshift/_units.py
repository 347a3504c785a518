"""Parsing of the human units that plans use: durations (``30s``, ``10m``) and shares (``5%``)."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_COMPOUND = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")
_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

BASIS_POINTS = 10_000
"""Assignment resolution: shares are whole basis points (0.01 %)."""


def parse_duration(value: Any) -> float:
    """Seconds from ``"500ms"``, ``"30s"``, ``"10m"``, ``"2h"``, ``"1h30m"`` or a number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 10m, 2h or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _FACTORS[match.group(2)]
    elif isinstance(value, str) and _COMPOUND.match(value.strip()):  # "1h30m", as we print them
        seconds = sum(float(n) * _FACTORS[u] for n, u in _PART.findall(value))
    else:
        raise ValueError(f"{value!r} is not a duration; write it like 30s, 10m, 2h or 7d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact-enough form: ``90`` → ``1m30s``, ``7200`` → ``2h``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    total = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return "".join(parts) or "0s"


def parse_share(value: Any) -> int:
    """Basis points (0..10000) from ``"5%"``, ``"0.5%"`` or a fraction such as ``0.05``."""
    if isinstance(value, bool):
        raise ValueError("expected a share like 5% or 0.05")
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f"{value!r} is not a share; write it like 5% or 0.05")
        try:
            fraction = float(text[:-1]) / 100.0
        except ValueError:
            raise ValueError(f"{value!r} is not a share; write it like 5% or 0.05") from None
    elif isinstance(value, int | float):
        if value == 1 and isinstance(value, int):
            raise ValueError("1 is ambiguous: write 1% or 100% (a bare number is a fraction, "
                             "so 0.01 is 1% and 1.0 is 100%)")
        fraction = float(value)
        if fraction > 1:
            raise ValueError(f"{value} is more than 1; write a percentage as {value}% or a fraction")
    else:
        raise ValueError(f"{value!r} is not a share; write it like 5% or 0.05")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("a share must lie between 0% and 100%")
    bp = fraction * BASIS_POINTS
    if abs(bp - round(bp)) > 1e-6:
        raise ValueError("shares are resolved to 0.01%; round it, e.g. 0.25%")
    return round(bp)


def format_share(bp: int) -> str:
    """``500`` → ``5%``, ``25`` → ``0.25%``."""
    return f"{bp / 100:g}%"


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
"""Control characters (newlines and terminal escapes included), and the invisible or
direction-changing ones that can make a text read as something else."""


def printable(text: str) -> str:
    """``text`` with every control or invisible character escaped (``\\n``, ``\\x1b``,
    ``\\u202e``): reasons and actor names come from people, and must not forge a line of a
    history or drive a terminal."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


_MD_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_[]<>|#"})


def markdown_text(text: object) -> str:
    """Client- or operator-written text, safe inside Markdown: control characters escaped,
    markup characters neutralised, on one line."""
    return printable(str(text)).translate(_MD_SPECIAL)


def client_address(ip: str | None) -> str | None:
    """A client's address as logs keep it: by default truncated (IPv4 to its /24, IPv6 to its
    /48), so a log line locates a network, not a person; ``SAFESHIFT_LOG_CLIENT_IP=full`` keeps
    it whole, ``none`` drops it.

    Every request's access-log line asks, mostly for the same few addresses (a load balancer,
    the replicas' peers): parsing one with :mod:`ipaddress` costs ~13 µs, a dictionary look-up
    well under one, so answers are remembered per mode and address (a bounded table, emptied
    when full, so a scan of many addresses cannot grow it). The variable is read on every call,
    as before: changing it takes effect at once."""
    import os

    if ip is None:
        return None
    mode = os.environ.get("SAFESHIFT_LOG_CLIENT_IP", "truncated")
    if mode == "full":
        return ip
    if mode == "none":
        return None
    try:
        return _TRUNCATED[ip]
    except KeyError:
        pass
    if len(_TRUNCATED) >= _TRUNCATED_MAX:
        _TRUNCATED.clear()
    out = _TRUNCATED[ip] = _truncated(ip)
    return out


_TRUNCATED: dict[str, str] = {}
"""Truncated addresses by address (the default mode only: the others need no parsing)."""
_TRUNCATED_MAX = 4096


def _truncated(ip: str) -> str:
    import ipaddress

    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "-"  # not an address (a unix socket, a test client): nothing to locate
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)
