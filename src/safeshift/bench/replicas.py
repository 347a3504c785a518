"""``safeshift bench replicas``: N ``safeshift serve`` replicas behind nginx, sharing one
PostgreSQL, under load while their rollout steps through stages and is rolled back; then the
replica holding the controller lease is killed.

Everything runs on loopback and is thrown away at the end (also on Ctrl-C or a failure): a
PostgreSQL cluster of its own (:mod:`safeshift.bench._postgres`), the replicas (each its own
``safeshift serve`` process, with its controller, the lease choosing which one decides), and
nginx with the configuration ``safeshift nginx`` prints (:mod:`safeshift.nginx`) in a directory
of its own — the system's nginx service is not touched.

The load, in a process of its own so that it does not slow the measurements: ``concurrency``
clients, each on a keep-alive connection of its own sending a prediction (a unit from a pool, a
country, the 30 features of a row of ``load_breast_cancer``) as soon as the last one is
answered, through nginx; for a share of the answers a label (the row's true class) falls due
:data:`LABEL_DELAY` seconds later, and the labels due are sent in batches, as a labelling job
sends them. A labelling pipeline is always later than the flush that puts the request's record
in the store; a label sooner than that may reach a replica that cannot find the record yet,
and gets a 404.

The rollout's stages are short (their ``min_duration`` a share of the window) so that the
controller advances them during the load on its own evidence (error rate, a non-inferiority
test); the third stage holds, and once it has run a while (or at 70 % of the window once a
stage has advanced, 85 % at the latest) an operator rolls the rollout back through the control
API, through nginx.

Measured:

- every answer's status, through nginx: no 5xx is the target;
- labels: sent, accepted, and joined (``feedback`` rows in the store): equal is the target;
- each replica's RSS after the warm-up, halfway and at the end of the window (growth that
  stops after the first half is caches filling; growth in both halves would be a leak);
- for every stage change (each decision in the window), when each replica shows it: its
  ``/readyz`` polled directly, not through nginx, every :data:`POLL` s; the lag is from the
  decision's time to the first answer showing the new split (at most :data:`POLL` late);
- failover: after the window, the replica holding the lease is SIGKILLed; the time until another
  holds the lease (its tick acquires it: the lease row's expiry minus its length) and until it
  renews it (its next tick). A trickle of predictions continues through nginx meanwhile; a
  request that was in flight on the killed replica fails (nginx does not resend a POST it has
  sent — see :mod:`safeshift.nginx`), counted apart.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safeshift.bench._procs import BenchError, free_port, stop, tail, wait_ready

ROLLOUT = "bench-replicas"
ENDPOINT = "churn"
POLL = 0.05
"""Seconds between two readiness polls of a replica (the lag's resolution)."""
LABEL_DELAY = 2.0
"""Seconds between an answer and its label."""
LABEL_SHARE = 0.3
"""Share of the answers that get a label."""
LABEL_BATCH = 200
"""Labels sent in one request at most (those due at once)."""
FLUSH_INTERVAL = 0.5
"""``SAFESHIFT_FLUSH_INTERVAL`` of the replicas: request records reach the store this soon."""
LEASE = 5.0
"""``SAFESHIFT_CONTROLLER_LEASE`` of the replicas: the failover takes at most this plus a tick."""
TICK = 1.0
"""``--tick`` of the replicas."""
QUICK = 15.0
"""The window of ``--quick`` (the test's)."""
LAG_TARGET = 1.0
"""Seconds within which every replica shows a stage change."""
FAILOVER_TARGET = 10.0
"""Seconds within which another replica holds the lease after the holder's SIGKILL."""
RSS_FLAT = 0.02
"""The most a replica's RSS may grow over the second half of the window, as a share."""
UNITS = 20_000
COUNTRIES = ("BR", "US", "DE", "FR", "IN")
NGINX_HINT = "apt-get install -y nginx"


# -- processes -----------------------------------------------------------------------------


def find_nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        raise BenchError(f"nginx not found: {NGINX_HINT} (the bench runs it as a process of its "
                         "own; the system's nginx service is not used)")
    return found


def rss_mb(pid: int) -> float:
    """A process's resident set size in MB, from ``/proc`` (0 when it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@contextlib.contextmanager
def nginx_process(replicas: list[str], directory: Path, *, nginx: str | None = None
                  ) -> Iterator[str]:
    """nginx in front of ``replicas`` (``host:port``) with the configuration of
    :func:`safeshift.nginx.render`, as a process of its own: its configuration and logs in
    ``directory`` (the access log ``access.log``), the request bodies it buffers in a
    directory of its own that its workers can reach (as root they run as ``nobody``, and
    ``directory`` may be private), deleted at the end. Yields its URL once it answers."""
    from safeshift.nginx import main_config, render

    binary = nginx or find_nginx()
    site = directory / "safeshift-site.conf"
    port = free_port()
    site.write_text(render(replicas, listen=f"127.0.0.1:{port}",
                           access_log=str(directory / "access.log")))
    temp = Path(tempfile.mkdtemp(prefix="safeshift-nginx-"))
    temp.chmod(0o711)  # the workers may pass through it to the directories nginx makes there
    conf = directory / "nginx.conf"
    conf.write_text(main_config(str(site), prefix=str(directory), temp=str(temp)))
    log = directory / "nginx.out"
    try:
        with log.open("w") as sink:
            proc = subprocess.Popen([binary, "-p", str(directory), "-c", str(conf), "-e",
                                     str(directory / "error.log")], stdout=sink, stderr=sink)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url + "/readyz", proc, log, "nginx")
            yield url
        finally:
            stop(proc)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# -- the plan ------------------------------------------------------------------------------


def plan(baseline: Path, candidate: Path, window: float) -> dict[str, Any]:
    """Two stages the controller advances within the window, a third that holds (the rollback
    comes there), and the full stage it never reaches."""
    step = f"{max(1.0, window * 0.1):.1f}s"
    return {
        "rollout": ROLLOUT, "endpoint": ENDPOINT,
        "baseline": {"version": "v1", "model": f"joblib:{baseline}"},
        "candidate": {"version": "v2", "model": f"joblib:{candidate}"},
        "change": {"summary": "benchmark: replicas behind nginx"},
        "unit": "user_id", "segments": ["country"],
        "stages": [{"name": "canary", "traffic": "20%", "min_duration": step, "min_samples": 100},
                   {"name": "half", "traffic": "50%", "min_duration": step, "min_samples": 100},
                   {"name": "most", "traffic": "80%", "min_duration": "1h"},
                   {"name": "full", "traffic": "100%"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.05}],
        "analysis": {"alpha": 0.05, "expected_samples": 500},
    }


HELD_STAGE = 2


def expected_view(stages: list[dict[str, Any]], phase: str, stage_index: int) -> tuple[str, float]:
    """What a replica's ``/readyz`` shows (stage, candidate share) once a decision leading to
    ``phase`` at ``stage_index`` reached it — the split :func:`safeshift.controller.split_for`
    gives that state."""
    from safeshift.state import Phase

    name = stages[stage_index]["name"] if 0 <= stage_index < len(stages) else "-"
    if phase == Phase.PROMOTED:
        return name, 1.0
    if phase in (Phase.PENDING, Phase.ROLLED_BACK) or stage_index < 0:
        return name, 0.0
    return name, _served(stages[stage_index])


def _served(stage: dict[str, Any]) -> float:
    from safeshift.plan import Stage

    return round(Stage.model_validate(stage).served / 10_000, 4)


# -- observers (threads in this process) ---------------------------------------------------


@dataclass
class Poller:
    """Polls one replica's ``/readyz`` and keeps every change of what it shows."""

    replica: Replica
    timeline: list[tuple[float, str, float]] = field(default_factory=list)
    errors: int = 0
    polls: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import httpx

        last: tuple[str, float] | None = None
        with httpx.Client(base_url=self.replica.url, timeout=2) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    body = http.get("/readyz").json()
                    ep = body["endpoints"][ENDPOINT]
                    view = (str(ep["stage"]), round(float(ep["candidate_share"]), 4))
                    self.polls += 1
                    if view != last:
                        self.timeline.append((time.time(), *view))
                        last = view
                except (httpx.HTTPError, KeyError, ValueError):
                    self.errors += 1
                self.stop.wait(max(0.0, POLL - (time.monotonic() - started)))

    def first_seen(self, view: tuple[str, float], since: float) -> float | None:
        """When this replica first showed ``view`` at or after ``since`` (None: never)."""
        for i, (t, stage, share) in enumerate(self.timeline):
            end = self.timeline[i + 1][0] if i + 1 < len(self.timeline) else float("inf")
            if (stage, share) == view and end >= since:
                return max(t, since)
        return None


def _lease(store: Any) -> tuple[str, float] | None:
    import sqlalchemy as sa

    from safeshift.store.sql import leases

    with store.engine.connect() as conn:
        row = conn.execute(sa.select(leases.c.holder, leases.c.expires_at).where(
            leases.c.name == f"controller:{ROLLOUT}")).first()
    return (str(row[0]), float(row[1])) if row else None


def _holder_pid(holder: str) -> int:
    return int(holder.split(":")[1])  # host:pid:random (safeshift.gateway.runtime)


def _labels_joined(store: Any) -> int:
    import sqlalchemy as sa

    from safeshift.store.sql import feedback

    with store.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(feedback).where(
            feedback.c.signal == "accuracy")).scalar()
    return int(n or 0)


