"""``safeshift bench gateway``: what the gateway costs, against the same model served directly.

Both servers load one scikit-learn bundle (a LogisticRegression on the 30 features of
``load_breast_cancer``, trained here and saved with joblib in a temporary directory):

``direct``
    a plain FastAPI ``async def`` app on uvicorn (uvloop, httptools, no access log): a pydantic
    body, ``predict_proba``, a JSON answer — what a team would write to serve the model.
``minimal``
    a reference below it: bare Starlette, ``json`` in and out, no validation — the least a
    Python server can do around the same model call.
``gateway``
    ``safeshift serve`` with a rollout in a canary stage (5 % of units on a second model of
    the same kind), its controller ticking, telemetry flushed to SQLite, ``/metrics`` and the
    JSON access log on: the gateway as shipped.

The targets compare the gateway with ``direct``; ``minimal`` is shown beside them so that
the cost of the gateway's own work is visible too. One load generator process drives all
three with the same bodies (a unit id that varies, a context, the 30 features) on loopback:
``wrk`` with a Lua script when it is installed, else a Python asyncio client on raw
sockets. On a machine with two or more cores the servers are pinned to core 0 and the load
generator to core 1, so they do not compete; the load generator's CPU use is reported to
show that it is not the bottleneck. Runs alternate between the targets and the median of
the rounds is reported, which damps the noise of a shared machine. Each run is bounded in
time and in requests.

With ``concurrency`` connections each sending a request as soon as the last one is answered,
the servers are saturated and p50 is mostly queueing: it is about ``concurrency / rps``, so the
"added p50" there follows the throughput ratio. A second series on one connection measures the
latency a request sees without queueing — what the gateway adds to each call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from safeshift.bench._procs import free_port, stop, wait_ready

RPS_TARGET = 0.8
"""Gateway throughput at least this share of the direct server's."""
P50_TARGET_MS = 1.0
"""Gateway p50 at most this many milliseconds above the direct server's."""
BODIES = 1000


# -- the model and the servers -------------------------------------------------------------


def train(directory: Path) -> tuple[Path, Path, list[str]]:
    """Baseline and candidate bundles ``{"model", "features"}``; returns their paths."""
    import joblib
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    data = load_breast_cancer()
    features = [str(f).replace(" ", "_") for f in data.feature_names]
    paths = []
    for name, c in (("baseline", 1.0), ("candidate", 0.5)):
        est = LogisticRegression(C=c, max_iter=5000).fit(data.data, data.target)
        path = directory / f"{name}.joblib"
        joblib.dump({"model": est, "features": features}, path)
        paths.append(path)
    return paths[0], paths[1], features


class DirectBody(BaseModel):
    """The direct server's request body (the gateway's format; unit and context unused)."""

    inputs: dict[str, float] | list[dict[str, float]]
    unit: str | None = None
    context: dict[str, str] | None = None


def direct_app(model_path: Path) -> Any:
    """The plain FastAPI server: the fair baseline for the comparison."""
    import joblib
    import numpy as np
    from fastapi import FastAPI

    bundle = joblib.load(model_path)
    est, features = bundle["model"], bundle["features"]
    classes = est.classes_
    app = FastAPI()

    @app.post("/predict")
    async def predict(body: DirectBody) -> dict[str, Any]:
        rows = body.inputs if isinstance(body.inputs, list) else [body.inputs]
        x = np.array([[row[f] for f in features] for row in rows], dtype=float)
        proba = est.predict_proba(x)
        return {"outputs": classes[proba.argmax(axis=1)].tolist(),
                "scores": proba[:, -1].tolist()}

    return app


