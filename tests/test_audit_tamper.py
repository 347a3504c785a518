"""The audit log cannot be forged: each way someone who can write the store (but does not hold
the audit key) might rewrite history is caught, and the message names the first bad event.

Every test tampers with a real SQLite store through raw SQL, as such a person would, then runs
``safeshift audit verify`` in-process: exit 1 for tampering, 2 when it cannot verify.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import TEST_AUDIT_KEY, plan_dict
from typer.testing import CliRunner

from safeshift import FakeModel, MemoryStore, Plan, Rollout, VirtualClock, ops
from safeshift.audit import (
    GENESIS,
    KEY_ENV,
    KEY_FILE_ENV,
    AuditEvent,
    AuditKey,
    audit_key,
    read_checkpoint,
    reset_audit_key,
    verify_chain,
)
from safeshift.cli import app
from safeshift.controller import Controller
from safeshift.errors import AuditKeyError
from safeshift.state import Action, RolloutState
from safeshift.store import SQLStore, sqlite_url

NAME = "test-rollout"
EVENTS = 5  # start, advance (with the stage's evidence), pause, resume, pause


def _drive(store: SQLStore, clock: VirtualClock) -> Rollout:
    """A rollout that started, advanced a stage on real telemetry, then was paused and
    resumed by people: decisions by the controller and by operators, one with evidence."""
    plan = Plan.from_dict(plan_dict())
    rollout = Rollout.from_plan(plan, store=store, clock=clock,
                                models={"baseline": FakeModel(output=1),
                                        "candidate": FakeModel(output=1)})
    rng = random.Random(3)
    for _ in range(400):
        for _ in range(60):
            rollout.predict({"x": 1}, unit=f"u{rng.randrange(1_000_000)}",
                            context={"country": rng.choice(["US", "BR", "IN"])})
        clock.advance(10)
        if rollout.tick() is not None:
            break
    rollout.pause(actor="ann", reason="checking the dashboards")
    rollout.resume(actor="ann")
    rollout.pause(actor="bob", reason="holiday freeze")
    rollout.flush()
    return rollout


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One driven store for the module, copied for each test (driving it takes a second)."""
    path = tmp_path_factory.mktemp("audit") / "template.db"
    with pytest.MonkeyPatch.context() as mp:  # the tests' key, as the autouse fixture sets it
        mp.setenv(KEY_ENV, TEST_AUDIT_KEY)
        mp.delenv(KEY_FILE_ENV, raising=False)
        reset_audit_key()
        store = SQLStore(sqlite_url(path))
        rollout = _drive(store, VirtualClock())
        assert [e.action for e in store.audit_events(NAME)] == [
            "start", "advance", "pause", "resume", "pause"]
        rollout.close()
        store.close()  # the last connection checkpoints the WAL into the file
        reset_audit_key()
    return path


@dataclass
class Case:
    """A copy of the driven store: its file for raw SQL, its URL for the CLI."""

    path: Path

    @property
    def url(self) -> str:
        return sqlite_url(self.path)

    def sql(self, statement: str, *args: object) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute(statement, args).fetchall()

    def event(self, seq: int) -> dict[str, object]:
        ((detail, prev, hash_),) = self.sql(
            "SELECT detail, prev_hash, hash FROM audit WHERE rollout = ? AND seq = ?", NAME, seq)
        return {"detail": json.loads(str(detail)), "prev_hash": prev, "hash": hash_}

    def extra(self) -> dict[str, object]:
        ((text,),) = self.sql("SELECT extra FROM rollouts WHERE name = ?", NAME)
        result: dict[str, object] = json.loads(str(text))
        return result

    def set_extra(self, **changes: object) -> None:
        self.sql("UPDATE rollouts SET extra = ? WHERE name = ?",
                 json.dumps({**self.extra(), **changes}), NAME)

    def verify(self, *options: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["audit", "verify", NAME, "--store", self.url, *options],
                                    env={"COLUMNS": "400"})
        return result.exit_code, " ".join(result.output.split())

    def store(self) -> SQLStore:
        return SQLStore(self.url, migrate=False)


@pytest.fixture
def case(template: Path, tmp_path: Path) -> Iterator[Case]:
    path = tmp_path / "store.db"
    shutil.copy(template, path)
    yield Case(path)


