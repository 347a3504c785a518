"""The redactor: what identifies a person leaves a report's text before it is stored."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tests.conftest import plan_dict

from safeshift import FakeModel, Plan, Rollout, VirtualClock
from safeshift.redact import MAX_TEXT, luhn_ok, redact
from safeshift.store import SQLStore, sqlite_url


@pytest.mark.parametrize(("text", "expected", "kind"), [
    ("write to bob.jones+x@mail.example.co.uk today", "write to [email] today", "email"),
    ("my card 4111 1111 1111 1111 was charged", "my card [card] was charged", "card"),
    ("card 4111-1111-1111-1111", "card [card]", "card"),
    ("from 203.0.113.77 again", "from [ip] again", "ip"),
    ("from 2001:db8:85a3::8a2e:370:7334 again", "from [ip] again", "ip"),
    ("call +44 20 7946 0958 please", "call [phone] please", "phone"),
    ("call (555) 123-4567", "call [phone]", "phone"),
    ("order 98765432 is late", "order [number] is late", "number"),
])
def test_each_kind_is_replaced_and_counted(text: str, expected: str, kind: str) -> None:
    out, counts = redact(text)
    assert out == expected
    assert counts == {kind: 1}


def test_a_number_failing_luhn_is_not_a_card_but_is_still_removed() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    out, counts = redact("ref 4111111111111112")
    assert "4111" not in out and counts["card"] == 0 and sum(counts.values()) == 1


@pytest.mark.parametrize("text", [
    "the answer was wrong for my region", "version 2.3.1 crashed twice", "3 errors in 10 min",
    "score 0.93 vs 0.87", "it took 12 s", "",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == (text, {})


def test_long_and_hostile_texts_are_bounded() -> None:
    out, _ = redact("a" * 100_000)
    assert len(out) == MAX_TEXT
    rng = random.Random(1)
    noise = "".join(rng.choice("0123456789 .-()+@:abc") for _ in range(50_000))
    out, _ = redact(noise)  # finishes, and leaves no long digit run behind
    assert len(out) <= MAX_TEXT
    assert not any(len(run) >= 6 for run in "".join(c if c.isdigit() else " " for c in out).split())


def test_reports_keep_only_redacted_text_once_per_unit(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = SQLStore(sqlite_url(db))
    plan = Plan.from_dict(plan_dict(guardrails=[{"metric": "report_rate", "tolerance": 0.05}]))
    rollout = Rollout.from_plan(plan, store=store, clock=VirtualClock(), models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    first = rollout.predict({"x": 1}, unit="u1").id
    second = rollout.predict({"x": 1}, unit="u1").id
    rollout.flush()
    said = "wrong answer; reach me at jane.doe@example.org or +1 415 555 0100"
    assert rollout.report(first, "wrong", said) is True
    assert rollout.report(second, "wrong", said) is False  # the same user counts once
    texts = store.report_texts(plan.rollout)
    assert len(texts) == 1
    assert texts[0].text == "wrong answer; reach me at [email] or [phone]"
    assert texts[0].redactions == {"email": 1, "phone": 1}
    store.close()
    raw = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("s.db"))
    assert b"jane.doe" not in raw and b"555 0100" not in raw