def minimal_app(model_path: Path) -> Any:
    """A reference point below FastAPI: bare Starlette, ``json`` in and out, no validation."""
    import joblib
    import numpy as np
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    bundle = joblib.load(model_path)
    est, features = bundle["model"], bundle["features"]
    classes = est.classes_

    async def predict(request: Request) -> Response:
        doc = json.loads(await request.body())
        rows = doc["inputs"] if isinstance(doc["inputs"], list) else [doc["inputs"]]
        x = np.array([[row[f] for f in features] for row in rows], dtype=float)
        proba = est.predict_proba(x)
        body = json.dumps({"outputs": classes[proba.argmax(axis=1)].tolist(),
                           "scores": proba[:, -1].tolist()})
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def _run_app(kind: str, model: str, port: int) -> None:
    import uvicorn

    app = direct_app(Path(model)) if kind == "direct" else minimal_app(Path(model))
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning",
                loop="auto", http="auto", ws="none")


def _plan(baseline: Path, candidate: Path) -> str:
    return json.dumps({
        "rollout": "bench-gateway", "endpoint": "churn",
        "baseline": {"version": "v1", "model": f"joblib:{baseline}"},
        "candidate": {"version": "v2", "model": f"joblib:{candidate}"},
        "change": {"summary": "benchmark: C=0.5"},
        "unit": "user_id", "segments": ["country"],
        "stages": [{"name": "canary", "traffic": "5%", "min_duration": "24h"},
                   {"name": "full", "traffic": "100%"}],
        "guardrails": [{"metric": "error_rate", "tolerance": 0.002},
                       {"metric": "latency_ms", "above": 250, "tolerance": 0.01}],
    })


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


def _cores() -> tuple[set[int] | None, set[int] | None]:
    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None, None
    if len(available) < 2:
        return None, None
    return {available[0]}, {available[1]}


@contextmanager
def _server(args: list[str], url: str, ready: str, log: Path, cpus: set[int] | None, *,
            env: dict[str, str] | None = None,
            ready_status: tuple[int, ...] = (200,)) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_pin(cpus), env=env)
        try:
            wait_ready(url + ready, proc, log, " ".join(args[:4]), statuses=ready_status)
            yield proc
        finally:
            stop(proc, 30)


def _get_ok(url: str, statuses: tuple[int, ...]) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code in statuses
    except httpx.HTTPError:
        return False


# -- load ------------------------------------------------------------------------------------


def bodies(features: list[str], n: int = BODIES) -> list[str]:
    """The request bodies both servers get, cycling through ``n`` units."""
    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data
    countries = ("BR", "US", "DE", "FR", "IN")
    out = []
    for i in range(n):
        row = {f: float(v) for f, v in zip(features, x[i % len(x)], strict=True)}
        out.append(json.dumps({"unit": f"user-{i}", "context": {"country": countries[i % 5]},
                               "inputs": row}, separators=(",", ":")))
    return out


_LUA = """
local bodies = {}
local f = io.open("%(bodies)s", "r")
for line in f:lines() do bodies[#bodies + 1] = line end
f:close()
local i = 0
local done_count = 0
local limit = %(limit)d
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(authorization)s"
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "%(path)s", nil, bodies[i])
end
response = function(status, headers, body)
  done_count = done_count + 1
  if done_count >= limit then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d,'
    .. ' "non2xx": %%d, "errors": %%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout))
end
"""


