"""``safeshift serve`` as a real process for end-to-end tests: on a free loopback port, its
JSON log in a file (a pipe nobody reads would fill up and block the server), stopped at the
end. (A plain module, not a test file.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def serve_process(plans: Sequence[str | Path], *, store: str, log: Path,
                  tick: float = 0.2, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``safeshift serve`` on ``plans`` and yield its URL once it is ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ = {**os.environ, "SAFESHIFT_FLUSH_INTERVAL": "0.1", **(env or {})}
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "safeshift.cli", "serve",
                                 *map(str, plans), "--store", store, "--port", str(port),
                                 "--tick", str(tick)], env=environ,
                                stdout=subprocess.DEVNULL, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", proc, log, "safeshift serve", timeout=60)
        yield url
    finally:
        stop(proc, timeout=30)


def wait_ready(probe: str, proc: subprocess.Popen[bytes], log: Path, what: str, *,
               timeout: float) -> None:
    """Wait until ``probe`` answers 200; fail with the end of ``log`` if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Terminate ``proc``, killing it if it outlives ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