def _served_by(url: str) -> float:
    """Predictions a replica counted (``safeshift_requests_total``)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        if family.name == "safeshift_requests":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


class Trickle:
    """Predictions one at a time through nginx while the failover happens."""

    def __init__(self, url: str, token: str, rows: list[dict[str, float]]) -> None:
        self.url, self.token, self.rows = url, token, rows
        self.statuses: collections.Counter[int] = collections.Counter()
        self.transport_errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        rng = random.Random(7)
        with httpx.Client(base_url=self.url, timeout=30,
                          headers={"authorization": f"Bearer {self.token}"}) as http:
            while not self.stop.is_set():
                body = {"unit": f"user-{rng.randrange(UNITS)}",
                        "context": {"country": rng.choice(COUNTRIES)},
                        "inputs": self.rows[rng.randrange(len(self.rows))]}
                try:
                    self.statuses[http.post(f"/v1/endpoints/{ENDPOINT}/predict",
                                            json=body).status_code] += 1
                except httpx.HTTPError:
                    self.transport_errors += 1
                self.stop.wait(0.01)


# -- the load (a process of its own) --------------------------------------------------------


class _Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a request at a time, reopened
    when the server closes it. Lean on purpose (httpx costs the load generator ~3 ms of CPU a
    request, which the replicas, on the same cores, would pay for); it reads what nginx sends:
    a status line, headers with ``Content-Length``, a body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, authorization: str) -> tuple[int, bytes]:
        """Send one POST; returns (status, body). A connection that fails is dropped and the
        error raised (:class:`OSError` or :class:`asyncio.IncompleteReadError`)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: {authorization}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.split(b"\r\n")
            status = int(lines[0].split()[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            payload = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            raise OSError("connection failed") from None
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _load(cfg: dict[str, Any]) -> dict[str, Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(cfg["url"])
    host, port = parts.hostname or "127.0.0.1", int(parts.port or 80)
    rows: list[dict[str, float]] = cfg["rows"]
    targets: list[int] = cfg["targets"]
    app = f"Bearer {cfg['app_token']}"
    labeller = f"Bearer {cfg['label_token']}"
    statuses: collections.Counter[int] = collections.Counter()
    label_statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    transport_errors = 0
    labels_accepted = 0
    late = 0.0  # the most a label was sent after it was due
    pending: collections.deque[tuple[float, str, int]] = collections.deque()
    end = time.monotonic() + float(cfg["seconds"])
    predicting = True

    async def predictor(k: int) -> None:
        nonlocal transport_errors
        rng = random.Random(cfg["seed"] * 1000 + k)
        conn = _Connection(host, port)
        path = f"/v1/endpoints/{ENDPOINT}/predict"
        while time.monotonic() < end:
            i = rng.randrange(len(rows))
            body = json.dumps({"unit": f"user-{rng.randrange(UNITS)}",
                               "context": {"country": rng.choice(COUNTRIES)},
                               "inputs": rows[i]}).encode()
            t0 = time.perf_counter()
            try:
                status, answer = await conn.post(path, body, app)
            except OSError:
                transport_errors += 1
                await asyncio.sleep(0.05)
                continue
            latencies.append(time.perf_counter() - t0)
            statuses[status] += 1
            if status == 200 and rng.random() < cfg["label_share"]:
                pending.append((time.monotonic() + cfg["label_delay"],
                                json.loads(answer)["id"], targets[i]))
        conn.close()

    async def labeller_task() -> None:
        nonlocal transport_errors, labels_accepted, late
        conn = _Connection(host, port)
        while predicting or pending:
            if not pending or pending[0][0] > time.monotonic():
                await asyncio.sleep(0.02)
                continue
            now = time.monotonic()
            batch: list[dict[str, Any]] = []  # the labels due now, sent in one request
            while pending and pending[0][0] <= now and len(batch) < LABEL_BATCH:
                due, rid, label = pending.popleft()
                late = max(late, now - due)
                batch.append({"id": rid, "label": label})
            try:
                status, answer = await conn.post("/v1/feedback", json.dumps(batch).encode(),
                                                 labeller)
            except OSError:
                transport_errors += 1
                continue
            label_statuses[status] += len(batch)
            if status == 200:
                labels_accepted += sum("accuracy" in r.get("accepted", [])
                                       for r in json.loads(answer)["results"])
        conn.close()

    started = time.monotonic()
    labellers = [asyncio.create_task(labeller_task()) for _ in range(4)]
    await asyncio.gather(*(predictor(k) for k in range(int(cfg["concurrency"]))))
    predicted = time.monotonic() - started
    predicting = False
    await asyncio.gather(*labellers)
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0

    return {"requests": sum(statuses.values()), "seconds": predicted,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "label_statuses": {str(k): v for k, v in sorted(label_statuses.items())},
            "labels_sent": sum(label_statuses.values()), "labels_accepted": labels_accepted,
            "transport_errors": transport_errors, "p50_ms": q(0.5), "p99_ms": q(0.99),
            "labels_late_max_s": round(late, 2)}


# -- the benchmark ---------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the bench like Ctrl-C does: through the cleanup (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(*, duration: float = 60.0, replicas: int = 2, concurrency: int = 16,
         quick: bool = False, json_path: Path | None = None,
         console: Console | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and prints) its figures. ``quick``: a 15 s window."""
    console = console or Console()
    if quick:
        duration = min(duration, QUICK)
    if replicas < 2:
        raise BenchError("give --replicas 2 or more: the failover needs another replica")
    if duration < 8:
        raise BenchError("give --duration 8 or more (seconds): the stages need the time")
    nginx = find_nginx()
    with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="safeshift-bench-replicas-"))
        stack.callback(shutil.rmtree, tmp, True)
        return _run(stack, tmp, nginx, duration=duration, n=replicas, concurrency=concurrency,
                    json_path=json_path, console=console)
    raise AssertionError("unreachable")  # pragma: no cover (mypy: the with returns)


def _run(stack: contextlib.ExitStack, tmp: Path, nginx: str, *, duration: float, n: int,
         concurrency: int, json_path: Path | None, console: Console) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    from safeshift import ops
    from safeshift.auth import Role
    from safeshift.bench._postgres import Cluster
    from safeshift.bench.gateway import process_cpu, train
    from safeshift.client import Client
    from safeshift.clock import SystemClock
    from safeshift.state import Action
    from safeshift.store import SQLStore

    def say(text: str) -> None:
        console.print(text, markup=False)

    say("starting PostgreSQL ...")
    cluster = Cluster()
    stack.callback(cluster.stop)
    cluster.start()
    baseline, candidate, features = train(tmp)
    data = load_breast_cancer()
    rows = [{f: float(v) for f, v in zip(features, x, strict=True)} for x in data.data]
    targets = [int(t) for t in data.target]
    plan_doc = plan(baseline, candidate, duration)
    plan_path = tmp / "plan.json"
    plan_path.write_text(json.dumps(plan_doc))

    store = SQLStore(cluster.url)  # creates the schema; the replicas find it
    stack.callback(store.close)
    clock = SystemClock()
    tokens = {name: ops.create_token(store, clock, name=name, role=role, expires_in=3600.0,
                                     rights=rights)[0]
              for name, role, rights in (("bench-app", Role.CLIENT, None),
                                         ("bench-labels", Role.CLIENT, {"labels": True}),
                                         ("bench-operator", Role.OPERATOR, None))}

    # the replicas' settings are the bench's own (a SAFESHIFT_RATE_LIMIT of the shell would
    # change what is measured), but the pseudonym key, when set, is kept: one for all
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SAFESHIFT_") or k.startswith("SAFESHIFT_PSEUDONYM_KEY")}
    env.update({"SAFESHIFT_AUDIT_KEY": secrets.token_hex(32),  # one key for every replica
                "SAFESHIFT_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
                "SAFESHIFT_CONTROLLER_LEASE": str(LEASE)})
    say(f"starting {n} replicas ...")
    reps: list[Replica] = []
    for i in range(n):
        port = free_port()
        log = tmp / f"replica-{i + 1}.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "safeshift.cli", "serve", str(plan_path), "--store",
                 cluster.url, "--port", str(port), "--tick", str(TICK)],
                env=env, stdout=subprocess.DEVNULL, stderr=sink)
        stack.callback(stop, proc)
        reps.append(Replica(f"replica-{i + 1}", port, proc, log))
    for r in reps:
        wait_ready(r.url + "/readyz", r.proc, r.log, f"safeshift serve ({r.name})")

    url = stack.enter_context(nginx_process([f"127.0.0.1:{r.port}" for r in reps], tmp,
                                            nginx=nginx))

    pollers = [Poller(r) for r in reps]
    threads = [threading.Thread(target=p.run, name=f"poll-{p.replica.name}", daemon=True)
               for p in pollers]
    for t in threads:
        t.start()

    def stop_pollers() -> None:
        for p in pollers:
            p.stop.set()
        for t in threads:
            t.join(5)

    stack.callback(stop_pollers)

    cfg = {"url": url, "seconds": duration, "concurrency": concurrency, "rows": rows,
           "targets": targets, "app_token": tokens["bench-app"],
           "label_token": tokens["bench-labels"], "label_share": LABEL_SHARE,
           "label_delay": LABEL_DELAY, "seed": 2026}
    cfg_path = tmp / "load.json"
    cfg_path.write_text(json.dumps(cfg))
    out_path = tmp / "load.out"
    say(f"load: {concurrency} clients through nginx for {duration:g} s, labels on "
        f"{LABEL_SHARE:.0%} of the answers {LABEL_DELAY:g} s later ...")
    window_start = time.time()
    cpu_start = {r.name: process_cpu(r.proc.pid) for r in reps}
    load_cpu_start = _children_cpu()
    with out_path.open("w") as sink:
        load = subprocess.Popen([sys.executable, "-m", "safeshift.bench.replicas", "load",
                                 str(cfg_path)], stdout=sink, stderr=subprocess.STDOUT, env=env)
    stack.callback(stop, load)

    warmup = round(min(5.0, duration * 0.1), 1)
    rss_start: dict[str, float] = {}
    rss_mid: dict[str, float] = {}
    rolled_back_at: float | None = None
    seen: set[int] = set()
    held_since: float | None = None
    while load.poll() is None:
        now = time.time()
        if not rss_start and now - window_start >= warmup:
            rss_start = {r.name: rss_mb(r.proc.pid) for r in reps}
        if not rss_mid and now - window_start >= warmup + (duration - warmup) / 2:
            rss_mid = {r.name: rss_mb(r.proc.pid) for r in reps}
        decided = store.decisions(ROLLOUT)
        for d in decided:
            if d.seq not in seen:
                seen.add(d.seq)
                if d.at >= window_start:
                    say(f"  {d.at - window_start:5.1f} s  {d.action} → stage "
                        f"{expected_view(plan_doc['stages'], str(d.phase), d.to_stage)[0]} "
                        f"({d.phase}, {d.actor})")
        state = store.get_state(ROLLOUT)
        if state.stage_index == HELD_STAGE and held_since is None:
            held_since = now
        advanced = any(d.action is Action.ADVANCE for d in decided)
        elapsed = now - window_start
        due = (held_since is not None and now - held_since >= duration * 0.1) \
            or (elapsed >= duration * 0.7 and advanced) or elapsed >= duration * 0.85
        if rolled_back_at is None and due and not state.phase.terminal:
            with Client(url, token=tokens["bench-operator"]) as operator:
                operator.act(ROLLOUT, "rollback", reason="bench: an operator rolls back under load")
            rolled_back_at = time.time()
        time.sleep(0.2)
    if load.returncode != 0:
        raise BenchError(f"the load generator failed: {tail(out_path)}")
    traffic = json.loads(out_path.read_text().strip().splitlines()[-1])
    window_end = time.time()
    load_cpu = (_children_cpu() - load_cpu_start) / (window_end - window_start)
    cpu = {r.name: (process_cpu(r.proc.pid) - cpu_start[r.name]) / (window_end - window_start)
           for r in reps}
    rss_end = {r.name: rss_mb(r.proc.pid) for r in reps}
    served = {r.name: _served_by(r.url) for r in reps}
    labels_joined = _labels_joined(store)
    time.sleep(2 * POLL)
    stop_pollers()

    decisions = [d for d in store.decisions(ROLLOUT) if d.at >= window_start]
    changes: list[dict[str, Any]] = []
    for d in decisions:
        view = expected_view(plan_doc["stages"], str(d.phase), d.to_stage)
        lags: dict[str, float | None] = {}
        for p in pollers:
            seen_at = p.first_seen(view, d.at)
            lags[p.replica.name] = None if seen_at is None else round(seen_at - d.at, 3)
        changes.append({"seq": d.seq, "action": str(d.action), "actor": d.actor,
                        "stage": view[0], "candidate_share": view[1],
                        "at_s": round(d.at - window_start, 2), "lag_s": lags})

    failover = _failover(store, reps, url, tokens["bench-app"], rows, say)

    result: dict[str, Any] = {
        "setup": {"replicas": n, "duration_s": duration, "concurrency": concurrency,
                  "label_share": LABEL_SHARE, "label_delay_s": LABEL_DELAY,
                  "flush_interval_s": FLUSH_INTERVAL, "controller_lease_s": LEASE,
                  "tick_s": TICK, "poll_s": POLL, "warmup_s": warmup,
                  "window_s": round(window_end - window_start, 1),
                  "load_generator_cpu": round(load_cpu, 2),
                  "nginx": _nginx_version(nginx)},
        "requests": traffic["requests"],
        "rps": round(traffic["requests"] / max(traffic["seconds"], 1e-9), 1),
        "p50_ms": round(traffic["p50_ms"], 2), "p99_ms": round(traffic["p99_ms"], 2),
        "statuses": traffic["statuses"], "label_statuses": traffic["label_statuses"],
        "status_5xx": sum(v for k, v in traffic["statuses"].items() if k.startswith("5"))
        + sum(v for k, v in traffic["label_statuses"].items() if k.startswith("5")),
        "transport_errors": traffic["transport_errors"],
        "labels_sent": traffic["labels_sent"], "labels_accepted": traffic["labels_accepted"],
        "labels_joined": labels_joined, "labels_late_max_s": traffic["labels_late_max_s"],
        "per_replica": {r.name: {"served": served[r.name],
                                 "rss_start_mb": round(rss_start.get(r.name, 0.0), 1),
                                 "rss_mid_mb": round(rss_mid.get(r.name, 0.0), 1),
                                 "rss_end_mb": round(rss_end[r.name], 1),
                                 "cpu": round(cpu[r.name], 2),
                                 "poll_errors": next(p.errors for p in pollers if p.replica is r)}
                        for r in reps},
        "stage_changes": changes,
        "max_lag_s": max((lag for c in changes for lag in c["lag_s"].values() if lag is not None),
                         default=None),
        "all_seen": all(lag is not None for c in changes for lag in c["lag_s"].values()),
        "failover": failover,
    }
    result["targets"] = _targets(result)
    _render(result, console)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _children_cpu() -> float:
    """CPU seconds of the children this process has waited for (the load generator)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _targets(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets, each met or not: no 5xx, no label lost, memory flat after the
    warm-up (the second half grows by at most :data:`RSS_FLAT` of the RSS), every stage change
    on every replica within :data:`LAG_TARGET`, the lease taken over within
    :data:`FAILOVER_TARGET` of the SIGKILL."""
    per = result["per_replica"].values()
    took = result["failover"]["took_over_s"]
    return {
        "no_5xx": result["status_5xx"] == 0 and result["transport_errors"] == 0,
        "labels_joined": result["labels_sent"] == result["labels_accepted"]
        == result["labels_joined"],
        "memory_flat": all(r["rss_end_mb"] - r["rss_mid_mb"] <= RSS_FLAT * r["rss_start_mb"]
                           for r in per),
        "stage_lag": result["all_seen"] and (result["max_lag_s"] or 0.0) <= LAG_TARGET,
        "failover": took is not None and took <= FAILOVER_TARGET,
    }


def _failover(store: Any, reps: list[Replica], url: str, token: str,
              rows: list[dict[str, float]], say: Callable[[str], None]) -> dict[str, Any]:
    """SIGKILL the replica holding the lease; time until another takes it and renews it."""
    lease = _lease(store)
    if lease is None:
        raise BenchError("no replica holds the controller lease")
    holder, _ = lease
    victim = next((r for r in reps if r.proc.pid == _holder_pid(holder)), None)
    if victim is None:
        raise BenchError(f"the lease holder {holder!r} is none of the replicas")
    trickle = Trickle(url, token, rows)
    thread = threading.Thread(target=trickle.run, name="trickle", daemon=True)
    thread.start()
    time.sleep(0.5)
    say(f"SIGKILL {victim.name} (pid {victim.proc.pid}), which holds the controller lease ...")
    killed_at = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    ttl = max(LEASE, 3 * TICK)
    new_holder: str | None = None
    acquired_at = renewed_at = None
    deadline = time.monotonic() + ttl * 3 + 10
    first_expiry = None
    while time.monotonic() < deadline:
        current = _lease(store)
        if current is not None and current[0] != holder:
            if new_holder is None:
                new_holder, first_expiry = current
                acquired_at = first_expiry - ttl  # its tick took the lease at expiry - ttl
            elif current[0] == new_holder and current[1] > (first_expiry or 0):
                renewed_at = current[1] - ttl
                break
        time.sleep(POLL)
    time.sleep(0.5)
    trickle.stop.set()
    thread.join(35)
    successor = None if new_holder is None else next(
        (r.name for r in reps if r.proc.pid == _holder_pid(new_holder)), new_holder)
    return {"killed": victim.name, "successor": successor, "lease_s": ttl,
            "took_over_s": None if acquired_at is None else round(acquired_at - killed_at, 2),
            "renewed_s": None if renewed_at is None else round(renewed_at - killed_at, 2),
            "trickle_requests": sum(trickle.statuses.values()) + trickle.transport_errors,
            "trickle_statuses": {str(k): v for k, v in sorted(trickle.statuses.items())},
            "trickle_transport_errors": trickle.transport_errors}


def _nginx_version(nginx: str) -> str:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().rpartition("/")[2] or "?"


def _fmt_lag(lag: float | None) -> str:
    return "never" if lag is None else f"{lag * 1000:.0f} ms"


def _render(result: dict[str, Any], console: Console) -> None:
    s = result["setup"]
    names = list(result["per_replica"])
    table = Table(title=f"{s['replicas']} replicas behind nginx {s['nginx']}, one PostgreSQL — "
                        f"{s['concurrency']} clients for {s['duration_s']:g} s")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("all", justify="right")
    per = result["per_replica"]
    table.add_row("predictions served", *(f"{per[x]['served']:,.0f}" for x in names),
                  f"{result['requests']:,}")
    table.add_row(f"RSS after {s['warmup_s']:g} s warm-up (MB)",
                  *(f"{per[x]['rss_start_mb']:.1f}" for x in names), "")
    table.add_row("CPU (cores)", *(f"{per[x]['cpu']:.2f}" for x in names),
                  f"load generator {s['load_generator_cpu']:.2f}")
    table.add_row("RSS halfway (MB)", *(f"{per[x]['rss_mid_mb']:.1f}" for x in names), "")
    table.add_row("RSS at the end (MB)", *(f"{per[x]['rss_end_mb']:.1f}" for x in names), "")
    table.add_row("RSS change: first half, second half", *(
        f"{per[x]['rss_mid_mb'] - per[x]['rss_start_mb']:+.1f}, "
        f"{per[x]['rss_end_mb'] - per[x]['rss_mid_mb']:+.1f} MB" for x in names), "")
    for c in result["stage_changes"]:
        label = (f"{c['action']} → {c['stage']} ({c['candidate_share']:.0%}) at "
                 f"{c['at_s']:.1f} s, seen after")
        lags = [c["lag_s"][x] for x in names]
        worst = None if any(v is None for v in lags) else max(v for v in lags if v is not None)
        table.add_row(label, *(_fmt_lag(v) for v in lags), f"max {_fmt_lag(worst)}")
    f = result["failover"]
    table.add_row("controller lease", *(
        "held, SIGKILLed" if x == f["killed"] else ("took it over" if x == f["successor"] else "")
        for x in names), "")
    console.print(table)
    codes = ", ".join(f"{k}: {v:,}" for k, v in result["statuses"].items())
    label_codes = ", ".join(f"{k}: {v:,}" for k, v in result["label_statuses"].items())
    lines = [
        f"requests through nginx: {result['requests']:,} predictions ({result['rps']:,.0f}/s, "
        f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms) — {codes}",
        f"labels: {result['labels_sent']:,} sent ({label_codes}), {result['labels_accepted']:,} "
        f"accepted, {result['labels_joined']:,} joined in the store (each sent at most "
        f"{result['labels_late_max_s']:g} s after it was due)",
        f"5xx: {result['status_5xx']}, transport errors: {result['transport_errors']}",
        f"stage changes seen by every replica: {'yes' if result['all_seen'] else 'NO'}, "
        f"slowest {_fmt_lag(result['max_lag_s'])} (polled every {s['poll_s'] * 1000:.0f} ms)",
        f"failover: {f['killed']} SIGKILLed; {f['successor']} took the lease after "
        f"{f['took_over_s']} s and renewed it after {f['renewed_s']} s (lease {f['lease_s']:g} s, "
        f"tick {s['tick_s']:g} s); {f['trickle_requests']} predictions meanwhile — "
        + (", ".join(f"{k}: {v}" for k, v in f["trickle_statuses"].items()) or "none")
        + (f", {f['trickle_transport_errors']} transport errors"
           if f["trickle_transport_errors"] else ""),
    ]
    t = result["targets"]
    missed = [name for name, ok in t.items() if not ok]
    lines.append(("targets met" if not missed else f"targets NOT met: {', '.join(missed)}")
                 + f" (no 5xx; labels sent = joined; RSS grows at most {RSS_FLAT:.0%} over "
                 f"the second half; every stage change on every replica within {LAG_TARGET:g} "
                 f"s; failover within {FAILOVER_TARGET:g} s)")
    for line in lines:
        console.print(line, markup=False)


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m safeshift.bench.replicas")
    sub = parser.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("load", help="the load generator (a JSON config file)")
    lg.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    cfg = json.loads(args.config.read_text())
    result = asyncio.run(_load(cfg))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    _cli(sys.argv[1:])
