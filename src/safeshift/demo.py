"""``safeshift demo``: two real rollouts, end to end, on the embedded SQLite store.

1. Trains two scikit-learn models on the breast-cancer data that scikit-learn ships: ``v1`` on
   four features, ``v2`` on all thirty (genuinely better).
2. Rolls ``v2`` out against ``v1``: shadow, 5%, then 50% after a (simulated) person approves,
   then everyone. Labels arrive minutes later and feed the accuracy guardrail.
3. Rolls ``v3`` out against ``v2``. ``v3`` carries a locale bug: it cannot parse the decimal
   commas in requests from Brazil. The users hit by it get ``v2``'s answer, and the rollout is
   rolled back with the guardrail, the segment and the evidence named.

Traffic runs on a virtual clock through the production code path (assignment, telemetry,
feedback joins, the controller); the models are real and really called.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from safeshift.clock import VirtualClock
from safeshift.models import ModelResult
from safeshift.plan import Plan
from safeshift.progress import rollout_now, virtual_time_progress
from safeshift.rollout import Rollout
from safeshift.simulate import Population, Request, drive
from safeshift.state import Decision, Phase
from safeshift.store import SQLStore, sqlite_url

MIX = {
    "country": {"US": 0.35, "BR": 0.2, "IN": 0.15, "GB": 0.1, "DE": 0.1, "JP": 0.1},
    "plan": {"free": 0.6, "pro": 0.38, "internal": 0.02},
}

V3_MODULE = '''"""Candidate v3: v2 behind a new input parser that reads numbers the way the user's locale
writes them. The bug: rows from Brazil arrive as "14,2", which the parser rejects."""

from pathlib import Path

import joblib

_V2 = joblib.load(Path(__file__).parent / "models" / "diagnosis_v2.joblib")


class CandidateV3:
    def __init__(self):
        self.model = _V2["model"]
        self.features = _V2["features"]

    def _matrix(self, rows):
        out = []
        for row in rows:
            if row.get("country") == "BR" and row["mean_radius"] % 1 >= 0.5:
                raise ValueError(f"could not convert string to float: '{row['mean_radius']:.1f}'"
                                 .replace(".", ","))
            out.append([row[f] for f in self.features])
        return out

    def predict(self, rows):
        return self.model.predict(self._matrix(rows)).tolist()

    def predict_proba(self, rows):
        return self.model.predict_proba(self._matrix(rows))
'''


def _feature_names(raw: Sequence[str]) -> list[str]:
    return [str(n).replace(" ", "_") for n in raw]


def train_models(directory: Path, seed: int = 7) -> dict[str, float]:
    """Train v1 and v2, write them as joblib bundles, return their held-out accuracy."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    names = _feature_names(data.feature_names)
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.4, random_state=seed, stratify=data.target)
    models_dir = directory / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    scores = {}
    for version, columns in (("v1", list(range(4))), ("v2", list(range(30)))):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        model.fit(x_train[:, columns], y_train)
        scores[version] = float(model.score(x_test[:, columns], y_test))
        joblib.dump({"model": model, "features": [names[c] for c in columns]},
                    models_dir / f"diagnosis_{version}.joblib")
    np.save(models_dir / "traffic_x.npy", x_test)
    np.save(models_dir / "traffic_y.npy", y_test)
    (directory / "demo_models.py").write_text(V3_MODULE)
    return scores


