"""A real Prometheus server (Debian's ``prometheus`` package) for end-to-end tests: on a free
loopback port, scraping the given targets every 250 ms, its data in a temporary directory,
stopped at the end. (A plain module, not a test file.)"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from safeshift.bench._procs import free_port, stop, wait_ready

INSTALL = "sudo apt-get install -y --no-install-recommends prometheus (as root, make prometheus does it)"


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).exists():
        raise AssertionError(f"these tests need a real Prometheus server: {INSTALL}")
    return path


@contextmanager
def prometheus(targets: Sequence[str], directory: Path, *, scrape: str = "250ms",
               port: int | None = None) -> Iterator[str]:
    """Run Prometheus scraping ``targets`` (``host:port``, path ``/metrics``) on ``port`` (a
    free one by default); yields its URL once it is ready."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": scrape, "scrape_timeout": scrape,
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "safeshift", "metrics_path": "/metrics",
                            "static_configs": [{"targets": list(targets)}]}]}))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = directory / "prometheus.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}",
             f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=sink)
    try:
        wait_ready(f"{url}/-/ready", proc, log, "Prometheus", timeout=30)
        yield url
    finally:
        stop(proc, timeout=10)


def wait_for_series(url: str, promql: str, timeout: float = 20.0) -> None:
    """Wait until ``promql`` gives Prometheus at ``url`` a non-empty answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=2).json()
        if body.get("data", {}).get("result"):
            return
        time.sleep(0.25)
    raise AssertionError(f"Prometheus never answered {promql}")