def _rechain(case: Case, first: int, sign: object) -> None:
    """Recompute the chain from event ``first`` on, as an attacker would after altering an
    event, with ``sign(event) -> hash``, and make the state's counter and head agree."""
    store = case.store()
    events = store.audit_events(NAME)
    store.close()
    prev = events[first - 2].hash if first > 1 else GENESIS
    for e in events[first - 1:]:
        e.prev_hash = prev
        e.hash = sign(e)  # type: ignore[operator]
        prev = e.hash
        case.sql("UPDATE audit SET detail = ?, prev_hash = ?, hash = ? WHERE rollout = ? AND "
                 "seq = ?", json.dumps(e.detail), e.prev_hash, e.hash, NAME, e.seq)
    case.set_extra(audit_head=prev)


# -- intact ------------------------------------------------------------------------------------


def test_an_intact_chain_verifies(case: Case) -> None:
    code, out = case.verify()
    assert code == 0, out
    key_id = AuditKey.from_secret(TEST_AUDIT_KEY).id
    assert f"{EVENTS} events, chain intact, signed with key id {key_id}" in out
    assert case.event(1)["detail"]["key_id"] == key_id  # type: ignore[index]
    extra = case.extra()
    assert extra["audit_seq"] == EVENTS and extra["audit_head"] == case.event(EVENTS)["hash"]


def test_each_decision_event_covers_the_whole_decision(case: Case) -> None:
    store = case.store()
    advance = store.decisions(NAME)[1]
    detail = store.audit_events(NAME)[1].detail
    store.close()
    evidence = json.dumps(advance.evidence, sort_keys=True, separators=(",", ":"))
    assert detail["evidence_sha256"] == hashlib.sha256(evidence.encode()).hexdigest()
    assert (detail["from_phase"], detail["to_phase"]) == ("running", "running")
    assert (detail["from_stage"], detail["to_stage"], detail["decision"]) == (0, 1, 2)
    assert detail["plan_hash"] == Plan.from_dict(plan_dict()).hash
    assert detail["reason"] == advance.reason


def test_quiet_state_updates_stay_sealed(case: Case) -> None:
    """A commit with no decision (the controller's bookkeeping) still seals the state."""
    store = case.store()
    state = store.get_state(NAME)
    state.srm_min_p = 0.5
    new = store.commit(state, expected_version=state.version)
    assert new.audit.seq == EVENTS
    assert new.audit.mac != state.audit.mac  # the version moved
    assert ops.verify_audit(store, NAME).ok
    store.close()
    code, out = case.verify()
    assert code == 0, out


# -- tampering ---------------------------------------------------------------------------------


def test_an_edited_event_is_named(case: Case) -> None:
    detail = case.event(3)["detail"]
    detail["reason"] = "paused by the regular process"  # type: ignore[index]
    case.sql("UPDATE audit SET detail = ? WHERE rollout = ? AND seq = 3", json.dumps(detail), NAME)
    code, out = case.verify()
    assert code == 1 and "event 3: content does not match its MAC (altered" in out, out


def test_edited_decision_evidence_is_named(case: Case) -> None:
    ((text,),) = case.sql("SELECT evidence FROM decisions WHERE rollout = ? AND seq = 2", NAME)
    evidence = json.loads(str(text))
    evidence["n_candidate"] = 1_000_000
    case.sql("UPDATE decisions SET evidence = ? WHERE rollout = ? AND seq = 2",
             json.dumps(evidence), NAME)
    code, out = case.verify()
    assert code == 1 and "event 2: decision 2 does not match its audit event (evidence" in out, out


def test_an_edited_decision_actor_is_named(case: Case) -> None:
    case.sql("UPDATE decisions SET actor = 'mallory' WHERE rollout = ? AND seq = 4", NAME)
    code, out = case.verify()
    assert code == 1 and "event 4: decision 4 does not match its audit event (actor" in out, out


def test_a_deleted_middle_event_is_named(case: Case) -> None:
    case.sql("DELETE FROM audit WHERE rollout = ? AND seq = 3", NAME)
    code, out = case.verify()
    assert code == 1 and "event 3: missing" in out, out


