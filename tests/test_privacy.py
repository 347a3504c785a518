"""Personal values never reach the store: pseudonyms for personal attributes, rules that list
pseudonyms, key handling and rotation, client addresses truncated in logs."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import plan_dict

from safeshift import FakeModel, MemoryStore, Plan, Rollout, VirtualClock
from safeshift._units import client_address
from safeshift.errors import PlanValidationError
from safeshift.pseudonym import (
    KEY_ENV,
    PREVIOUS_ENV,
    PseudonymKeyError,
    is_pseudonym,
    pseudonymizer,
)
from safeshift.store import SQLStore, sqlite_url

EMAILS = [f"user{i}.name@example.org" for i in range(40)]


def _plan(**changes: object) -> Plan:
    return Plan.from_dict(plan_dict(segments=["country", "email"], personal=["email"],
                                    **changes))


def test_personal_values_are_pseudonymised_before_anything_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = SQLStore(sqlite_url(db))
    clock = VirtualClock()
    plan = _plan()
    rollout = Rollout.from_plan(plan, store=store, clock=clock, models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    rng = random.Random(3)
    ids = []
    used = set()
    for _ in range(600):
        email = rng.choice(EMAILS)
        used.add(email)
        p = rollout.predict({"x": 1}, unit=email, context={"country": "BR", "email": email})
        ids.append(p.id)
    rollout.flush()
    clock.advance(60)
    rollout.tick()
    for request_id in ids[:50]:
        rollout.report(request_id, "wrong", "mail me at someone@example.org")
    rollout.flush()
    segments = {r.segment for r in store.telemetry(plan.rollout)}
    emails = {s.split("email=")[1] for s in segments if "email=" in s}
    assert emails and all(is_pseudonym(e) for e in emails)
    assert emails == {pseudonymizer().pseudonym("email", e) for e in used}
    store.close()
    raw = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("s.db"))
    found = [e for e in [*EMAILS, "someone@example.org"] if e.encode() in raw]
    assert not found, f"raw personal values in the store: {found[:3]}"
    assert b"example.org" not in raw


def test_a_planted_raw_value_would_be_found(tmp_path: Path) -> None:
    """The scan above can fail: a segment attribute not marked personal is stored as sent."""
    db = tmp_path / "s.db"
    store = SQLStore(sqlite_url(db))
    plan = Plan.from_dict(plan_dict(segments=["email"]))
    rollout = Rollout.from_plan(plan, store=store, clock=VirtualClock(), models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    rollout.predict({"x": 1}, unit="u1", context={"email": EMAILS[0]})
    rollout.flush()
    store.close()
    raw = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("s.db"))
    assert EMAILS[0].encode() in raw


def test_rules_on_personal_attributes_list_pseudonyms() -> None:
    with pytest.raises(PlanValidationError, match="safeshift pseudonym email VALUE") as info:
        _plan(targeting={"always_candidate": {"email": ["bob@example.org"]}})
    assert "targeting.always_candidate.email.0" in str(info.value)
    with pytest.raises(PlanValidationError, match="must not hold its values"):
        _plan(analysis={"protected": {"email": ["bob@example.org"]}})
    bob = pseudonymizer().pseudonym("email", "bob@example.org")
    plan = _plan(targeting={"always_candidate": {"email": [bob]}})
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=VirtualClock(), models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=2)})
    assert rollout.assign("u1", {"email": "bob@example.org"}).is_candidate
    assert rollout.assign("u1", {"email": "bob@example.org"}).reason == "targeted"
    # a client sending the pseudonym itself is not bob
    assert rollout.assign("u1", {"email": bob}).reason != "targeted"
    assert "bob@example.org" not in str(plan.canonical())


def test_unit_rules_may_list_pseudonyms_and_raw_ids_still_match() -> None:
    unit = pseudonymizer().pseudonym("user_id", "alice@example.org")
    plan = Plan.from_dict(plan_dict(targeting={"always_candidate": {"user_id": [unit, "carol"]}}))
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=VirtualClock(), models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=2)})
    assert rollout.assign("alice@example.org", {}).reason == "targeted"
    assert rollout.assign("carol", {}).reason == "targeted"  # a plan written before
    assert rollout.assign("dave", {}).reason != "targeted"


def test_rotation_keeps_old_pseudonyms_matching(monkeypatch: pytest.MonkeyPatch) -> None:
    old_key, new_key = "o" * 40, "n" * 40
    monkeypatch.setenv(KEY_ENV, old_key)
    old = pseudonymizer().pseudonym("email", "bob@example.org")
    monkeypatch.setenv(KEY_ENV, new_key)
    monkeypatch.setenv(PREVIOUS_ENV, old_key)
    p = pseudonymizer()
    new = p.pseudonym("email", "bob@example.org")
    assert new != old and p.candidates("email", "bob@example.org") == (new, old)
    plan = _plan(targeting={"always_candidate": {"email": [old]}})
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=VirtualClock(), models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=2)})
    assert rollout.assign("u1", {"email": "bob@example.org"}).reason == "targeted"
    monkeypatch.delenv(PREVIOUS_ENV)  # the grace period is over
    rollout = Rollout.from_plan(plan, store=MemoryStore(), clock=VirtualClock(), models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=2)})
    assert rollout.assign("u1", {"email": "bob@example.org"}).reason != "targeted"


def test_bad_keys_are_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(PseudonymKeyError, match="at least 32"):
        pseudonymizer()
    monkeypatch.setenv("SAFESHIFT_PSEUDONYM_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(PseudonymKeyError, match="only one"):
        pseudonymizer()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(PseudonymKeyError, match="cannot read"):
        pseudonymizer()
    key = tmp_path / "key"
    key.write_text("k" * 64 + "\n")
    monkeypatch.setenv("SAFESHIFT_PSEUDONYM_KEY_FILE", str(key))
    assert pseudonymizer().source == "$SAFESHIFT_PSEUDONYM_KEY_FILE"
    r = subprocess.run([sys.executable, "-m", "safeshift.cli", "pseudonym", "email",
                        "bob@example.org"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout.strip() == "email=" + pseudonymizer().pseudonym("email", "bob@example.org")


@pytest.mark.parametrize(("ip", "mode", "logged"), [
    ("203.0.113.77", None, "203.0.113.0"),
    ("2001:db8:85a3:8d3:1319:8a2e:370:7348", None, "2001:db8:85a3::"),
    ("203.0.113.77", "full", "203.0.113.77"),
    ("203.0.113.77", "none", None),
    ("testclient", None, "-"),
])
def test_client_addresses_are_truncated_in_logs(monkeypatch: pytest.MonkeyPatch, ip: str,
                                                mode: str | None, logged: str | None) -> None:
    if mode is None:
        monkeypatch.delenv("SAFESHIFT_LOG_CLIENT_IP", raising=False)
    else:
        monkeypatch.setenv("SAFESHIFT_LOG_CLIENT_IP", mode)
    assert client_address(ip) == logged


def test_client_addresses_are_remembered_per_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFESHIFT_LOG_CLIENT_IP", raising=False)
    assert client_address("198.51.100.7") == "198.51.100.0"
    assert client_address("198.51.100.7") == "198.51.100.0"  # the remembered answer
    monkeypatch.setenv("SAFESHIFT_LOG_CLIENT_IP", "full")  # a change takes effect at once
    assert client_address("198.51.100.7") == "198.51.100.7"
    monkeypatch.setenv("SAFESHIFT_LOG_CLIENT_IP", "none")
    assert client_address("198.51.100.7") is None


def test_client_request_ids_are_kept_as_their_hmac(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = SQLStore(sqlite_url(db))
    plan = Plan.from_dict(plan_dict(guardrails=[{"metric": "accuracy", "tolerance": 0.05}]))
    rollout = Rollout.from_plan(plan, store=store, clock=VirtualClock(), models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    chosen = "order-1234-bob.jones@example.org"
    p = rollout.predict({"x": 1}, unit="u1", request_id=chosen)
    assert p.id == chosen
    rollout.flush()
    record = store.get_request(chosen)
    assert record is not None and record.id == chosen  # the client's id still finds it
    assert rollout.feedback(chosen, label=1).accepted == ["accuracy"]
    assert rollout.feedback(chosen, label=1).duplicate == ["accuracy"]  # once per request
    # a record written before ids were hashed is still found by its id as sent
    from safeshift.store.sql import requests

    with store.engine.begin() as conn:
        conn.execute(requests.insert().values(
            id="legacy-id", rollout=plan.rollout, stage=0, arm="baseline", cohort="hash",
            segment="", created_at=0.0, expires_at=1e12, outputs="[1]", cluster=-1,
            unit_hash=-1))
    assert store.get_requests(["legacy-id", chosen]).keys() == {"legacy-id", chosen}
    store.close()
    raw = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("s.db"))
    assert b"bob.jones" not in raw and b"order-1234" not in raw
