"""Shared fixtures: plans, virtual clocks and stores (memory, SQLite and a real PostgreSQL)."""

from __future__ import annotations

import copy
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from safeshift import MemoryStore, Plan, VirtualClock
from safeshift.bench._postgres import Cluster, PostgresUnavailable
from safeshift.store import SQLStore, Store, sqlite_url

ROOT = Path(__file__).resolve().parent.parent

BASE_PLAN: dict[str, Any] = {
    "rollout": "test-rollout",
    "endpoint": "score",
    "baseline": {"version": "v1", "model": "fake:base?output=1"},
    "candidate": {"version": "v2", "model": "fake:cand?output=1"},
    "change": {"summary": "a test change", "owner": "tests"},
    "unit": "user_id",
    "segments": ["country"],
    "stages": [
        {"name": "canary", "traffic": "10%", "min_duration": "5m", "min_samples": 300},
        {"name": "half", "traffic": "50%", "min_duration": "5m", "min_samples": 300},
        {"name": "full", "traffic": "100%"},
    ],
    "guardrails": [{"metric": "error_rate", "tolerance": 0.02}],
    "analysis": {"alpha": 0.05, "expected_samples": 1000},
}


def plan_dict(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE_PLAN)
    data.update(changes)
    return data


TEST_AUDIT_KEY = "safeshift-tests-audit-key-0123456789abcdef"
"""The audit key every test signs with (subprocesses inherit it through the environment)."""


@pytest.fixture(autouse=True)
def _audit_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fixed audit key of the tests' own: no test reads, nor creates, the developer's
    ~/.config/safeshift/audit.key. Tests of the key's resolution change the variables and
    call :func:`~safeshift.audit.reset_audit_key`."""
    from safeshift.audit import KEY_ENV, KEY_FILE_ENV, reset_audit_key

    monkeypatch.setenv(KEY_ENV, TEST_AUDIT_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    reset_audit_key()
    yield
    reset_audit_key()


@pytest.fixture
def plan() -> Plan:
    return Plan.from_dict(plan_dict())


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


# -- PostgreSQL ----------------------------------------------------------------------------

POSTGRES_URL_ENV = "SAFESHIFT_TEST_POSTGRES_URL"
"""When set (e.g. ``postgresql+psycopg://user:pass@host:5432/db``, a role that may CREATE
DATABASE), the tests use that server instead of starting a throwaway cluster (see
:mod:`safeshift.bench._postgres`, which ``safeshift bench replicas`` uses too)."""


def _cluster() -> Cluster:
    """A new (not yet started) cluster, or the test fails naming the package to install."""
    try:
        return Cluster()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture
def postgres_cluster() -> Iterator[Cluster]:
    """A cluster of the test's own, for tests that stop and restart the server."""
    cluster = _cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the session: ``$SAFESHIFT_TEST_POSTGRES_URL``, or a throwaway
    cluster on a free loopback port, stopped and deleted at the end. Never skipped."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        yield url
        return
    cluster = _cluster()
    try:
        try:
            cluster.start()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            pytest.fail(f"cannot start a throwaway PostgreSQL cluster: {exc}")
        yield cluster.url
    finally:
        cluster.stop()


def _drop_database(admin: sa.Engine, name: str) -> None:
    """Drop a test's database. FORCE ends the test's own leftover sessions, but not an
    autovacuum worker that happens to be on the database (a superuser's process: "must be a
    member of pg_signal_backend"), so a refusal is retried for a few seconds; a database left
    behind in the throwaway cluster harms nothing and fails no test."""
    for attempt in range(20):
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except sa.exc.DBAPIError:
            if attempt == 19:
                return
            time.sleep(0.25)


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    base = sa.engine.make_url(postgres_url)
    name = f"safeshift_test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
        _drop_database(admin, name)
    finally:
        admin.dispose()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SQLStore(sqlite_url(tmp_path / "store.db"))
    else:
        s = SQLStore(request.getfixturevalue("postgres_db_url"))
    yield s
    s.close()
