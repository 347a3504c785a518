"""The gateway's JSON (answers, access-log lines) is the standard encoder's text, byte for byte,
whether orjson writes it or json does; and a typical answer takes the orjson way."""

from __future__ import annotations

import json
import random
from enum import StrEnum
from typing import Any

import numpy as np
import pytest

from safeshift._json import MAX_DEPTH, dumps_plain
from safeshift.gateway._http import dumps
from safeshift.gateway.logs import _json_line


def _reference(obj: Any) -> bytes | type[Exception]:
    """What the gateway wrote before orjson: compact, ASCII, non-finite floats refused."""
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False,
                               default=lambda o: o.tolist())
    try:
        return encoder.encode(obj).encode()
    except (TypeError, ValueError, AttributeError) as exc:
        return type(exc)


def _ours(obj: Any) -> bytes | type[Exception]:
    try:
        return dumps(obj)
    except (TypeError, ValueError, AttributeError) as exc:
        return type(exc)


class Colour(StrEnum):
    RED = "red"


def _deep(levels: int) -> list[Any]:
    doc: list[Any] = [1]
    for _ in range(levels):
        doc = [doc]
    return doc


EDGES: list[Any] = [
    0.0, -0.0, 1e-4, 9.999e-5, 1e-05, 3.2e-07, 5e-324, 0.1, 1 / 3, 12.0, 9.999999999999998e15,
    1e16, 1.5e300, float("nan"), float("inf"), -float("inf"),
    0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**70, True, False, None,
    "", "plain", "é", "\u2028", "a\x7fb", "\x00\x1f\"\\", "\ud800", "日本",
    [1, 0.25], (1, "a"), {"k": [1.0, None]}, {1: "int key"}, {"é": 1},
    np.float64(0.5), np.int64(3), np.array([1.0, 2.0]), Colour.RED, {"a": Colour.RED},
    _deep(MAX_DEPTH - 2), _deep(MAX_DEPTH + 5),
]


@pytest.mark.parametrize("obj", EDGES, ids=repr)
def test_edge_values_are_written_as_json_writes_them(obj: Any) -> None:
    assert _ours(obj) == _reference(obj)


def _random_doc(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [_random_doc(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3 and r < 0.3:
        return {rng.choice(["a", "b", "é", "\x7f", 'k"']): _random_doc(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    kind = rng.randint(0, 6)
    if kind == 0:
        return rng.choice([1, -1]) * 10 ** rng.uniform(-10, 20)
    if kind == 1:
        return round(rng.random(), rng.randint(0, 17))
    if kind == 2:
        return rng.randint(-(2**70), 2**70)
    if kind == 3:
        return rng.randint(-1000, 1000)
    if kind == 4:
        return "".join(chr(rng.randint(0, 300)) for _ in range(rng.randint(0, 5)))
    if kind == 5:
        return rng.choice([True, False, None])
    return np.float64(rng.random())


def test_random_documents_are_written_as_json_writes_them() -> None:
    rng = random.Random(20261203)
    for _ in range(20_000):
        doc = _random_doc(rng)
        assert _ours(doc) == _reference(doc), doc
        if isinstance(doc, dict):
            assert _json_line(doc) == json.dumps(doc, default=str, separators=(",", ":")), doc


def test_a_typical_answer_and_log_line_take_the_fast_way() -> None:
    answer = {"id": "0123456789abcdef", "outputs": [1, 0], "version": "v1", "arm": "baseline",
              "stage": "canary", "fallback": False, "scores": [0.9823423423412, 0.0003]}
    assert dumps_plain(answer) == _reference(answer)
    line = {"ts": "2026-12-03T12:00:00.123Z", "level": "info", "message": "request",
            "status": 200, "duration_ms": 0.532, "client": "127.0.0.0", "fallback": None}
    assert dumps_plain(line) is not None
    assert dumps_plain({"scores": [1e-05]}) is None  # json writes 1e-05, orjson 0.00001
    assert dumps_plain({"name": "é"}) is None  # json escapes it
