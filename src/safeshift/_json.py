"""The same JSON text as :mod:`json` writes, through ``orjson`` where that is provably so.

The gateway writes JSON on every request (the answer, the access-log line); the standard
encoder spends ~10 µs on a small answer, ``orjson`` under 1 µs. Their texts differ in places,
so ``orjson`` is used only for documents made of what both write alike:

- dicts with ``str`` keys, lists and tuples (nested at most :data:`MAX_DEPTH` deep);
- ``str``, ``bool``, ``None``, ``int`` within 64 bits (orjson refuses larger ones);
- ``float`` that is zero or whose magnitude is in [1e-4, 1e16): both write the shortest text
  that reads back the same, without an exponent (below 1e-4 Python writes ``1e-05`` and
  orjson ``0.00001``); NaN and infinities fail the check (json writes or refuses them,
  orjson writes ``null``).

Only exact types count: a subclass (``numpy.float64``, an ``Enum`` on ``str``) takes the
standard encoder, which is what decides how such values are written. On the output one
difference remains, checked there: ``orjson`` keeps non-ASCII text and DEL as they are where
``json`` (``ensure_ascii``) escapes them; such a document is written by ``json`` too.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_DEPTH = 32

_INT_MIN = -(1 << 63)
_INT_MAX = 1 << 63


def plain(obj: Any, depth: int = 0) -> bool:
    """Whether ``orjson`` writes ``obj`` as ``json`` would (see the module's docstring), but
    for non-ASCII text and DEL, which :func:`dumps_plain` checks on the output."""
    kind = type(obj)
    if kind is str or kind is bool or obj is None:
        return True
    if kind is float:
        return bool(obj == 0.0 or 1e-4 <= abs(obj) < 1e16)
    if kind is int:
        return bool(_INT_MIN <= obj < _INT_MAX)
    if depth >= MAX_DEPTH:
        return False
    if kind is list or kind is tuple:
        for value in obj:
            value_kind = type(value)
            if value_kind is float:  # the common case (scores, features): no call
                if not (value == 0.0 or 1e-4 <= abs(value) < 1e16):
                    return False
            elif not (value_kind is str or value_kind is bool or value is None
                      or (value_kind is int and _INT_MIN <= value < _INT_MAX)
                      or plain(value, depth + 1)):
                return False
        return True
    if kind is dict:
        return all(type(key) is str and plain(value, depth + 1) for key, value in obj.items())
    return False


def dumps_plain(obj: Any) -> bytes | None:
    """``orjson.dumps(obj)`` when it is the text ``json`` would write with compact separators
    (``separators=(",", ":")``, ``ensure_ascii``); None when it may not be (then use json)."""
    if not plain(obj):
        return None
    try:
        raw = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return None
    if raw.isascii() and b"\x7f" not in raw:
        return raw
    return None


__all__ = ["MAX_DEPTH", "dumps_plain", "plain"]