def process_cpu(pid: int) -> float:
    """CPU seconds a process (all its threads) has used, from ``/proc`` (0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, path: str, bodies_file: Path, *, seconds: float, limit: int,
            concurrency: int, cpus: set[int] | None, workdir: Path,
            authorization: str) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(_LUA % {"bodies": bodies_file, "limit": limit, "path": path,
                              "authorization": authorization})
    cpu0 = _cpu_children()
    start = time.perf_counter()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60,
        preexec_fn=_pin(cpus), check=True)
    wall = time.perf_counter() - start
    cpu = _cpu_children() - cpu0
    line = next(x for x in out.stdout.splitlines() if x.startswith("{"))
    doc = json.loads(line)
    return {"requests": doc["requests"], "seconds": doc["duration_us"] / 1e6,
            "p50_ms": doc["p50_us"] / 1000, "p99_ms": doc["p99_us"] / 1000,
            "errors": doc["non2xx"] + doc["errors"], "client_cpu": cpu / wall}


def run_python_load(url: str, path: str, bodies_file: Path, *, seconds: float, limit: int,
                    concurrency: int, cpus: set[int] | None, workdir: Path,
                    authorization: str) -> dict[str, float]:
    cpu0 = _cpu_children()
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "safeshift.bench.gateway", "load", url + path, str(bodies_file),
         str(seconds), str(limit), str(concurrency), authorization], capture_output=True,
        text=True,
        timeout=seconds + 60, preexec_fn=_pin(cpus), check=True)
    wall = time.perf_counter() - start
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["client_cpu"] = (_cpu_children() - cpu0) / wall
    return {k: float(v) for k, v in doc.items()}


async def _python_load(url: str, bodies_file: Path, seconds: float, limit: int,
                       concurrency: int, authorization: str) -> dict[str, float]:
    """Keep-alive HTTP/1.1 on raw sockets: ``concurrency`` connections, each one request at a
    time, until ``seconds`` pass or ``limit`` responses arrive."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payloads = [
        (f"POST {parts.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
         f"Authorization: {authorization}\r\n"
         f"Content-Length: {len(b)}\r\n\r\n").encode() + b.encode()
        for b in bodies_file.read_text().splitlines()]
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal errors, counter
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        try:
            while time.perf_counter() < deadline and counter < limit:
                counter += 1
                t0 = time.perf_counter()
                writer.write(payloads[i % len(payloads)])
                i += concurrency
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {"requests": len(latencies), "seconds": elapsed, "p50_ms": q(0.5),
            "p99_ms": q(0.99), "errors": errors}


# -- the benchmark ---------------------------------------------------------------------------


def _client_token(store_path: Path) -> str:
    """A data-plane token in the gateway's store, for the load generator."""
    from safeshift import ops
    from safeshift.auth import Role
    from safeshift.clock import SystemClock
    from safeshift.store import open_store

    store = open_store(store_path)
    try:
        token, _ = ops.create_token(store, SystemClock(), name="bench-load", role=Role.CLIENT,
                                    expires_in=3600.0)
    finally:
        store.close()
    return token