def demo_plans(quick: bool) -> list[dict[str, Any]]:
    scale = 1 if quick else 2
    common = {
        "endpoint": "diagnosis",
        "unit": "user_id",
        "segments": ["country", "plan"],
        "targeting": {"always_candidate": {"plan": ["internal"]},
                      "never_candidate": {"country": ["DE"]}},
        "analysis": {"alpha": 0.05, "on_inconclusive": "hold", "expected_samples": 1500},
        "serving": {"label_window": "1d"},
    }
    guardrails = [
        {"metric": "error_rate", "tolerance": 0.005},
        {"metric": "latency_ms", "above": 250, "tolerance": 0.02},
        {"metric": "accuracy", "source": "feedback", "tolerance": 0.03},
    ]
    good = {
        "rollout": "diagnosis-v2",
        "baseline": {"version": "v1", "model": "joblib:models/diagnosis_v1.joblib"},
        "candidate": {"version": "v2", "model": "joblib:models/diagnosis_v2.joblib"},
        "change": {"summary": "All 30 measurements instead of the first 4",
                   "why": "held-out accuracy up (see the demo output)", "owner": "ml-platform",
                   "validation": "stratified 40% holdout of the breast-cancer data"},
        "stages": [
            {"name": "shadow", "shadow": "100%", "min_duration": f"{5 * scale}m",
             "min_samples": 1000},
            {"name": "canary", "traffic": "5%", "min_duration": f"{10 * scale}m",
             "min_samples": 300},
            {"name": "half", "traffic": "50%", "min_duration": f"{15 * scale}m",
             "min_samples": 1000, "approval": "required"},
            {"name": "full", "traffic": "100%"},
        ],
        "guardrails": [*guardrails, {"metric": "disagreement", "stage": "shadow", "max": 0.15}],
        **common,
    }
    bad = {
        "rollout": "diagnosis-v3",
        "baseline": {"version": "v2", "model": "joblib:models/diagnosis_v2.joblib"},
        "candidate": {"version": "v3", "model": "python:demo_models:CandidateV3"},
        "change": {"summary": "Locale-aware input parsing", "owner": "ml-platform",
                   "why": "clients in more countries send localised numbers",
                   "validation": "unit tests on en-US inputs"},
        "stages": [
            {"name": "canary", "traffic": "5%", "min_duration": f"{10 * scale}m",
             "min_samples": 300},
            {"name": "quarter", "traffic": "25%", "min_duration": f"{15 * scale}m",
             "min_samples": 1000},
            {"name": "full", "traffic": "100%"},
        ],
        "guardrails": guardrails,
        **common,
    }
    return [good, bad]


class ModelResponder:
    """Calls the rollout's real model backends in batches; a failed batch is retried row by
    row so that one bad input fails only its own request, as it would when served alone."""

    def __init__(self, rollout: Rollout, x: np.ndarray, y: np.ndarray, names: list[str],
                 rng: np.random.Generator) -> None:
        self.rollout = rollout
        self.names = names
        self.x = x
        self.y = y
        self.rng = rng

    def _network_ms(self, n: int) -> np.ndarray:
        return np.exp(math.log(45.0) + 0.45 * self.rng.standard_normal(n))

    def __call__(self, arm: str, requests: Sequence[Request]) -> list[ModelResult]:
        model = self.rollout.model(arm)
        rows = [{**r.row, "country": r.context.get("country")} for r in requests]
        network = self._network_ms(len(rows))
        batch = model.predict(rows)
        if batch.ok and batch.outputs is not None:
            each = batch.latency_ms / max(len(rows), 1)
            return [ModelResult(outputs=[o], latency_ms=each + float(network[i]))
                    for i, o in enumerate(batch.outputs)]
        out = []
        for i, row in enumerate(rows):
            single = model.predict([row])
            single.latency_ms += float(network[i])
            out.append(single)
        return out

    def rows(self, rng: np.random.Generator, n: int) -> tuple[list[Any], list[Any]]:
        idx = rng.integers(0, len(self.x), size=n)
        return ([dict(zip(self.names, map(float, self.x[i]), strict=True)) for i in idx],
                [int(self.y[i]) for i in idx])