def test_a_deleted_last_event_is_found_even_with_the_counter_fixed(case: Case) -> None:
    """Delete the last event and its decision, then set every counter and the head back to
    what they were before it: only the state's MAC, which needs the key, disagrees."""
    case.sql("DELETE FROM audit WHERE rollout = ? AND seq = ?", NAME, EVENTS)
    case.sql("DELETE FROM decisions WHERE rollout = ? AND seq = ?", NAME, EVENTS)
    case.set_extra(seq=EVENTS - 1, audit_seq=EVENTS - 1,
                   audit_head=case.event(EVENTS - 1)["hash"])
    code, out = case.verify()
    assert code == 1 and "does not match its seal" in out, out
    assert f"sealed after event {EVENTS - 1}" in out and f"event {EVENTS} and later removed" in out


def test_a_deleted_last_event_with_the_counter_left_is_named(case: Case) -> None:
    case.sql("DELETE FROM audit WHERE rollout = ? AND seq = ?", NAME, EVENTS)
    code, out = case.verify()
    assert code == 1 and f"event {EVENTS}: missing" in out, out


def test_deleting_every_event_is_found(case: Case) -> None:
    case.sql("DELETE FROM audit WHERE rollout = ?", NAME)
    case.sql("DELETE FROM decisions WHERE rollout = ?", NAME)
    code, out = case.verify()
    assert code == 1 and "event 1: missing" in out, out
    case.set_extra(seq=0, audit_seq=0, audit_head=GENESIS)  # and the counters reset too
    code, out = case.verify()
    assert code == 1 and "does not match its seal" in out and "event 1 and later removed" in out
    assert "0 events, chain intact" not in out


def test_reordered_events_are_named(case: Case) -> None:
    case.sql("UPDATE audit SET seq = -1 WHERE rollout = ? AND seq = 2", NAME)
    case.sql("UPDATE audit SET seq = 2 WHERE rollout = ? AND seq = 3", NAME)
    case.sql("UPDATE audit SET seq = 3 WHERE rollout = ? AND seq = -1", NAME)
    code, out = case.verify()
    assert code == 1 and "event 2: does not link to the event before it" in out, out


def test_a_chain_recomputed_with_plain_sha256_is_refused(case: Case) -> None:
    """The attacker alters event 2, drops the key ids and recomputes every hash the way
    older releases did: the events are reported unkeyed and the state's seal disagrees."""
    store = case.store()
    events = store.audit_events(NAME)
    store.close()
    prev = GENESIS
    for e in events:
        e.detail.pop("key_id")
        if e.seq == 2:
            e.detail["reason"] = "all guardrails passed by a wide margin"
        e.prev_hash, e.hash = prev, ""
        e.hash = e.legacy_hash()
        prev = e.hash
        case.sql("UPDATE audit SET detail = ?, prev_hash = ?, hash = ? WHERE rollout = ? AND "
                 "seq = ?", json.dumps(e.detail), e.prev_hash, e.hash, NAME, e.seq)
    case.set_extra(audit_head=prev)
    code, out = case.verify()
    assert code == 1 and f"event 1: unkeyed: {EVENTS} event(s)" in out, out
    assert "--allow-unkeyed" in out
    code, out = case.verify("--allow-unkeyed")  # even accepting unkeyed events: the seal
    assert code == 1 and "does not match its seal" in out, out


def test_a_chain_recomputed_with_another_key_is_refused(case: Case) -> None:
    """The attacker alters event 3 and re-signs from there with a key of their own, keeping
    the recorded key id: the MACs do not verify under the real key."""
    forged = AuditKey.from_secret("mallory-knows-hmac-but-not-the-key-0123456789")
    detail = case.event(3)["detail"]
    detail["reason"] = "paused for the regular maintenance window"  # type: ignore[index]
    case.sql("UPDATE audit SET detail = ? WHERE rollout = ? AND seq = 3", json.dumps(detail), NAME)
    _rechain(case, 3, lambda e: e.compute_hash(forged))
    code, out = case.verify()
    assert code == 1 and "event 3: content does not match its MAC" in out, out


def test_a_chain_re_signed_under_another_key_id_cannot_pass(case: Case) -> None:
    """Recording the attacker's own key id instead only turns "altered" into "signed with
    another key": verification still fails at that event, naming the key id to ask about."""
    forged = AuditKey.from_secret("mallory-knows-hmac-but-not-the-key-0123456789")

    def sign(e: AuditEvent) -> str:
        e.detail["key_id"] = forged.id
        return e.compute_hash(forged)

    _rechain(case, 3, sign)
    code, out = case.verify()
    assert code == 2 and f"event 3: signed with another key (id {forged.id})" in out, out


