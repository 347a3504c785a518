"""Shared fixtures: plans, virtual clocks and stores (memory, SQLite and a real PostgreSQL)."""

from __future__ import annotations

import copy
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from safeshift import MemoryStore, Plan, VirtualClock
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
DATABASE), the tests use that server instead of starting a throwaway cluster."""

_PG_USER, _PG_PASSWORD = "safeshift", "safeshift-test"


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (Debian layout), else PATH."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.name))

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Cluster:
    """A throwaway PostgreSQL cluster in its own directory, run as ``postgres`` when we are root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.prefix: list[str] = []
        if self.as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("PostgreSQL binaries found but no 'postgres' user to run them as "
                            "(running as root): apt-get install -y postgresql")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="safeshift-pg-", dir="/tmp"))
        if self.as_root:
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = 0
        self.started = False

    def run(self, *args: str) -> None:
        proc = subprocess.run([*self.prefix, *args], cwd=self.dir, capture_output=True, text=True,
                              timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}\n{self.server_log()}")

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        self.run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
                 "--no-sync", "--no-instructions")
        for attempt in range(3):  # the free port can be taken between probing and binding
            self.port = _free_port()
            try:
                self.start_server()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        # the superuser over the cluster's own Unix socket (trust); the tests' role over TCP
        self.run(str(self.bindir / "psql"), "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                 "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q",
                 "-c", f"CREATE ROLE {_PG_USER} LOGIN CREATEDB PASSWORD '{_PG_PASSWORD}'",
                 "-c", f"CREATE DATABASE {_PG_USER} OWNER {_PG_USER}")

    def start_server(self) -> None:
        """Start the server on ``self.port`` (again, after :meth:`stop_server`)."""
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                 "-w", "-t", "30", "-o", options, "start")
        self.started = True

    def stop_server(self) -> None:
        """Stop the server, keeping its data: an outage."""
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t",
                 "30", "stop")
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{_PG_USER}:{_PG_PASSWORD}@127.0.0.1:{self.port}/{_PG_USER}"

    def stop(self) -> None:
        try:
            if self.started or (self.data / "postmaster.pid").exists():
                self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                         "-t", "30", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres_cluster() -> Iterator[_Cluster]:
    """A cluster of the test's own, for tests that stop and restart the server."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.fail("PostgreSQL binaries not found: apt-get install -y postgresql")
    cluster = _Cluster(bindir)
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
    bindir = _postgres_bin()
    if bindir is None:
        pytest.fail("PostgreSQL binaries not found: apt-get install -y postgresql")
    cluster = _Cluster(bindir)
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
