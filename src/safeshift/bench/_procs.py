"""The child processes of the benchmarks (and of the tests' servers): a free loopback port,
waiting until a process answers its readiness URL, and stopping it — one implementation for
``bench gateway``, ``bench replicas``, the throwaway PostgreSQL, and the tests' ``safeshift
serve`` and Prometheus processes."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


class BenchError(RuntimeError):
    """A benchmark cannot run or a process it needs did not start (the message says why)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, n: int = 3000) -> str:
    """The end of a log file, for an error message."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, what: str, *,
               timeout: float = 60.0, statuses: tuple[int, ...] = (200,)) -> None:
    """Wait until ``url`` answers one of ``statuses``; :class:`BenchError` with the end of
    ``log`` when ``proc`` exits first or ``timeout`` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code in statuses:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}): {tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready after {timeout:g} s: {tail(log)}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Terminate ``proc``, killing it if it outlives ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


__all__ = ["BenchError", "free_port", "stop", "tail", "wait_ready"]
