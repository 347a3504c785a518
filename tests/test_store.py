from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from tests.conftest import plan_dict

import safeshift.store.sql as sql
from safeshift import ConcurrencyError, Plan, UnknownRolloutError, VirtualClock, ops
from safeshift.audit import AuditEvent, verify_chain
from safeshift.errors import SchemaVersionError, StoreError
from safeshift.state import (
    Action,
    Decision,
    FeedbackItem,
    Phase,
    RequestRecord,
    RolloutState,
)
from safeshift.store import SCHEMA_VERSION, SQLStore, Store, open_store, sqlite_url
from safeshift.telemetry import TelemetryRow


def _state(name: str = "r1") -> RolloutState:
    return RolloutState(name=name, plan_hash="h1", created_at=1.0, updated_at=1.0)


def test_create_is_idempotent_and_keeps_first_plan(store: Store) -> None:
    created = store.create_rollout({"rollout": "r1"}, _state())
    again = store.create_rollout({"rollout": "other"}, _state())
    assert created.version == again.version == 0
    assert store.get_plan("r1") == {"rollout": "r1"}
    with pytest.raises(UnknownRolloutError):
        store.get_state("nope")


def test_commit_is_compare_and_set(store: Store) -> None:
    s = store.create_rollout({}, _state())
    s.phase = Phase.RUNNING
    d = Decision("r1", 1, 2.0, Action.START, -1, 0, Phase.RUNNING, "go")
    new = store.commit(s, expected_version=0, decisions=[d],
                       audit=[AuditEvent("r1", 0, 2.0, "tester", "start", {"x": 1})])
    assert new.version == 1 and store.get_state("r1").phase is Phase.RUNNING
    with pytest.raises(ConcurrencyError):
        store.commit(s, expected_version=0)
    assert [x.action for x in store.decisions("r1")] == [Action.START]


def test_audit_chain_links_and_detects_tampering(store: Store) -> None:
    s = store.create_rollout({}, _state())
    for i in range(3):
        s = store.commit(s, expected_version=s.version,
                         audit=[AuditEvent("r1", 0, float(i), "a", "act", {"i": i})])
    events = store.audit_events("r1")
    assert [e.seq for e in events] == [1, 2, 3]
    assert verify_chain(events)[0]
    events[1].detail["i"] = 99
    ok, message = verify_chain(events)
    assert not ok and "event 2" in message


def _row(signal: str, n: float, s: float, hist: dict[int, int] | None = None) -> TelemetryRow:
    return TelemetryRow("r1", 0, "candidate", "hash", "country=BR", 60, signal, n, s, s, hist)


def test_telemetry_adds_up(store: Store) -> None:
    store.add_telemetry([_row("error_rate", 10, 1, {5: 2}), _row("error_rate", 5, 2, {5: 1, 6: 1})])
    store.add_telemetry([_row("error_rate", 1, 1)])
    rows = store.telemetry("r1", 0)
    assert len(rows) == 1
    assert (rows[0].n, rows[0].s) == (16, 4)
    assert rows[0].hist == {5: 3, 6: 1}
    assert store.telemetry("r1", 1) == []


def test_feedback_is_recorded_once(store: Store) -> None:
    rec = RequestRecord("req-1", "r1", 0, "candidate", "hash", "", 0.0, 100.0, {"candidate": [1]})
    store.put_requests([rec])
    assert store.get_request("req-1") == rec
    assert store.get_requests(["req-1", "nope"]) == {"req-1": rec}
    item = FeedbackItem("req-1", "accuracy", 1.0, 5.0, [_row("accuracy", 1, 1)])
    assert store.add_feedback([item]) == [True]
    assert store.add_feedback([item, FeedbackItem("req-1", "other", 1.0, 6.0, [])]) == [False, True]
    assert [r.n for r in store.telemetry("r1") if r.signal == "accuracy"] == [1]
    assert store.purge_expired(now=100.0) == 1
    assert store.get_request("req-1") is None