def main(*, quick: bool, requests: int | None, concurrency: int, json_path: Path | None,
         console: Console) -> dict[str, Any]:
    seconds = 4.0 if quick else 10.0
    rounds = 1 if quick else 3
    limit = requests or (20_000 if quick else 100_000)
    server_cpus, client_cpus = _cores()
    use_wrk = shutil.which("wrk") is not None
    load = run_wrk if use_wrk else run_python_load
    with tempfile.TemporaryDirectory(prefix="safeshift-bench-") as tmp:
        work = Path(tmp)
        console.print("training the model ...", markup=False)
        baseline, candidate, features = train(work)
        bodies_file = work / "bodies.txt"
        bodies_file.write_text("\n".join(bodies(features)) + "\n")
        plan = work / "plan.json"
        plan.write_text(_plan(baseline, candidate))
        ports = {name: free_port() for name in ("direct", "gateway", "minimal")}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        env = {**os.environ, "SAFESHIFT_FLUSH_INTERVAL": "1"}
        # the gateway as shipped checks a client token on every request; every target gets
        # the same header, so each parses the same bytes
        authorization = f"Bearer {_client_token(work / 'store.db')}"
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": [], "minimal": []}
        paths = {"direct": "/predict", "gateway": "/v1/endpoints/churn/predict",
                 "minimal": "/predict"}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        with contextlib.ExitStack() as stack:
            for kind in ("direct", "minimal"):
                procs[kind] = stack.enter_context(_server(
                    [sys.executable, "-m", "safeshift.bench.gateway", kind, str(baseline),
                     str(ports[kind])], urls[kind], "/", work / f"{kind}.log", server_cpus,
                    ready_status=(404, 405)))
            procs["gateway"] = stack.enter_context(_server(
                [sys.executable, "-m", "safeshift.cli", "serve", str(plan), "--store",
                 str(work / "store.db"), "--port", str(ports["gateway"])], urls["gateway"],
                "/readyz", work / "gateway.log", server_cpus, env=env))
            for name in runs:  # warm up
                load(urls[name], paths[name], bodies_file, seconds=1.0, limit=limit,
                     concurrency=concurrency, cpus=client_cpus, workdir=work,
                     authorization=authorization)
            for r in range(rounds):
                for name in runs:
                    cpu0 = process_cpu(procs[name].pid)
                    res = load(urls[name], paths[name], bodies_file, seconds=seconds,
                               limit=limit, concurrency=concurrency, cpus=client_cpus,
                               workdir=work, authorization=authorization)
                    res["rps"] = res["requests"] / res["seconds"]
                    res["server_cpu_us"] = (process_cpu(procs[name].pid) - cpu0) \
                        / max(1.0, res["requests"]) * 1e6
                    runs[name].append(res)
                    console.print(f"round {r + 1}/{rounds} {name:8} {res['rps']:8,.0f} req/s  "
                                  f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms  "
                                  f"server CPU {res['server_cpu_us']:.0f} µs/request  "
                                  f"load generator CPU {res['client_cpu']:.0%}", markup=False)
            # latency without queueing: one connection, one request at a time
            single: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
            for _ in range(rounds):
                for name in runs:
                    single[name].append(load(
                        urls[name], paths[name], bodies_file, seconds=seconds / 2,
                        limit=limit, concurrency=1, cpus=client_cpus, workdir=work,
                        authorization=authorization))
            stats = _gateway_stats(urls["gateway"])
    result = _summarise(runs, use_wrk=use_wrk, concurrency=concurrency, seconds=seconds,
                        limit=limit, pinned=server_cpus is not None)
    for name, rs in single.items():
        result[name]["p50_ms_1conn"] = round(statistics.median(r["p50_ms"] for r in rs), 3)
        result[name]["p99_ms_1conn"] = round(statistics.median(r["p99_ms"] for r in rs), 3)
    result["added_p50_ms_1conn"] = round(result["gateway"]["p50_ms_1conn"]
                                         - result["direct"]["p50_ms_1conn"], 3)
    result["gateway_served"] = stats
    _render(result, console)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _gateway_stats(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "safeshift_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[s.labels["arm"]] = out.get(s.labels["arm"], 0.0) + s.value
    return out


def _summarise(runs: dict[str, list[dict[str, float]]], **info: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {"rps": round(statistics.median(r["rps"] for r in rs), 1),
                     "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 3),
                     "p99_ms": round(statistics.median(r["p99_ms"] for r in rs), 3),
                     "errors": int(sum(r["errors"] for r in rs)),
                     "server_cpu_us_per_request": round(
                         statistics.median(r["server_cpu_us"] for r in rs), 1),
                     "load_generator_cpu": round(max(r["client_cpu"] for r in rs), 3)}
    out["ratio_rps"] = round(out["gateway"]["rps"] / out["direct"]["rps"], 3)
    out["ratio_rps_minimal"] = round(out["gateway"]["rps"] / out["minimal"]["rps"], 3)
    out["added_p50_ms"] = round(out["gateway"]["p50_ms"] - out["direct"]["p50_ms"], 3)
    out["targets"] = {"ratio_rps": RPS_TARGET, "added_p50_ms": P50_TARGET_MS,
                      "met": out["ratio_rps"] >= RPS_TARGET
                      and out["added_p50_ms"] <= P50_TARGET_MS}
    out["setup"] = {"load_generator": "wrk" if info["use_wrk"] else "python-asyncio",
                    "concurrency": info["concurrency"], "seconds_per_run": info["seconds"],
                    "max_requests_per_run": info["limit"], "rounds": len(runs["direct"]),
                    "pinned": info["pinned"]}
    return out


def _render(result: dict[str, Any], console: Console) -> None:
    setup = result["setup"]
    table = Table(title=f"gateway vs direct — {setup['load_generator']}, "
                        f"{setup['concurrency']} connections, median of {setup['rounds']} "
                        f"run(s) of {setup['seconds_per_run']:g} s")
    for col in ("", "direct", "gateway", "gateway / direct", "minimal", "gateway / minimal"):
        table.add_column(col, justify="right")
    d, g, m = result["direct"], result["gateway"], result["minimal"]
    table.add_row("requests/s", f"{d['rps']:,.0f}", f"{g['rps']:,.0f}",
                  f"{result['ratio_rps']:.2f}× (target ≥ {RPS_TARGET})", f"{m['rps']:,.0f}",
                  f"{result['ratio_rps_minimal']:.2f}×")
    table.add_row("p50 ms", f"{d['p50_ms']:.2f}", f"{g['p50_ms']:.2f}",
                  f"{result['added_p50_ms']:+.2f} ms (target ≤ +{P50_TARGET_MS:g})",
                  f"{m['p50_ms']:.2f}", f"{g['p50_ms'] - m['p50_ms']:+.2f} ms")
    table.add_row("p99 ms", f"{d['p99_ms']:.2f}", f"{g['p99_ms']:.2f}",
                  f"{g['p99_ms'] / d['p99_ms']:.2f}×", f"{m['p99_ms']:.2f}",
                  f"{g['p99_ms'] / m['p99_ms']:.2f}×")
    table.add_row("p50 ms, 1 connection", f"{d['p50_ms_1conn']:.2f}",
                  f"{g['p50_ms_1conn']:.2f}", f"{result['added_p50_ms_1conn']:+.2f} ms",
                  f"{m['p50_ms_1conn']:.2f}", f"{g['p50_ms_1conn'] - m['p50_ms_1conn']:+.2f} ms")
    table.add_row("p99 ms, 1 connection", f"{d['p99_ms_1conn']:.2f}",
                  f"{g['p99_ms_1conn']:.2f}", "", f"{m['p99_ms_1conn']:.2f}", "")
    dc, gc, mc = (x["server_cpu_us_per_request"] for x in (d, g, m))
    table.add_row("server CPU µs/request", f"{dc:.0f}", f"{gc:.0f}", f"{gc - dc:+.0f} µs",
                  f"{mc:.0f}", f"{gc - mc:+.0f} µs")
    table.add_row("errors", str(d["errors"]), str(g["errors"]), "", str(m["errors"]), "")
    table.add_row("load generator CPU", f"{d['load_generator_cpu']:.0%}",
                  f"{g['load_generator_cpu']:.0%}", "", f"{m['load_generator_cpu']:.0%}", "")
    console.print(table)
    served = result.get("gateway_served") or {}
    if served:
        total = sum(served.values())
        share = served.get("candidate", 0.0) / total if total else 0.0
        console.print(f"gateway served {total:,.0f} predictions, {share:.1%} by the candidate "
                      "(canary 5%)", markup=False)
    verdict = "met" if result["targets"]["met"] else "NOT met"
    console.print(f"targets {verdict}: throughput ≥ {RPS_TARGET}× direct, added p50 ≤ "
                  f"{P50_TARGET_MS:g} ms", markup=False)


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m safeshift.bench.gateway")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for kind in ("direct", "minimal"):
        d = sub.add_parser(kind, help=f"run the {kind} server")
        d.add_argument("model")
        d.add_argument("port", type=int)
    lg = sub.add_parser("load", help="the Python load generator")
    lg.add_argument("url")
    lg.add_argument("bodies", type=Path)
    lg.add_argument("seconds", type=float)
    lg.add_argument("limit", type=int)
    lg.add_argument("concurrency", type=int)
    lg.add_argument("authorization")
    args = parser.parse_args(argv)
    if args.cmd in ("direct", "minimal"):
        _run_app(args.cmd, args.model, args.port)
    else:
        res = asyncio.run(_python_load(args.url, args.bodies, args.seconds, args.limit,
                                       args.concurrency, args.authorization))
        sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    _cli(sys.argv[1:])