def test_a_rollback_to_an_older_copy_is_caught_by_a_checkpoint(case: Case, tmp_path: Path) -> None:
    """The store put back to an earlier copy of the state, with the later events and
    decisions deleted, agrees with itself; the checkpoint exported before does not."""
    (row,) = case.sql("SELECT phase, stage_index, version, reason, extra FROM rollouts")
    store = case.store()
    Controller(Plan.from_dict(plan_dict()), store, VirtualClock(10_000)).act(
        Action.RESUME, actor="carol", reason="freeze over")
    store.close()
    export = tmp_path / "audit.jsonl"
    result = CliRunner().invoke(app, ["audit", "export", NAME, "-o", str(export), "--store",
                                      case.url])
    assert result.exit_code == 0 and f"wrote {EVENTS + 1} events" in result.output, result.output
    lines = export.read_text().splitlines()
    assert len(lines) == EVENTS + 2 and [json.loads(x)["seq"] for x in lines[:-1]] == list(
        range(1, EVENTS + 2))
    cp = read_checkpoint(export)
    assert (cp.seq, cp.head) == (EVENTS + 1, case.event(EVENTS + 1)["hash"])
    code, out = case.verify("--checkpoint", str(export))
    assert code == 0, out
    # the rollback: the old state row back, the newer records gone
    case.sql("UPDATE rollouts SET phase = ?, stage_index = ?, version = ?, reason = ?, extra = ?",
             *row)
    case.sql("DELETE FROM audit WHERE seq > ?", EVENTS)
    case.sql("DELETE FROM decisions WHERE seq > ?", EVENTS)
    code, out = case.verify()
    assert code == 0, out  # consistent in itself: only the checkpoint can tell
    code, out = case.verify("--checkpoint", str(export))
    assert code == 1 and f"event {EVENTS + 1}: missing: the checkpoint exported at" in out, out
    assert "put back to an older copy" in out


def test_an_altered_checkpoint_is_refused(case: Case, tmp_path: Path) -> None:
    export = tmp_path / "audit.jsonl"
    result = CliRunner().invoke(app, ["audit", "export", NAME, "-o", str(export), "--store",
                                      case.url])
    assert result.exit_code == 0, result.output
    *events, last = export.read_text().splitlines()
    checkpoint = json.loads(last)
    checkpoint["seq"] = 2
    export.write_text("\n".join([*events, json.dumps(checkpoint)]) + "\n")
    code, out = case.verify("--checkpoint", str(export))
    assert code == 1 and "the checkpoint file was altered" in out, out
    export.write_text("not json\n")
    code, out = case.verify("--checkpoint", str(export))
    assert code == 2 and "is not JSON" in out, out


def test_a_tampered_chain_is_not_exported(case: Case, tmp_path: Path) -> None:
    case.sql("DELETE FROM audit WHERE rollout = ? AND seq = 2", NAME)
    export = tmp_path / "audit.jsonl"
    result = CliRunner().invoke(app, ["audit", "export", NAME, "-o", str(export), "--store",
                                      case.url])
    assert result.exit_code == 1 and "not exported: event 2: missing" in result.output
    assert not export.exists()


# -- keys --------------------------------------------------------------------------------------