def test_leases(store: Store) -> None:
    assert store.acquire_lease("controller", "a", ttl=10, now=0)
    assert not store.acquire_lease("controller", "b", ttl=10, now=5)
    assert store.acquire_lease("controller", "a", ttl=10, now=5)
    assert store.acquire_lease("controller", "b", ttl=10, now=16)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_schema_is_versioned(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = (sqlite_url(tmp_path / "s.db") if backend == "sqlite"
           else str(request.getfixturevalue("postgres_db_url")))
    store = SQLStore(url)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION  # nothing to do the second time
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE safeshift_schema SET version = 99")
    with pytest.raises(SchemaVersionError, match="upgrade safeshift"):
        SQLStore(url)
    store.close()


def test_values_round_trip_exactly(store: Store) -> None:
    """Timestamps keep sub-microsecond precision, windows and counts past 32 bits survive."""
    at = 1_754_000_000.123456
    s = store.create_rollout({"k": [1.5, None, "é"]},
                             RolloutState(name="r1", plan_hash="h1", created_at=at, updated_at=at,
                                          stage_started_at=at,
                                          unknown_extra={"big": 2**53}))
    got = store.get_state("r1")
    assert (got.created_at, got.stage_started_at, got.unknown_extra) == (at, at, {"big": 2**53})
    assert store.get_plan("r1") == {"k": [1.5, None, "é"]}
    store.commit(s, expected_version=0,
                 decisions=[Decision("r1", 1, at, Action.START, -1, 0, Phase.RUNNING, "go",
                                     evidence={"p": 0.1 + 0.2})])
    assert store.decisions("r1")[0].at == at
    assert store.decisions("r1")[0].evidence == {"p": 0.1 + 0.2}
    window, count = 2**40, 2**40 + 1
    store.add_telemetry([TelemetryRow("r1", 0, "candidate", "hash", "", window, "latency_ms",
                                      0.1, 0.2, 0.3, {-3: count})])
    store.add_telemetry([TelemetryRow("r1", 0, "candidate", "hash", "", window, "latency_ms",
                                      0.2, 0.1, 0.3, {-3: 1})])
    (row,) = store.telemetry("r1")
    assert (row.window, row.n, row.s, row.ss, row.hist) == (window, 0.1 + 0.2, 0.2 + 0.1, 0.6,
                                                             {-3: count + 1})
    (total,) = store.telemetry_totals("r1", 0)
    assert (total.n, total.hist) == (0.1 + 0.2, {-3: count + 1})
    assert isinstance(total.n, float) and isinstance(row.window, int)


def test_text_with_nul_characters_does_not_poison_a_batch(store: Store) -> None:
    """PostgreSQL rejects NUL in text; a client's id or segment value may contain one."""
    rid, segment = "req\x00-1", "country=B\x00R"
    rec = RequestRecord(rid, "r1", 0, "candidate", "hash", segment, 0.0, 100.0, {"x": "a\x00"})
    store.put_requests([rec, RequestRecord("req-2", "r1", 0, "baseline", "hash", "", 0.0, 100.0, {})])
    assert store.get_request("req-2") is not None
    found = store.get_request(rid)
    assert found is not None and found.outputs == {"x": "a\x00"}
    assert set(store.get_requests([rid, "req-2"])) == {rid, "req-2"}  # found under the id asked
    row = TelemetryRow("r1", 0, "candidate", "hash", segment, 60, "requests", 1, 1, 1)
    store.add_telemetry([row, _row("requests", 2, 2)])
    store.add_telemetry([row])
    assert sorted(r.n for r in store.telemetry("r1")) == [2, 2]  # the NUL cell merges with itself
    item = FeedbackItem(rid, "accuracy", 1.0, 5.0, [])
    assert store.add_feedback([item, item]) == [True, False]
    s = store.create_rollout({}, _state())
    s.reason = "operator said \x00"
    store.commit(s, expected_version=0)
    assert store.get_state("r1").version == 1


def test_open_store_urls(tmp_path: Path) -> None:
    assert open_store("memory://").url == "memory://"
    assert open_store(tmp_path / "a.db").url.startswith("sqlite:///")
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("mongodb://x")


class _FailingStore:
    """Wraps a store; telemetry writes fail while ``down`` is set."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def add_telemetry(self, rows: object) -> None:
        if self.down:
            raise StoreError("store unreachable")
        self.inner.add_telemetry(rows)  # type: ignore[arg-type]


def test_flush_keeps_telemetry_when_the_store_write_fails(store: Store, plan: Plan) -> None:
    from safeshift import FakeModel, Rollout, VirtualClock

    flaky = _FailingStore(store)
    rollout = Rollout.from_plan(plan, store=flaky, clock=VirtualClock(),  # type: ignore[arg-type]
                                models={"baseline": FakeModel(), "candidate": FakeModel()})
    for i in range(50):
        rollout.predict({"x": 1}, unit=f"u{i}")
    flaky.down = True
    with pytest.raises(StoreError):
        rollout.flush()
    for i in range(50, 80):
        rollout.predict({"x": 1}, unit=f"u{i}")
    flaky.down = False
    rollout.flush()
    requests = sum(r.n for r in store.telemetry(plan.rollout) if r.signal == "requests")
    assert requests == 80  # nothing lost, nothing counted twice


def test_totals_sum_over_windows(store: Store) -> None:
    rows = [TelemetryRow("r1", 0, "candidate", "hash", "country=BR", w, "latency_ms", 2, 10, 60,
                         {5: 1, 7: 1}) for w in (0, 60, 120)]
    rows.append(TelemetryRow("r1", 1, "candidate", "hash", "country=BR", 0, "latency_ms", 9, 9, 9))
    store.add_telemetry(rows)
    (total,) = store.telemetry_totals("r1", 0)
    assert (total.n, total.s, total.ss, total.window) == (6, 30, 180, 0)
    assert total.hist == {5: 3, 7: 3}
    assert store.telemetry_totals("r1", 2) == []


def test_a_request_id_keeps_its_first_record(store: Store) -> None:
    first = RequestRecord("dup", "r1", 0, "candidate", "hash", "", 0.0, 100.0, {"candidate": [1]})
    second = RequestRecord("dup", "r1", 0, "baseline", "hash", "", 5.0, 100.0, {"baseline": [0]})
    store.put_requests([first])
    store.put_requests([second])  # a client reusing an id must not re-point earlier feedback
    found = store.get_request("dup")
    assert found is not None and found.arm == "candidate" and found.outputs == {"candidate": [1]}


_V1_TABLES = """
CREATE TABLE safeshift_schema (version INTEGER NOT NULL);
INSERT INTO safeshift_schema VALUES (1);
CREATE TABLE telemetry (rollout VARCHAR(64), stage INTEGER, arm VARCHAR(64), cohort VARCHAR(16),
  segment VARCHAR(512), "window" BIGINT, signal VARCHAR(128), n FLOAT NOT NULL, s FLOAT NOT NULL,
  ss FLOAT NOT NULL, PRIMARY KEY (rollout, stage, arm, cohort, segment, "window", signal));
CREATE TABLE histograms (rollout VARCHAR(64), stage INTEGER, arm VARCHAR(64), cohort VARCHAR(16),
  segment VARCHAR(512), "window" BIGINT, signal VARCHAR(128), bucket INTEGER,
  count BIGINT NOT NULL,
  PRIMARY KEY (rollout, stage, arm, cohort, segment, "window", signal, bucket));
CREATE TABLE requests (id VARCHAR(128) PRIMARY KEY, rollout VARCHAR(64) NOT NULL,
  stage INTEGER NOT NULL, arm VARCHAR(64) NOT NULL, cohort VARCHAR(16) NOT NULL,
  segment VARCHAR(512) NOT NULL, created_at FLOAT NOT NULL, expires_at FLOAT NOT NULL,
  outputs TEXT NOT NULL);
INSERT INTO telemetry VALUES ('r1', 0, 'candidate', 'hash', 'country=BR', 60, 'latency_ms', 2, 30, 500);
INSERT INTO histograms VALUES ('r1', 0, 'candidate', 'hash', 'country=BR', 60, 'latency_ms', 7, 2);
INSERT INTO requests VALUES ('q1', 'r1', 0, 'candidate', 'hash', 'country=BR', 1, 99, '{}');
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_store_migrates_and_keeps_its_telemetry(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Telemetry and request records written before unit clusters are kept, as request-level
    rows (cluster -1), and the tables take clustered rows from then on."""
    url = (sqlite_url(tmp_path / "v1.db") if backend == "sqlite"
           else str(request.getfixturevalue("postgres_db_url")))
    engine = sa.create_engine(url)  # a bare engine: SQLStore would check or create the schema
    with engine.begin() as conn:
        for statement in _V1_TABLES.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    engine.dispose()
    store = SQLStore(url)
    assert store.schema_version() == SCHEMA_VERSION
    (row,) = store.telemetry("r1", 0)
    assert (row.cluster, row.n, row.s, row.ss, row.hist) == (-1, 2, 30, 500, {7: 2})
    rec = store.get_request("q1")
    assert rec is not None and rec.cluster == -1 and rec.segment == "country=BR"
    store.add_telemetry([TelemetryRow("r1", 0, "candidate", "hash", "country=BR", 60,
                                      "latency_ms", 1, 10, 100, None, 5)])
    totals = {r.cluster: r.n for r in store.telemetry_totals("r1", 0)}
    assert totals == {-1: 2, 5: 1}
    store.close()


def test_a_locked_sqlite_store_says_why_without_sqlalchemy_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql, "_SQLITE_BUSY_SECONDS", 0.2)
    path = tmp_path / "locked.db"
    store = sql.SQLStore(sql.sqlite_url(path))
    clock = VirtualClock()
    ops.create(store, Plan.from_dict(plan_dict()), clock)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError) as info:
            ops.act(store, "test-rollout", Action.PAUSE, clock, actor="alice", reason="look")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    message = str(info.value)
    assert "database is locked; another process held a write lock" in message
    assert "for 0.2 s" in message and "sqlalche.me" not in message and "\n" not in message
    store.close()
