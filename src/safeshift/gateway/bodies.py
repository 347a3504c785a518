"""Request bodies: the one JSON parser every POST route uses, and the predict body.

:func:`load_json` accepts RFC 8259 JSON only, so that no request can put into the record what
JSON cannot say or what the parser cannot survive:

- ``NaN``, ``Infinity`` and ``-Infinity`` (Python's ``json`` accepts them by default) and
  numbers beyond the range of a 64-bit float (``1e999`` would silently become infinity) are
  refused, naming the field that holds the first of them;
- arrays and objects nest at most :data:`MAX_DEPTH` levels: a 4 KB body nested 2,000 deep
  would otherwise exhaust the parser's recursion (a 500) or any code that walks it.

Every refusal is an :class:`~safeshift.gateway._http.HTTPError` 422 naming ``body`` or the
field, answered in the route's error shape (``{"error": ..., "field": ...}``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from safeshift.gateway._http import HTTPError

try:  # several times faster than json on a request body; optional (json decides without it)
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]

MAX_DEPTH = 64
"""Levels of arrays and objects a request body may nest (``{"inputs": [[1]]}`` is 3 deep)."""

_FIELDS = frozenset({"unit", "context", "inputs", "id"})
# A number literal that may not fit a float has a positive exponent of 3 digits or more, or
# 309 digits in a row. With digits mapped to 0, E to e and + deleted (one C pass, a microsecond
# or two a kilobyte, many times faster than a regular expression) either shows as a substring;
# strings that look alike only select the slower decoder that checks every number.
_DIGITS = bytes.maketrans(b"0123456789E", b"0000000000e")
_LONG_EXPONENT = b"e000"
_LONG_DIGITS = b"0" * 309
# orjson reads integers beyond 64 bits as floats (json keeps them exact): a body with 19 digits
# in a row goes to json
_LONG_INT = b"0" * 19
_FLOAT_MAX = sys.float_info.max


class _NotJSON(ValueError):
    """A literal the ``json`` module accepts but RFC 8259 (or a 64-bit float) does not."""

    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.literal = literal


class _Marker:
    """Stands in for a refused literal while :func:`_locate` finds where it was."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _refuse(literal: str) -> Any:
    raise _NotJSON(literal)


def _checked_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _NotJSON(literal)
    return value


def _checked_int(literal: str) -> int:
    value = int(literal)
    if abs(value) > _FLOAT_MAX:
        raise _NotJSON(literal)
    return value


def _marking_float(literal: str) -> Any:
    value = float(literal)
    return _Marker(literal) if math.isinf(value) else value


def _marking_int(literal: str) -> Any:
    value = int(literal)
    return _Marker(literal) if abs(value) > _FLOAT_MAX else value


_FAST = json.JSONDecoder(parse_constant=_refuse)
_CHECKED = json.JSONDecoder(parse_constant=_refuse, parse_float=_checked_float,
                            parse_int=_checked_int)
_LOCATING = json.JSONDecoder(parse_constant=_Marker, parse_float=_marking_float,
                             parse_int=_marking_int)


def load_json(body: bytes, expected: str) -> Any:
    """The JSON document in ``body``; 422 naming ``body`` (or the field holding a refused
    literal) when it is empty, malformed, not RFC 8259 or nested deeper than
    :data:`MAX_DEPTH`. ``expected`` says what to send instead of an empty body."""
    if not body.strip():
        raise HTTPError(422, f"request body is empty; send {expected}", field="body")
    shape = body.translate(_DIGITS, b"+")
    huge = _LONG_EXPONENT in shape or _LONG_DIGITS in shape
    if orjson is not None and not huge and _LONG_INT not in shape:
        # orjson accepts RFC 8259 JSON in UTF-8 only and reads it as json does; whatever it
        # refuses (NaN, surrogates, other encodings, malformed) json below accepts or names
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(doc, MAX_DEPTH):
                raise _too_deep()
            return doc
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        doc = (_CHECKED if huge else _FAST).decode(text)
    except _NotJSON as exc:
        raise _not_json(exc.literal, _locate(text)) from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise HTTPError(422, f"malformed JSON: {exc}", field="body") from None
    # a body with no more brackets than the limit cannot nest deeper: most never walk the tree
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(doc, MAX_DEPTH):
        raise _too_deep()
    return doc