def test_the_wrong_key_cannot_verify(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    right = AuditKey.from_secret(TEST_AUDIT_KEY).id
    other = "another-deployment-with-its-own-key-0123456789"
    monkeypatch.setenv(KEY_ENV, other)
    code, out = case.verify()
    assert code == 2 and f"event 1: signed with another key (id {right})" in out, out
    assert f"id {AuditKey.from_secret(other).id}" in out and KEY_FILE_ENV in out


def test_no_key_cannot_verify_and_none_is_created(case: Case, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    code, out = case.verify()
    assert code == 2 and "event 1: cannot be checked: no audit key at" in out, out
    assert KEY_FILE_ENV in out and KEY_ENV in out
    assert not (tmp_path / "config").exists()  # verifying never creates a key


def test_a_short_key_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "hunter2")
    with pytest.raises(AuditKeyError, match="is 7 characters; it needs at least 32"):
        audit_key()
    monkeypatch.delenv(KEY_ENV)
    short = tmp_path / "short.key"
    short.write_text("x" * 31 + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(short))
    with pytest.raises(AuditKeyError, match="is 31 characters"):
        audit_key()
    monkeypatch.setenv(KEY_ENV, "y" * 40)
    with pytest.raises(AuditKeyError, match="set only one"):
        audit_key()


def test_a_short_key_stops_a_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision is never committed unsigned: the commit fails, naming the fix."""
    monkeypatch.setenv(KEY_ENV, "too-short")
    store = MemoryStore()
    with pytest.raises(AuditKeyError, match=r"secrets\.token_hex"):
        store.create_rollout({}, RolloutState(NAME, "h"))


def test_the_key_file_is_read_from_its_variable(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    path = tmp_path / "shared.key"
    path.write_text("k" * 64 + "\n")
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    assert audit_key().id == AuditKey.from_secret("k" * 64).id
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "absent.key"))
    with pytest.raises(AuditKeyError, match="no audit key at"):
        audit_key()


def test_the_default_key_is_created_private_once(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    with pytest.raises(AuditKeyError, match="no audit key at"):
        audit_key(create=False)
    key = audit_key()
    path = tmp_path / "xdg" / "safeshift" / "audit.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 64 and key.source == str(path)
    reset_audit_key()
    assert audit_key().id == key.id  # read back, not made again
    assert [p.name for p in path.parent.iterdir()] == ["audit.key"]  # no temporary left


def test_unkeyed_events_of_an_older_release_need_allow_unkeyed(case: Case) -> None:
    """A store written before the keyed log: plain SHA-256 events, an unsealed state."""
    store = case.store()
    events = store.audit_events(NAME)
    store.close()
    prev = GENESIS
    for e in events:
        e.detail = {k: e.detail[k] for k in ("reason", "from_stage", "to_stage", "plan_hash")}
        e.detail["phase"] = {"pause": "paused"}.get(e.action, "running")
        e.prev_hash, e.hash = prev, ""
        e.hash = e.legacy_hash()
        prev = e.hash
        case.sql("UPDATE audit SET detail = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                 json.dumps(e.detail), e.prev_hash, e.hash, e.seq)
    extra = {k: v for k, v in case.extra().items() if not k.startswith("audit_")}
    case.sql("UPDATE rollouts SET extra = ?", json.dumps(extra))
    code, out = case.verify()
    assert code == 1 and f"event 1: unkeyed: {EVENTS} event(s)" in out, out
    code, out = case.verify("--allow-unkeyed")
    assert code == 0 and f"{EVENTS} unkeyed event(s) of an older release accepted" in out, out
    # the first commit of this release seals the state over the old chain and signs on
    store = case.store()
    Controller(Plan.from_dict(plan_dict()), store, VirtualClock(10_000)).act(
        Action.RESUME, actor="carol", reason="upgraded")
    store.close()
    code, out = case.verify("--allow-unkeyed")
    assert code == 0 and f"{EVENTS + 1} events, chain intact, signed with key id" in out, out
    # an unkeyed event after a signed one can only be a rewrite
    store = case.store()
    Controller(Plan.from_dict(plan_dict()), store, VirtualClock(10_000)).act(
        Action.PAUSE, actor="carol", reason="again")
    last = store.audit_events(NAME)[-1]
    store.close()
    del last.detail["key_id"]
    last.hash = last.legacy_hash()
    case.sql("UPDATE audit SET detail = ?, hash = ? WHERE seq = ?", json.dumps(last.detail),
             last.hash, last.seq)
    code, out = case.verify("--allow-unkeyed")
    assert code == 1 and f"event {EVENTS + 2}: unkeyed (plain SHA-256) after signed" in out, out


def test_the_memory_store_seals_the_same_way() -> None:
    """The memory store shares the sealing code: same MACs, same checks."""
    store, clock = MemoryStore(), VirtualClock()
    plan = Plan.from_dict(plan_dict())
    ops.create(store, plan, clock)
    controller = Controller(plan, store, clock)
    controller.act(Action.PAUSE, actor="ann", reason="look")
    controller.act(Action.RESUME, actor="ann", reason="done")
    assert ops.verify_audit(store, NAME).code == 0
    assert verify_chain(store.audit_events(NAME)).ok
    state = store.get_state(NAME)
    assert state.audit.seq == 3
    store.audit_events(NAME)[1].detail["reason"] = "paused by nobody"
    report = ops.verify_audit(store, NAME)
    assert report.code == 1 and "event 2: content does not match its MAC" in report.message
