"""A throwaway PostgreSQL cluster from the server binaries: for the store tests (through
``tests/conftest.py``) and for ``safeshift bench replicas``, which needs one outside pytest.

The cluster lives in a directory of its own under ``/tmp``, listens on a free loopback port
and on a Unix socket in that directory, and is deleted by :meth:`Cluster.stop`. ``initdb``
refuses to run as root, so as root every server command runs as the ``postgres`` user (the
Debian package creates it). Durability is switched off (``fsync=off``): nothing here outlives
the process that started it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from safeshift.bench._procs import free_port

USER, PASSWORD = "safeshift", "safeshift-test"
"""The role (and its database) every cluster creates; it may CREATE DATABASE."""

INSTALL_HINT = "apt-get install -y postgresql"


class PostgresUnavailable(RuntimeError):
    """The server binaries, or the user to run them as, are missing; the message names the fix."""


def postgres_bin() -> Path | None:
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


class Cluster:
    """A throwaway PostgreSQL cluster in its own directory, run as ``postgres`` when we are root."""

    def __init__(self, bindir: Path | None = None, *, max_connections: int = 200) -> None:
        found = bindir or postgres_bin()
        if found is None:
            raise PostgresUnavailable(f"PostgreSQL binaries not found: {INSTALL_HINT}")
        self.bindir = found
        self.max_connections = max_connections
        self.as_root = os.geteuid() == 0
        self.prefix: list[str] = []
        pw = None
        if self.as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "PostgreSQL binaries found but no 'postgres' user to run them as (running "
                    f"as root): {INSTALL_HINT}") from None
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="safeshift-pg-", dir="/tmp"))
        if pw is not None:
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
            self.port = free_port()
            try:
                self.start_server()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        # the superuser over the cluster's own Unix socket (trust); the role over TCP
        self.run(str(self.bindir / "psql"), "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                 "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q",
                 "-c", f"CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'",
                 "-c", f"CREATE DATABASE {USER} OWNER {USER}")

    def start_server(self) -> None:
        """Start the server on ``self.port`` (again, after :meth:`stop_server`)."""
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off "
                   f"-c max_connections={self.max_connections}")
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
        return f"postgresql+psycopg://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{USER}"

    def stop(self) -> None:
        """Stop the server (if it runs) and delete the cluster's directory."""
        try:
            if self.started or (self.data / "postmaster.pid").exists():
                self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                         "-t", "30", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