def run_demo(directory: Path, *, quick: bool = False, seed: int = 7,
             console: Console | None = None) -> bool:
    """Run both rollouts; True when the good one was promoted and the bad one rolled back."""
    console = console or Console()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    store_path = directory / "safeshift.db"
    if store_path.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    started = time.perf_counter()
    scores = train_models(directory, seed)
    console.print(f"[bold]safeshift demo[/] — models trained on scikit-learn's breast-cancer data: "
                  f"v1 held-out accuracy {scores['v1']:.1%}, v2 {scores['v2']:.1%}")
    x = np.load(directory / "models" / "traffic_x.npy")
    y = np.load(directory / "models" / "traffic_y.npy")
    from sklearn.datasets import load_breast_cancer

    names = _feature_names(load_breast_cancer().feature_names)
    store = SQLStore(sqlite_url(store_path))
    rate = 30.0 if quick else 40.0
    summaries = []
    expected = {"diagnosis-v2": Phase.PROMOTED, "diagnosis-v3": Phase.ROLLED_BACK}
    for i, data in enumerate(demo_plans(quick)):
        plan_path = directory / f"{data['rollout']}.yaml"
        plan_path.write_text(yaml.safe_dump(data, sort_keys=False))
        plan = Plan.load(plan_path)
        clock = VirtualClock()
        rng = np.random.default_rng(seed + i)
        rollout = Rollout.from_plan(plan, store=store, clock=clock)
        rollout.load_models()
        responder = ModelResponder(rollout, x, y, names, rng)
        console.print()
        console.print(f"[bold]{plan.rollout}[/]: {plan.candidate.version} against "
                      f"{plan.baseline.version} — {plan.change.summary}; stages "
                      + " → ".join(s.name for s in plan.stages))
        start = clock.now()
        lines: list[str] = []

        def told(d: Decision, now: float, start: float = start, lines: list[str] = lines) -> None:
            minutes = (now - start) / 60
            text = f"  [{minutes:5.1f} min] {d.action} → {d.phase}: {d.reason}"
            lines.append(text)
            console.print(text, markup=False, highlight=False)

        max_seconds = 4 * 3600.0
        with virtual_time_progress(console, max_seconds, partial(rollout_now, rollout)) as moved:
            totals = drive(rollout, clock, respond=responder, rows=responder.rows,
                           population=Population(MIX, 20_000, rng), rng=rng, rate=rate,
                           max_seconds=max_seconds, label_delay=180.0, label_share=0.6,
                           approve_after=300.0, on_decision=told, on_progress=moved)
        state = rollout.state()
        last = rollout.decisions()[-1] if rollout.decisions() else None
        summaries.append((plan, state.phase, clock.now() - start, totals,
                          last.reason if last else ""))
        rollout.close()

    table = Table(title="summary")
    for col in ("rollout", "change", "outcome", "virtual time", "requests", "to candidate",
                "faults caught"):
        table.add_column(col, justify="right" if col in ("requests", "to candidate",
                                                          "faults caught") else "left")
    ok = True
    for plan, phase, seconds, (n, nc, fb, _labels), _why in summaries:
        ok &= phase is expected[plan.rollout]
        colour = "green" if phase is Phase.PROMOTED else "red"
        table.add_row(plan.rollout, f"{plan.baseline.version} → {plan.candidate.version}",
                      f"[{colour}]{phase}[/]", f"{seconds / 60:.0f} min", f"{n:,}", f"{nc:,}",
                      f"{fb:,}")
    console.print()
    console.print(table)
    console.print("(faults caught: candidate failures whose users got the baseline's answer)")
    for plan, phase, _seconds, _totals, why in summaries:
        console.print(f"{plan.rollout} {phase}: {why}", markup=False)
    console.print(f"store: {store_path}  (finished in {time.perf_counter() - started:.1f}s)")
    console.print(f"look closer:  safeshift history diagnosis-v3 --store {store_path}")
    console.print(f"              safeshift audit verify diagnosis-v3 --store {store_path}")
    console.print(f"              safeshift explain diagnosis-v3 --store {store_path}")
    console.print(f"              safeshift report diagnosis-v3 -o report.html --store {store_path}")
    console.print(f"              safeshift dashboard --no-auth --store {store_path}  "
                  "(then open http://127.0.0.1:8080/)")
    store.close()
    if not ok:
        console.print("[red]unexpected outcome: the demo did not go as designed[/]")
    return ok


def write_example_models(examples: Path, seed: int = 7) -> None:
    """Train the stand-in models that ``examples/churn/plan.yaml`` names: two logistic
    regressions on the same four breast-cancer measurements (so that one request body serves
    both), differently regularised."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    names = _feature_names(data.feature_names)[:4]
    target = examples / "churn" / "models"
    target.mkdir(parents=True, exist_ok=True)
    for version, c in (("v1", 0.05), ("v2", 1.0)):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=c))
        model.fit(data.data[:, :4], data.target)
        joblib.dump({"model": model, "features": names}, target / f"churn_{version}.joblib")


__all__ = ["run_demo", "train_models", "write_example_models"]

if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--write-examples":
        write_example_models(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m safeshift.demo --write-examples DIR")
