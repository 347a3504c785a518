"""The SQL store: SQLite by default, PostgreSQL by URL, through SQLAlchemy Core.

Counters are added in the database (``INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n``)
so that many gateway replicas can write the same cells. Rollout state changes are
compare-and-set on a version column, so two controllers can never both act on one state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from safeshift.audit import GENESIS, AuditEvent, seal_commit, seal_state
from safeshift.auth import Denial, Role, TokenRecord
from safeshift.errors import (
    ConcurrencyError,
    DamagedStoreError,
    SchemaVersionError,
    StoreError,
    UnknownRolloutError,
)
from safeshift.pseudonym import pseudonymizer
from safeshift.state import (
    Action,
    Decision,
    DecisionInputs,
    FeedbackItem,
    OutboxEntry,
    Phase,
    ReportText,
    RequestRecord,
    RolloutState,
    Snapshot,
)
from safeshift.store.base import SCHEMA_VERSION
from safeshift.telemetry import TelemetryRow


class _PortableString(sa.TypeDecorator[str]):
    """A string column that PostgreSQL can always store: its text types reject NUL characters
    (SQLite keeps them), so on PostgreSQL a NUL becomes U+FFFD, in values and in comparisons
    alike. Without this one request carrying a NUL in its id or a segment value would fail
    every later flush of the batch it sits in."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        return value if value is None else _as_stored(value, dialect)


def _as_stored(value: str, dialect: sa.Dialect) -> str:
    """``value`` as the database keeps it: PostgreSQL text cannot hold NUL."""
    if dialect.name == "postgresql" and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


_OUTPUTS = json.JSONEncoder(default=str)
"""``json.dumps(outputs, default=str)``, the same text: ``dumps`` with an argument builds a new
encoder on every call, and the flush encodes every request's outputs (one a request)."""


class _PortableText(_PortableString):
    impl = sa.Text
    cache_ok = True


def _str(length: int | None = None) -> _PortableString:
    """``VARCHAR(length)``, or ``TEXT`` without a length."""
    return _PortableString(length) if length else _PortableText()


metadata = sa.MetaData()

schema_version = sa.Table("safeshift_schema", metadata, sa.Column("version", sa.Integer, nullable=False))

rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("name", _str(64), primary_key=True),
    sa.Column("plan_json", _str(), nullable=False),
    sa.Column("plan_hash", _str(64), nullable=False),
    sa.Column("phase", _str(32), nullable=False),
    sa.Column("stage_index", sa.Integer, nullable=False),
    sa.Column("stage_started_at", sa.Float, nullable=False),
    sa.Column("pending_stage", sa.Integer),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("reason", _str(), nullable=False),
    sa.Column("extra", _str(), nullable=False),
)