def _too_deep() -> HTTPError:
    return HTTPError(422, f"JSON nested too deep: arrays and objects may nest at most {MAX_DEPTH} "
                          "levels; send a flatter document", field="body")


def _not_json(literal: str, field: str | None) -> HTTPError:
    shown = literal if len(literal) <= 24 else f"{literal[:12]}…{literal[-8:]}"
    if literal in ("NaN", "Infinity", "-Infinity"):
        why = f"{shown} is not JSON (RFC 8259 has no NaN or infinities)"
    else:
        why = f"the number {shown} is outside the range of a 64-bit float"
    return HTTPError(422, f"{why}: send a finite number, or null", field=field or "body")


def _deeper_than(doc: Any, limit: int) -> bool:
    """True when ``doc`` nests arrays and objects more than ``limit`` levels (breadth-first,
    no recursion)."""
    level = [doc] if type(doc) is list or type(doc) is dict else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for node in level:
            for child in (node.values() if type(node) is dict else node):
                if type(child) is list or type(child) is dict:
                    below.append(child)
        level = below
    return False


def _locate(text: str) -> str | None:
    """The field (``outcome.revenue``, ``inputs[0].data[3]``) that holds the first refused
    literal of ``text``, or None when it is the whole document or cannot be found."""
    try:
        doc = _LOCATING.decode(text)
    except (ValueError, RecursionError):
        return None  # malformed after the literal, or too deep: name the body
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Marker):
            return path or None
        if type(node) is dict:
            children = [(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
        elif type(node) is list:
            children = [(v, f"{path}[{i}]") for i, v in enumerate(node)]
        else:
            continue
        stack.extend(reversed(children))  # depth-first in document order
    return None


# -- the predict body ------------------------------------------------------------------------


@dataclass(slots=True)
class PredictBody:
    """A parsed ``POST /v1/endpoints/{name}/predict`` body."""

    rows: list[Any]
    unit: str | None
    context: dict[str, Any] | None
    id: str | None


def parse_predict(body: bytes) -> PredictBody:
    """Validate a predict body; :class:`HTTPError` 422 names the field that is wrong."""
    doc = load_json(body, "a JSON object with 'inputs'")
    if type(doc) is not dict:
        raise HTTPError(422, "the body must be a JSON object with 'inputs'", field="body")
    if not doc.keys() <= _FIELDS:
        extra = sorted(doc.keys() - _FIELDS)[0]
        raise HTTPError(422, f"unknown field {extra!r}; the fields are id, unit, context and "
                             "inputs", field=extra)
    inputs = doc.get("inputs")
    if type(inputs) is dict:
        rows: list[Any] = [inputs]
    elif type(inputs) is list and inputs:
        rows = inputs
        for i, row in enumerate(rows):
            if row is None:
                raise HTTPError(422, "a row cannot be null", field=f"inputs[{i}]")
    elif inputs is None:
        raise HTTPError(422, "'inputs' is required: one row (an object) or a list of rows",
                        field="inputs")
    else:
        raise HTTPError(422, "'inputs' must be one row (an object) or a non-empty list of "
                             "rows", field="inputs")
    unit = doc.get("unit")
    if unit is not None:
        if type(unit) is int:
            unit = str(unit)
        elif type(unit) is not str:
            raise HTTPError(422, "'unit' must be a string (or an integer)", field="unit")
    context = doc.get("context")
    if context is not None:
        if type(context) is not dict:
            raise HTTPError(422, "'context' must be an object of attribute values",
                            field="context")
        for key, value in context.items():
            if isinstance(value, dict | list):
                raise HTTPError(422, "context values must be strings, numbers, booleans or "
                                     "null", field=f"context.{key}")
    rid = doc.get("id")
    if rid is not None and (type(rid) is not str or not 0 < len(rid) <= 128):
        raise HTTPError(422, "'id' must be a string of 1 to 128 characters", field="id")
    return PredictBody(rows, unit, context, rid)
