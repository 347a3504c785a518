"""``safeshift serve`` as a real process for end-to-end tests: on a free loopback port, its
JSON log in a file (a pipe nobody reads would fill up and block the server), stopped at the
end. (A plain module, not a test file.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from safeshift.bench._procs import free_port, stop, wait_ready


@contextmanager
def serve_process(plans: Sequence[str | Path], *, store: str, log: Path,
                  tick: float = 0.2, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``safeshift serve`` on ``plans`` and yield its URL once it is ready."""
    port = free_port()
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