decisions_t = sa.Table(
    "decisions", metadata,
    sa.Column("rollout", _str(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", _str(32), nullable=False),
    sa.Column("from_stage", sa.Integer, nullable=False),
    sa.Column("to_stage", sa.Integer, nullable=False),
    sa.Column("phase", _str(32), nullable=False),
    sa.Column("reason", _str(), nullable=False),
    sa.Column("actor", _str(128), nullable=False),
    sa.Column("evidence", _str(), nullable=False),
)

audit_t = sa.Table(
    "audit", metadata,
    sa.Column("rollout", _str(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", _str(128), nullable=False),
    sa.Column("action", _str(64), nullable=False),
    sa.Column("detail", _str(), nullable=False),
    sa.Column("prev_hash", _str(64), nullable=False),
    sa.Column("hash", _str(64), nullable=False),
)

inputs_t = sa.Table(
    "decision_inputs", metadata,
    sa.Column("rollout", _str(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("body", sa.LargeBinary, nullable=False),  # zlib-compressed JSON
)

snapshots_t = sa.Table(
    "snapshots", metadata,
    sa.Column("rollout", _str(64), primary_key=True),
    sa.Column("at", sa.Float, primary_key=True),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("body", _str(), nullable=False),
    sa.Column("segments", _str(), nullable=False),  # the segment verdicts, read when asked
)

report_texts_t = sa.Table(
    "report_texts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout", _str(64), nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("arm", _str(64), nullable=False),
    sa.Column("kind", _str(32), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("text", _str(), nullable=False),  # redacted (safeshift.redact), never as sent
    sa.Column("redactions", _str(), nullable=False),
    sa.Index("ix_report_texts_rollout", "rollout", "id"),
)

_TELEMETRY_KEY = ("rollout", "stage", "arm", "cohort", "segment", "window", "cluster", "signal")


def _cell_key() -> list[sa.Column[Any]]:
    """The primary-key columns of a telemetry cell's signal (fresh objects for each table)."""
    return [
        sa.Column("rollout", _str(64), primary_key=True),
        sa.Column("stage", sa.Integer, primary_key=True),
        sa.Column("arm", _str(64), primary_key=True),
        sa.Column("cohort", _str(16), primary_key=True),
        sa.Column("segment", _str(512), primary_key=True),
        sa.Column("window", sa.BigInteger, primary_key=True),
        sa.Column("cluster", sa.Integer, primary_key=True),  # the unit's hash bucket, or -1
        sa.Column("signal", _str(128), primary_key=True),
    ]


telemetry = sa.Table(
    "telemetry", metadata, *_cell_key(),
    sa.Column("n", sa.Float, nullable=False),
    sa.Column("s", sa.Float, nullable=False),
    sa.Column("ss", sa.Float, nullable=False),
)

histograms = sa.Table(
    "histograms", metadata, *_cell_key(),
    sa.Column("bucket", sa.Integer, primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)

requests = sa.Table(
    "requests", metadata,
    sa.Column("id", _str(128), primary_key=True),
    sa.Column("rollout", _str(64), nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("arm", _str(64), nullable=False),
    sa.Column("cohort", _str(16), nullable=False),
    sa.Column("segment", _str(512), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("outputs", _str(), nullable=False),
    sa.Column("cluster", sa.Integer, nullable=False, server_default="-1"),
    sa.Column("unit_hash", sa.BigInteger, nullable=False, server_default="-1"),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("request_id", _str(128), primary_key=True),
    sa.Column("signal", _str(128), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

leases = sa.Table(
    "leases", metadata,
    sa.Column("name", _str(128), primary_key=True),
    sa.Column("holder", _str(256), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)


tokens_t = sa.Table(
    "tokens", metadata,
    sa.Column("id", _str(12), primary_key=True),
    sa.Column("name", _str(64), nullable=False),
    sa.Column("role", _str(16), nullable=False),
    sa.Column("secret_sha256", _str(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", _str(128), nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("revoked_at", sa.Float),
    sa.Column("rights", _str(), nullable=False, server_default="{}"),
)

denials_t = sa.Table(
    "denials", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("method", _str(16), nullable=False),
    sa.Column("path", _str(512), nullable=False),
    sa.Column("principal", _str(128), nullable=False),
    sa.Column("peer", _str(128), nullable=False),
    sa.Column("reason", _str(512), nullable=False),
)


outbox_t = sa.Table(
    "outbox", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout", _str(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),  # the decision's
    sa.Column("event", _str(32), nullable=False),
    sa.Column("target", _str(2048), nullable=False),  # the webhook's URL: one queue per target
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("payload", _str(), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
    sa.Column("dead", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_error", _str(), nullable=False, server_default=""),
    sa.Index("ix_outbox_queue", "rollout", "target", "id"),
    sa.Index("ix_outbox_due", "delivered_at", "next_attempt_at"),
    # ids are never reused (receivers deduplicate on them): SQLite's AUTOINCREMENT
    sqlite_autoincrement=True,
)


def _migrate_v1(conn: Connection) -> None:
    metadata.create_all(conn)


def _migrate_v2(conn: Connection) -> None:
    """Unit clusters: telemetry cells gain ``cluster`` in their key and request records their
    unit's cluster. Rows written before are request-level (``-1``). A store created by this
    release already has both (``_migrate_v1`` creates the current tables)."""
    inspector = sa.inspect(conn)
    if "cluster" not in {c["name"] for c in inspector.get_columns("telemetry")}:
        for table in (telemetry, histograms):
            old = [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table.name}")).mappings()]
            table.drop(conn)
            table.create(conn)
            if old:
                conn.execute(table.insert(), [{**r, "cluster": -1} for r in old])
    if "cluster" not in {c["name"] for c in inspector.get_columns("requests")}:
        conn.execute(sa.text("ALTER TABLE requests ADD COLUMN cluster INTEGER NOT NULL DEFAULT -1"))


def _migrate_v3(conn: Connection) -> None:
    """Access control: the token records and the log of refused requests (new tables only)."""
    for table in (tokens_t, denials_t):
        table.create(conn, checkfirst=True)


def _migrate_v4(conn: Connection) -> None:
    """Notifications: the outbox of webhook deliveries (a new table only)."""
    outbox_t.create(conn, checkfirst=True)


def _migrate_v5(conn: Connection) -> None:
    """Reports count once per unit: request records gain their unit's hash (``-1`` for the
    records written before, whose reports still count once per request)."""
    if "unit_hash" not in {c["name"] for c in sa.inspect(conn).get_columns("requests")}:
        conn.execute(sa.text("ALTER TABLE requests ADD COLUMN unit_hash BIGINT NOT NULL "
                             "DEFAULT -1"))


def _migrate_v6(conn: Connection) -> None:
    """Explanations and the dashboard: what each decision was computed from, verdict
    snapshots over time, and the redacted text of user reports (new tables only)."""
    for table in (inputs_t, snapshots_t, report_texts_t):
        table.create(conn, checkfirst=True)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_v1, 2: _migrate_v2,
                                                       3: _migrate_v3, 4: _migrate_v4,
                                                       5: _migrate_v5, 6: _migrate_v6}
"""Schema version → the step that brings the previous version to it."""


_SQLITE_BUSY_SECONDS = 30.0
"""How long an SQLite write waits for another process's write lock before it fails."""


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class SQLStore:
    """A store on any SQLAlchemy URL; ``sqlite:///path.db`` or ``postgresql+psycopg://...``."""

    def __init__(self, url: str, *, migrate: bool = True, read_only: bool = False) -> None:
        """``read_only`` (SQLite): connections that cannot write, so a store on a read-only
        mount can be read (implies ``migrate=False``)."""
        migrate = migrate and not read_only
        self.url = _display_url(url)  # for messages: never the password
        try:
            self.engine: Engine = _engine(url, read_only=read_only)
        except ModuleNotFoundError as exc:
            raise StoreError(
                f"cannot open store {self.url!r}: {exc}; for PostgreSQL install the driver with "
                "pip install 'safeshift[postgres]' and use a postgresql+psycopg:// URL") from None
        except Exception as exc:
            raise StoreError(f"cannot open store {self.url!r}: {_reason(exc)}") from None
        self.dialect = self.engine.dialect.name
        # reads that take several queries see one snapshot (PostgreSQL's default isolation,
        # READ COMMITTED, gives each statement its own; SQLite's read transaction already is one)
        self._snapshot: Engine = (
            self.engine.execution_options(isolation_level="REPEATABLE READ")
            if self.dialect == "postgresql" else self.engine)
        # upserts are built once: constructing them costs more than running them
        stmt = self._insert(telemetry)
        self._telemetry_upsert = stmt.on_conflict_do_update(
            index_elements=list(_TELEMETRY_KEY),
            set_={"n": telemetry.c.n + stmt.excluded.n, "s": telemetry.c.s + stmt.excluded.s,
                  "ss": telemetry.c.ss + stmt.excluded.ss},
        )
        hstmt = self._insert(histograms)
        self._histogram_upsert = hstmt.on_conflict_do_update(
            index_elements=[*_TELEMETRY_KEY, "bucket"],
            set_={"count": histograms.c.count + hstmt.excluded.count},
        )
        # rowcount tells whether the item was new; SQLAlchemy keeps an INSERT's rowcount only
        # when asked to (psycopg reports -1 once the cursor is closed)
        self._feedback_insert = self._insert(feedback).on_conflict_do_nothing(
            index_elements=["request_id", "signal"]).execution_options(preserve_rowcount=True)
        self._requests_insert = self._insert(requests).on_conflict_do_nothing(
            index_elements=["id"])
        # request records are the one write per served request: compiled once and sent to the
        # driver as plain tuples, without SQLAlchemy's per-row parameter processing (2.3x
        # faster on SQLite; the only bind processing the columns have is the NUL rule)
        compiled = self._requests_insert.compile(dialect=self.engine.dialect)
        self._requests_sql = str(compiled)
        self._requests_positional = compiled.positiontup is not None
        if compiled.positiontup not in (None, [c.name for c in requests.columns]):
            raise RuntimeError(f"unexpected parameter order {compiled.positiontup}")
        # telemetry cells are the flush's other write (a row per cell and signal touched in the
        # interval, hundreds a second under load): the same way as request records
        self._telemetry_sql, self._telemetry_positional = self._driver_sql(
            self._telemetry_upsert, telemetry)
        self._histogram_sql, self._histogram_positional = self._driver_sql(
            self._histogram_upsert, histograms)
        try:
            if migrate:
                self.migrate()
            else:
                self._check_version()
        except BaseException:
            self.engine.dispose()  # no pooled connection outlives a store that failed to open
            raise

    # -- schema ---------------------------------------------------------------------

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("safeshift_schema"):
                return 0
            value = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
            return int(value or 0)

    def _check_version(self) -> None:
        """For a store opened without migrating: it must be a safeshift store of this
        release's schema (nothing is created or upgraded)."""
        try:
            have = self.schema_version()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot read store {self.url!r}: {_reason(exc)}") from None
        if have == 0:
            raise StoreError(f"{self.url} is not a safeshift store (no safeshift tables); give "
                             "--store the store a rollout wrote")
        if have > SCHEMA_VERSION:
            raise SchemaVersionError(f"store {self.url!r} has schema version {have}, newer than "
                                     f"this release's {SCHEMA_VERSION}; upgrade safeshift")
        if have < SCHEMA_VERSION:
            raise StoreError(f"store {self.url!r} has schema version {have}, older than this "
                             f"release's {SCHEMA_VERSION}; upgrade it in place with safeshift "
                             "store migrate --store URL (serve does it too), then run this again")

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found before."""
        try:
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
                have = 0
                if sa.inspect(conn).has_table("safeshift_schema"):
                    have = int(conn.execute(sa.select(sa.func.max(schema_version.c.version)))
                               .scalar() or 0)
                if have > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"store {self.url!r} has schema version {have}, newer than this "
                        f"release's {SCHEMA_VERSION}; upgrade safeshift"
                    )
                for version in range(have + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[version](conn)
                    conn.execute(schema_version.delete())
                    conn.execute(schema_version.insert().values(version=version))
                return have
        except (SchemaVersionError, StoreError):
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot prepare store {self.url!r}: {_reason(exc)}") from None

    # -- rollouts -------------------------------------------------------------------

    def create_rollout(self, plan: dict[str, Any], state: RolloutState) -> RolloutState:
        # insert-if-absent in one statement: replicas starting together with the same plan must
        # not fail on the primary key (a SELECT then INSERT races on PostgreSQL)
        state = state.copy()
        seal_state(state, audit_seq=0, audit_head=GENESIS)  # sealed from the start
        with self.engine.begin() as conn:
            result = conn.execute(
                self._insert(rollouts)
                .values(plan_json=json.dumps(plan, sort_keys=True), **_state_values(state))
                .on_conflict_do_nothing(index_elements=["name"])
                .execution_options(preserve_rowcount=True)
            )
            if result.rowcount != 1:
                row = conn.execute(sa.select(rollouts).where(rollouts.c.name == state.name)).one()
                return _state(row)
        return state.copy()

    def get_plan(self, name: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            text = conn.execute(sa.select(rollouts.c.plan_json).where(rollouts.c.name == name)).scalar()
        if text is None:
            raise UnknownRolloutError(f"no rollout named {name!r} in {self.url}")
        with _damaged("stored plan", name):
            result = json.loads(text)
            if not isinstance(result, dict):
                raise ValueError(f"a plan is an object, not {type(result).__name__}")
        return result

    def get_state(self, name: str) -> RolloutState:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(rollouts).where(rollouts.c.name == name)).first()
        if row is None:
            raise UnknownRolloutError(f"no rollout named {name!r} in {self.url}")
        return _state(row)

    def list_states(self) -> list[RolloutState]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(rollouts).order_by(rollouts.c.created_at, rollouts.c.name)).fetchall()
        return [_state(r) for r in rows]

    def commit(self, state: RolloutState, *, expected_version: int,
               decisions: Sequence[Decision] = (), audit: Sequence[AuditEvent] = (),
               outbox: Sequence[OutboxEntry] = (),
               inputs: Sequence[DecisionInputs] = ()) -> RolloutState:
        new = state.copy()
        new.version = expected_version + 1
        with self.engine.begin() as conn:
            # the chain's end, read before the compare-and-set: every commit that appends
            # events also moves the version, so if the update below succeeds this is still
            # the end; the state is sealed over it even when no event is added
            last = conn.execute(
                sa.select(audit_t.c.seq, audit_t.c.hash)
                .where(audit_t.c.rollout == state.name)
                .order_by(audit_t.c.seq.desc()).limit(1)
            ).first()
            seal_commit(new, audit, last_seq=int(last[0]) if last else 0,
                        last_hash=str(last[1]) if last else GENESIS)
            values = _state_values(new)
            values.pop("name")
            result = conn.execute(
                rollouts.update()
                .where(rollouts.c.name == state.name, rollouts.c.version == expected_version)
                .values(**values)
            )
            if result.rowcount != 1:
                raise ConcurrencyError(
                    f"rollout {state.name!r} changed since it was read (expected version "
                    f"{expected_version}); re-read it and try again"
                )
            for d in decisions:
                conn.execute(decisions_t.insert().values(
                    rollout=d.rollout, seq=d.seq, at=d.at, action=str(d.action),
                    from_stage=d.from_stage, to_stage=d.to_stage, phase=str(d.phase),
                    reason=d.reason, actor=d.actor, evidence=json.dumps(d.evidence, default=str)))
            for event in audit:
                conn.execute(audit_t.insert().values(
                    rollout=event.rollout, seq=event.seq, at=event.at, actor=event.actor,
                    action=event.action, detail=json.dumps(event.detail, default=str),
                    prev_hash=event.prev_hash, hash=event.hash))
            for item in inputs:
                conn.execute(inputs_t.insert().values(rollout=item.rollout, seq=item.seq,
                                                      body=item.body))
            for entry in outbox:  # in the decision's transaction: both or neither
                conn.execute(outbox_t.insert().values(
                    rollout=entry.rollout, seq=entry.seq, event=entry.event, target=entry.target,
                    created_at=entry.created_at,
                    payload=json.dumps(entry.payload, sort_keys=True, default=str), attempts=0,
                    next_attempt_at=entry.created_at, dead=False, last_error=""))
        return new

    # -- telemetry ------------------------------------------------------------------

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def _driver_sql(self, statement: Any, table: sa.Table) -> tuple[str, bool]:
        """``statement`` compiled for the driver, and whether it takes positional parameters
        (then in ``table``'s column order, else by column name)."""
        compiled = statement.compile(dialect=self.engine.dialect)
        names = [c.name for c in table.columns]
        if compiled.positiontup not in (None, names):
            raise RuntimeError(f"unexpected parameter order {compiled.positiontup}")
        return str(compiled), compiled.positiontup is not None

    def _add_telemetry(self, conn: Connection, rows: Sequence[TelemetryRow]) -> None:
        if not rows:
            return
        merged: dict[tuple[Any, ...], list[float]] = {}
        hists: dict[tuple[Any, ...], int] = {}
        for r in rows:
            key = (r.rollout, r.stage, r.arm, r.cohort, r.segment, r.window, r.cluster, r.signal)
            acc = merged.setdefault(key, [0.0, 0.0, 0.0])
            acc[0] += r.n
            acc[1] += r.s
            acc[2] += r.ss
            for b, c in (r.hist or {}).items():
                hists[(*key, int(b))] = hists.get((*key, int(b)), 0) + int(c)
        # sorted: concurrent writers lock rows in one order, so they cannot deadlock. Sent to
        # the driver as plain tuples in the tables' column order (the key, then n, s, ss or
        # bucket, count); the only bind processing the columns have is the NUL rule
        dialect = self.engine.dialect
        params: list[Any] = [
            (_as_stored(k[0], dialect), k[1], _as_stored(k[2], dialect),
             _as_stored(k[3], dialect), _as_stored(k[4], dialect), k[5], k[6],
             _as_stored(k[7], dialect), v[0], v[1], v[2])
            for k, v in sorted(merged.items())]
        if not self._telemetry_positional:
            names = [c.name for c in telemetry.columns]
            params = [dict(zip(names, row, strict=True)) for row in params]
        conn.exec_driver_sql(self._telemetry_sql, params)
        if hists:
            hparams: list[Any] = [
                (_as_stored(k[0], dialect), k[1], _as_stored(k[2], dialect),
                 _as_stored(k[3], dialect), _as_stored(k[4], dialect), k[5], k[6],
                 _as_stored(k[7], dialect), k[8], c)
                for k, c in sorted(hists.items())]
            if not self._histogram_positional:
                names = [c.name for c in histograms.columns]
                hparams = [dict(zip(names, row, strict=True)) for row in hparams]
            conn.exec_driver_sql(self._histogram_sql, hparams)

    def add_telemetry(self, rows: Sequence[TelemetryRow]) -> None:
        with self.engine.begin() as conn:
            self._add_telemetry(conn, rows)

    def telemetry(self, rollout: str, stage: int | None = None) -> list[TelemetryRow]:
        where = [telemetry.c.rollout == rollout]
        hwhere = [histograms.c.rollout == rollout]
        if stage is not None:
            where.append(telemetry.c.stage == stage)
            hwhere.append(histograms.c.stage == stage)
        with self._snapshot.connect() as conn:
            rows = conn.execute(sa.select(telemetry).where(*where)
                                .order_by(*telemetry.primary_key.columns)).fetchall()
            hrows = conn.execute(sa.select(histograms).where(*hwhere)).fetchall()
        hist: dict[tuple[Any, ...], dict[int, int]] = {}
        for h in hrows:
            key = tuple(getattr(h, k) for k in _TELEMETRY_KEY)
            hist.setdefault(key, {})[int(h.bucket)] = int(h._mapping["count"])
        out = []
        for r in rows:
            key = tuple(getattr(r, k) for k in _TELEMETRY_KEY)
            out.append(TelemetryRow(r.rollout, r.stage, r.arm, r.cohort, r.segment, int(r.window),
                                    r.signal, r.n, r.s, r.ss, hist.get(key), int(r.cluster)))
        return out

    def telemetry_totals(self, rollout: str, stage: int) -> list[TelemetryRow]:
        key = (telemetry.c.arm, telemetry.c.cohort, telemetry.c.segment, telemetry.c.cluster,
               telemetry.c.signal)
        hkey = (histograms.c.arm, histograms.c.cohort, histograms.c.segment, histograms.c.cluster,
                histograms.c.signal, histograms.c.bucket)
        with self._snapshot.connect() as conn:
            rows = conn.execute(
                sa.select(*key, sa.func.sum(telemetry.c.n), sa.func.sum(telemetry.c.s),
                          sa.func.sum(telemetry.c.ss))
                .where(telemetry.c.rollout == rollout, telemetry.c.stage == stage)
                .group_by(*key).order_by(*key)).fetchall()
            hrows = conn.execute(
                sa.select(*hkey, sa.func.sum(histograms.c["count"]))
                .where(histograms.c.rollout == rollout, histograms.c.stage == stage)
                .group_by(*hkey)).fetchall()
        hist: dict[tuple[Any, ...], dict[int, int]] = {}
        for arm, cohort, segment, cluster, signal, bucket, count in hrows:
            hist.setdefault((arm, cohort, segment, cluster, signal), {})[int(bucket)] = int(count)
        return [TelemetryRow(rollout, stage, arm, cohort, segment, 0, signal, float(n), float(s),
                             float(ss), hist.get((arm, cohort, segment, cluster, signal)),
                             int(cluster))
                for arm, cohort, segment, cluster, signal, n, s, ss in rows]

    # -- requests and feedback --------------------------------------------------------

    def put_requests(self, records: Sequence[RequestRecord]) -> None:
        if not records:
            return
        dialect = self.engine.dialect
        key = pseudonymizer().request_key
        params: list[Any] = [  # in the table's column order; the id's HMAC, not the id
            (key(r.id), r.rollout, r.stage, r.arm, r.cohort,
             _as_stored(r.segment, dialect), r.created_at, r.expires_at,
             _OUTPUTS.encode(r.outputs), r.cluster, r.unit_hash) for r in records]
        if not self._requests_positional:
            names = [c.name for c in requests.columns]
            params = [dict(zip(names, row, strict=True)) for row in params]
        with self.engine.begin() as conn:
            conn.exec_driver_sql(self._requests_sql, params)

    def get_request(self, request_id: str) -> RequestRecord | None:
        return self.get_requests([request_id]).get(request_id)

    def get_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        out: dict[str, RequestRecord] = {}
        key = pseudonymizer().request_key
        # the ids' HMACs back to the ids asked for; records written before ids were hashed
        # (schema 6) keep their id as sent, and are found by it until they expire
        asked = {key(i): i for i in dict.fromkeys(request_ids)}
        asked.update({_as_stored(i, self.engine.dialect): i for i in dict.fromkeys(request_ids)})
        ids = list(asked)
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for r in conn.execute(sa.select(requests).where(requests.c.id.in_(chunk))):
                    rid = asked.get(r.id, r.id)
                    out[rid] = RequestRecord(rid, r.rollout, r.stage, r.arm, r.cohort, r.segment,
                                             r.created_at, r.expires_at, json.loads(r.outputs),
                                             r.cluster, r.unit_hash)
        return out

    def add_feedback(self, items: Sequence[FeedbackItem]) -> list[bool]:
        if not items:
            return []
        out = [False] * len(items)
        rows: list[TelemetryRow] = []
        key = pseudonymizer().request_key
        # inserted in key order, so that two concurrent batches lock rows in the same order
        keys = [key(item.request_id) for item in items]
        order = sorted(range(len(items)), key=lambda i: (keys[i], items[i].signal))
        with self.engine.begin() as conn:
            for i in order:
                item = items[i]
                result = conn.execute(self._feedback_insert, {
                    "request_id": keys[i], "signal": item.signal,
                    "value": item.value, "at": item.at})
                out[i] = result.rowcount == 1
                if out[i]:
                    rows.extend(item.rows)
            self._add_telemetry(conn, rows)
        return out

    def feedback_values(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        key = pseudonymizer().request_key
        with self.engine.connect() as conn:
            for rid, signal in keys:
                value = conn.execute(sa.select(feedback.c.value).where(
                    feedback.c.request_id == key(rid), feedback.c.signal == signal)).scalar()
                if value is not None:
                    out[(rid, signal)] = float(value)
        return out

    # -- records ---------------------------------------------------------------------

    def decisions(self, rollout: str) -> list[Decision]:
        t = decisions_t
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.rollout == rollout).order_by(t.c.seq)).fetchall()
        with _damaged("decisions", rollout):
            return [Decision(r.rollout, r.seq, r.at, Action(r.action), r.from_stage, r.to_stage,
                             Phase(r.phase), r.reason, r.actor, json.loads(r.evidence))
                    for r in rows]

    def decision_inputs(self, rollout: str, seq: int) -> bytes | None:
        t = inputs_t
        with self.engine.connect() as conn:
            body = conn.execute(sa.select(t.c.body).where(t.c.rollout == rollout,
                                                          t.c.seq == seq)).scalar()
        return None if body is None else bytes(body)

    def put_snapshot(self, snapshot: Snapshot) -> None:
        t = snapshots_t
        body = dict(snapshot.body)
        segments = body.pop("segments", [])
        values = {"rollout": snapshot.rollout, "at": snapshot.at, "stage": snapshot.stage,
                  "body": orjson.dumps(body).decode(), "segments": orjson.dumps(segments).decode()}
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.rollout == snapshot.rollout, t.c.at == snapshot.at))
            conn.execute(t.insert().values(**values))

    def snapshots(self, rollout: str, *, since: float | None = None,
                  segments: bool = False) -> list[Snapshot]:
        t = snapshots_t
        columns = [t.c.rollout, t.c.stage, t.c.at, t.c.body] + ([t.c.segments] if segments else [])
        query = sa.select(*columns).where(t.c.rollout == rollout)
        if since is not None:
            query = query.where(t.c.at >= since)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.c.at)).fetchall()
        with _damaged("snapshots", rollout):
            # a day of them is megabytes of JSON: orjson reads it several times faster
            out = [Snapshot(r.rollout, r.stage, r.at, orjson.loads(r.body)) for r in rows]
            if segments:
                for snap, r in zip(out, rows, strict=True):
                    snap.body["segments"] = orjson.loads(r.segments)
            return out

    def add_report_text(self, report: ReportText) -> None:
        with self.engine.begin() as conn:
            conn.execute(report_texts_t.insert().values(
                rollout=report.rollout, stage=report.stage, arm=report.arm, kind=report.kind,
                at=report.at, text=_as_stored(report.text, self.engine.dialect),
                redactions=json.dumps(report.redactions, sort_keys=True)))

    def report_texts(self, rollout: str, *, limit: int = 50) -> list[ReportText]:
        t = report_texts_t
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.rollout == rollout)
                                .order_by(t.c.id.desc()).limit(limit)).fetchall()
        with _damaged("report texts", rollout):
            return [ReportText(r.rollout, r.stage, r.arm, r.kind, r.at, r.text,
                               json.loads(r.redactions)) for r in rows]

    def last_snapshot_at(self, rollout: str) -> float | None:
        t = snapshots_t
        with self.engine.connect() as conn:
            at = conn.execute(sa.select(sa.func.max(t.c.at)).where(t.c.rollout == rollout)).scalar()
        return None if at is None else float(at)

    def audit_events(self, rollout: str) -> list[AuditEvent]:
        t = audit_t
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.rollout == rollout).order_by(t.c.seq)).fetchall()
        with _damaged("audit events", rollout):
            return [AuditEvent(r.rollout, r.seq, r.at, r.actor, r.action, json.loads(r.detail),
                               r.prev_hash, r.hash) for r in rows]

    def purge_expired(self, now: float) -> int:
        with self.engine.begin() as conn:
            expired = sa.select(requests.c.id).where(requests.c.expires_at <= now)
            conn.execute(feedback.delete().where(feedback.c.request_id.in_(expired)))
            result = conn.execute(requests.delete().where(requests.c.expires_at <= now))
            return int(result.rowcount or 0)

    def inventory(self, rollout: str) -> dict[str, dict[str, float | None]]:
        kinds: list[tuple[str, sa.Table, Any, Any]] = [
            ("requests", requests, requests.c.created_at, requests.c.rollout == rollout),
            ("labels", feedback, feedback.c.at, feedback.c.request_id.in_(
                sa.select(requests.c.id).where(requests.c.rollout == rollout))),
            ("reports", report_texts_t, report_texts_t.c.at, report_texts_t.c.rollout == rollout),
            ("telemetry", telemetry, telemetry.c["window"], telemetry.c.rollout == rollout),
            ("snapshots", snapshots_t, snapshots_t.c.at, snapshots_t.c.rollout == rollout),
            ("decisions", decisions_t, decisions_t.c.at, decisions_t.c.rollout == rollout),
            ("audit", audit_t, audit_t.c.at, audit_t.c.rollout == rollout),
        ]
        out: dict[str, dict[str, float | None]] = {}
        with self.engine.connect() as conn:
            for kind, table, at, where in kinds:
                n, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(at))
                                         .select_from(table).where(where)).one()
                out[kind] = {"count": float(n or 0),
                             "oldest": None if oldest is None else float(oldest)}
        return out

    def purge_before(self, rollout: str, kind: str, cutoff: float, *,
                     stages_before: int | None = None, dry_run: bool = False) -> int:
        def run(conn: Connection, table: sa.Table, *conds: Any) -> int:
            if dry_run:
                return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                                        .where(*conds)).scalar() or 0)
            return int(conn.execute(table.delete().where(*conds)).rowcount or 0)

        with self.engine.begin() as conn:
            if kind == "requests":
                conds = (requests.c.rollout == rollout, requests.c.created_at < cutoff)
                if not dry_run:
                    old = sa.select(requests.c.id).where(*conds)
                    conn.execute(feedback.delete().where(feedback.c.request_id.in_(old)))
                return run(conn, requests, *conds)
            if kind == "reports":
                t = report_texts_t
                return run(conn, t, t.c.rollout == rollout, t.c.at < cutoff)
            if kind == "snapshots":
                t = snapshots_t
                return run(conn, t, t.c.rollout == rollout, t.c.at < cutoff)
            if kind == "telemetry":
                def aged(table: sa.Table) -> list[Any]:
                    conds = [table.c.rollout == rollout, table.c["window"] < cutoff]
                    if stages_before is not None:
                        conds.append(table.c.stage < stages_before)
                    return conds

                n = run(conn, telemetry, *aged(telemetry))
                if not dry_run:
                    conn.execute(histograms.delete().where(*aged(histograms)))
                old_decisions = sa.select(decisions_t.c.seq).where(
                    decisions_t.c.rollout == rollout, decisions_t.c.at < cutoff)
                return n + run(conn, inputs_t, inputs_t.c.rollout == rollout,
                               inputs_t.c.seq.in_(old_decisions))
            raise ValueError(f"unknown record kind {kind!r}")

    def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> bool:
        with self.engine.begin() as conn:
            stmt = self._insert(leases).values(name=name, holder=holder, expires_at=now + ttl)
            stmt = stmt.on_conflict_do_update(
                index_elements=["name"],
                set_={"holder": holder, "expires_at": now + ttl},
                where=sa.or_(leases.c.holder == holder, leases.c.expires_at <= now),
            )
            conn.execute(stmt)
            current = conn.execute(sa.select(leases.c.holder).where(leases.c.name == name)).scalar()
        return bool(current == holder)

    # -- the notification outbox -------------------------------------------------------

    def claim_outbox(self, now: float, *, limit: int, lease: float) -> list[OutboxEntry]:
        head, earlier = outbox_t.alias("head"), outbox_t.alias("earlier")
        before = sa.select(earlier.c.id).where(
            earlier.c.rollout == head.c.rollout, earlier.c.target == head.c.target,
            earlier.c.id < head.c.id, earlier.c.delivered_at.is_(None), earlier.c.dead.is_(False))
        due = (sa.select(head.c.id)
               .where(head.c.delivered_at.is_(None), head.c.dead.is_(False),
                      head.c.next_attempt_at <= now, ~sa.exists(before))
               .order_by(head.c.id).limit(limit))
        if self.dialect == "postgresql":  # replicas claiming at once take different rows
            due = due.with_for_update(skip_locked=True, of=head)
        # one UPDATE ... RETURNING: on SQLite it takes the write lock before it reads, so two
        # processes cannot both claim a row
        with self.engine.begin() as conn:
            rows = conn.execute(outbox_t.update()
                                .where(outbox_t.c.id.in_(due.scalar_subquery()))
                                .values(next_attempt_at=now + lease)
                                .returning(*outbox_t.c)).fetchall()
        return sorted((_outbox_entry(r) for r in rows), key=lambda e: e.id)

    def settle_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        if not entries:
            return
        with self.engine.begin() as conn:
            for e in sorted(entries, key=lambda e: e.id):
                conn.execute(outbox_t.update().where(outbox_t.c.id == e.id).values(
                    attempts=e.attempts, next_attempt_at=e.next_attempt_at,
                    delivered_at=e.delivered_at, dead=e.dead, last_error=e.last_error[:2000]))

    def outbox(self, *, rollout: str | None = None, status: str | None = None,
               limit: int = 100) -> list[OutboxEntry]:
        t = outbox_t
        where: list[Any] = [] if rollout is None else [t.c.rollout == rollout]
        if status == "delivered":
            where.append(t.c.delivered_at.is_not(None))
        elif status == "dead":
            where += [t.c.delivered_at.is_(None), t.c.dead.is_(True)]
        elif status == "pending":
            where += [t.c.delivered_at.is_(None), t.c.dead.is_(False)]
        elif status is not None:
            raise ValueError(f"unknown outbox status {status!r}; use pending, delivered or dead")
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(*where).order_by(t.c.id.desc())
                                .limit(limit)).fetchall()
        return [_outbox_entry(r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        t = outbox_t
        undelivered = t.c.delivered_at.is_(None)

        def count(*cond: Any) -> Any:
            return sa.func.coalesce(sa.func.sum(sa.case((sa.and_(*cond), 1), else_=0)), 0)

        with self.engine.connect() as conn:
            pending, delivered, dead = conn.execute(sa.select(
                count(undelivered, t.c.dead.is_(False)), count(t.c.delivered_at.is_not(None)),
                count(undelivered, t.c.dead.is_(True)))).one()
        return {"pending": int(pending), "delivered": int(delivered), "dead": int(dead)}

    def requeue_dead(self, now: float, *, rollout: str | None = None) -> int:
        t = outbox_t
        where: list[Any] = [t.c.delivered_at.is_(None), t.c.dead.is_(True)]
        if rollout is not None:
            where.append(t.c.rollout == rollout)
        with self.engine.begin() as conn:
            result = conn.execute(t.update().where(*where)
                                  .values(dead=False, attempts=0, next_attempt_at=now))
            return int(result.rowcount or 0)

    # -- access ---------------------------------------------------------------------

    def put_token(self, record: TokenRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(tokens_t.insert().values(
                id=record.id, name=record.name, role=str(record.role),
                secret_sha256=record.secret_sha256, created_at=record.created_at,
                created_by=record.created_by, expires_at=record.expires_at,
                revoked_at=record.revoked_at, rights=json.dumps(record.rights, sort_keys=True)))

    def get_token(self, token_id: str) -> TokenRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(tokens_t).where(tokens_t.c.id == token_id)).first()
        return None if row is None else _token(row)

    def list_tokens(self) -> list[TokenRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(tokens_t).order_by(tokens_t.c.created_at,
                                                             tokens_t.c.id)).fetchall()
        return [_token(r) for r in rows]

    def revoke_token(self, token_id: str, at: float) -> TokenRecord | None:
        with self.engine.begin() as conn:
            conn.execute(tokens_t.update().where(tokens_t.c.id == token_id,
                                                 tokens_t.c.revoked_at.is_(None))
                         .values(revoked_at=at))
            row = conn.execute(sa.select(tokens_t).where(tokens_t.c.id == token_id)).first()
        return None if row is None else _token(row)

    def add_denials(self, denials: Sequence[Denial]) -> None:
        if not denials:
            return
        with self.engine.begin() as conn:
            conn.execute(denials_t.insert(), [
                {"at": d.at, "status": d.status, "method": d.method[:16], "path": d.path[:512],
                 "principal": d.principal[:128], "peer": d.peer[:128], "reason": d.reason[:512]}
                for d in denials])

    def denials(self, limit: int = 100) -> list[Denial]:
        t = denials_t
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.at.desc(), t.c.id.desc())
                                .limit(limit)).fetchall()
        return [Denial(r.at, r.status, r.method, r.path, r.principal, r.peer, r.reason)
                for r in rows]

    def close(self) -> None:
        self.engine.dispose()


def _reason(exc: BaseException) -> str:
    """What went wrong, in the driver's words: the first line of the DBAPI error, without
    SQLAlchemy's statement dump and its documentation link; a locked SQLite file says why."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    text = text.split("\n", 1)[0]
    text = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", text).strip()
    if "database is locked" in text:
        text += (f"; another process held a write lock on this SQLite file for "
                 f"{_SQLITE_BUSY_SECONDS:g} s (a running gateway or controller writes to it): "
                 "try again, or use PostgreSQL for several writers")
    return text


def _unreachable_as_store_error(method: Callable[..., Any]) -> Callable[..., Any]:
    """A lost connection, a server that went away or a locked database becomes a
    :class:`StoreError` naming the store, which callers (the CLI, the gateway) report plainly;
    programming errors (integrity, syntax) stay what they are."""
    @functools.wraps(method)
    def wrapper(self: SQLStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreError(f"store {self.url} failed: {_reason(exc)}") from exc
    return wrapper


for _name, _method in list(vars(SQLStore).items()):  # every public operation on the database
    if not _name.startswith("_") and _name != "close" and callable(_method):
        setattr(SQLStore, _name, _unreachable_as_store_error(_method))


def _display_url(url: str) -> str:
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def _create_private(path: Path) -> None:
    """Create an SQLite store file readable and writable by its owner only (0600): it holds
    decisions, request records and the audit log. SQLite gives its -wal and -shm files the
    same mode. An existing file keeps its mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _read_only_sqlite(path: str) -> Callable[[], Any]:
    """Connections that only read ``path``: ``mode=ro``, and ``immutable=1`` when its folder
    cannot be written (a read-only mount: SQLite could not even create its shared-memory file
    there, and nobody can be writing the store meanwhile)."""
    import sqlite3
    from urllib.parse import quote

    folder = Path(path).resolve().parent
    writable = os.access(folder, os.W_OK) and os.access(path, os.W_OK)
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro" + ("" if writable else "&immutable=1")

    def connect() -> Any:
        return sqlite3.connect(uri, uri=True, timeout=_SQLITE_BUSY_SECONDS,
                               check_same_thread=False)

    return connect


def _engine(url: str, *, read_only: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        plain = bool(path) and path != ":memory:" and not path.startswith("file:")
        if plain and read_only:
            if not Path(path).exists():
                raise StoreError(f"no store at {path}; give --store the path a rollout wrote")
            engine = sa.create_engine("sqlite://", creator=_read_only_sqlite(path))
        else:
            if plain:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                _create_private(Path(path))
            engine = sa.create_engine(url, connect_args={"timeout": _SQLITE_BUSY_SECONDS,
                                                         "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if not read_only:  # the journal mode is the writers' to set
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_SECONDS * 1000)}")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _state_values(state: RolloutState) -> dict[str, Any]:
    return {
        "name": state.name, "plan_hash": state.plan_hash, "phase": str(state.phase),
        "stage_index": state.stage_index, "stage_started_at": state.stage_started_at,
        "pending_stage": state.pending_stage, "version": state.version,
        "created_at": state.created_at, "updated_at": state.updated_at, "reason": state.reason,
        "extra": json.dumps(state.extra_json(), default=str),
    }


@contextlib.contextmanager
def _damaged(what: str, rollout: str) -> Iterator[None]:
    """Turn a value the store cannot have written (unreadable JSON, an unknown phase) into a
    :class:`DamagedStoreError` naming the rollout, instead of a traceback."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise DamagedStoreError(
            f"the {what} of rollout {rollout!r} in the store cannot be read ({exc}): the store "
            "was changed by something other than safeshift, or by a newer release; restore it "
            "from a backup") from None


def _outbox_entry(row: Any) -> OutboxEntry:
    with _damaged("outbox entry", row.rollout):
        payload = json.loads(row.payload)
        if not isinstance(payload, dict):
            raise ValueError(f"a payload is an object, not {type(payload).__name__}")
        return OutboxEntry(row.rollout, int(row.seq), row.event, row.target, payload,
                           float(row.created_at), int(row.id), int(row.attempts),
                           float(row.next_attempt_at), row.delivered_at, bool(row.dead),
                           row.last_error)


def _token(row: Any) -> TokenRecord:
    try:
        return TokenRecord(row.id, row.name, Role(row.role), row.secret_sha256, row.created_at,
                           row.created_by, row.expires_at, row.revoked_at, json.loads(row.rights))
    except (ValueError, TypeError) as exc:
        raise DamagedStoreError(f"token {row.id} in the store cannot be read ({exc}); revoke it "
                                "and create a new one") from None


def _state(row: Any) -> RolloutState:
    with _damaged("state", row.name):
        return RolloutState.from_row(
            name=row.name, plan_hash=row.plan_hash, phase=Phase(row.phase),
            stage_index=row.stage_index, stage_started_at=row.stage_started_at,
            pending_stage=row.pending_stage, version=row.version, created_at=row.created_at,
            updated_at=row.updated_at, reason=row.reason, extra=json.loads(row.extra),
        )
