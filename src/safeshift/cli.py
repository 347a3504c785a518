"""The ``safeshift`` command: one verb a subcommand, thin over the library.

Exit codes: 0 success, 2 bad input (an invalid plan, an unknown rollout, an action that does
not fit the rollout's state), 1 anything unexpected.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from safeshift import ops
from safeshift._units import printable
from safeshift.errors import PlanError, PlanValidationError, SafeshiftError


def _flags_without_a_type() -> None:
    """Typer's help shows every option's type, ``--json <bool>`` included, as if a flag took a
    value; show none for flags."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_safeshift", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich._safeshift = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_a_type()

app = typer.Typer(
    name="safeshift",
    help="Safe, incremental rollout of machine-learning model changes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plan_app = typer.Typer(help="Work with plan files.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures side by side.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
store_app = typer.Typer(help="The store itself.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")
app.add_typer(bench_app, name="bench")
app.add_typer(audit_app, name="audit")
app.add_typer(store_app, name="store")

out = Console(highlight=False, soft_wrap=True, emoji=False,
              width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="SAFESHIFT_STORE",
                 help="store URL or SQLite path (default ./safeshift.db)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
ActorOpt = Annotated[
    str | None, typer.Option("--actor", envvar="SAFESHIFT_ACTOR", help="who is acting (audit)")
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why (recorded in the audit log)")]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"error: {printable(message)}", markup=False)
    raise typer.Exit(code)


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("USER") or "cli"


# -- plans -------------------------------------------------------------------------------


def _model_ref_problems(path: Path, known: set[str], *, load: bool) -> list[Any]:
    """Problems loading the model references of a plan that did not validate, read from the
    raw document (references whose fields already have a problem are skipped)."""
    import yaml

    from safeshift.models import check_model_refs

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(doc, dict):
        return []
    sides = [("baseline", doc.get("baseline")), ("candidate", doc.get("candidate"))]
    challengers = doc.get("challengers")
    if isinstance(challengers, list):
        sides += [(f"challengers.{i}", c) for i, c in enumerate(challengers)]
    refs = [(f"{where}.model", side["model"]) for where, side in sides
            if isinstance(side, dict) and isinstance(side.get("model"), str) and side["model"]
            and not any(k == where or k.startswith(f"{where}.") for k in known)]
    return check_model_refs(refs, path.parent, load=load)


@app.command()
def validate(
    plan: Annotated[Path, typer.Argument(help="plan file (YAML or JSON)")],
    json_out: JsonOpt = False,
    load: Annotated[bool, typer.Option(
        "--load", help="also load the models: imports python: modules and unpickles joblib: "
        "files, which runs their code — only for plans you trust")] = False,
) -> None:
    """Check a plan: every problem at once, each with its field path; exit 2 if any. Model
    references are checked without running anything they name unless --load is given."""
    from safeshift.models import check_models
    from safeshift.plan import Plan, tolerance_warnings

    p: Plan | None = None
    try:
        p = Plan.load(plan)
    except PlanValidationError as exc:
        # the model references that are well-formed are checked too: every problem at once
        problems = [*exc.problems,
                    *_model_ref_problems(plan, {pr.path for pr in exc.problems}, load=load)]
    except PlanError as exc:
        fail(str(exc))
    else:
        problems = check_models(p, load=load)
    if problems or p is None:
        if json_out:
            out.print_json(data={"valid": False, "problems": [
                {"path": pr.path, "message": pr.message} for pr in problems]})
        else:
            err.print(f"{plan}: {len(problems)} problem(s)", markup=False)
            for pr in problems:
                err.print(f"  {pr}", markup=False)
        raise typer.Exit(2)
    warnings = tolerance_warnings(p)
    if json_out:
        out.print_json(data={"valid": True, "rollout": p.rollout, "hash": p.hash,
                             "warnings": warnings})
        return
    out.print(f"ok: {plan} — rollout {p.rollout!r} on endpoint {p.endpoint!r}, "
              f"{len(p.stages)} stages, {len(p.guardrails)} guardrails (plan {p.hash[:12]})",
              markup=False)
    for w in warnings:
        out.print(f"warning: {w}", markup=False)


@app.command()
def schema() -> None:
    """Print the plan's JSON Schema (for editors and CI)."""
    from safeshift.plan import plan_json_schema

    sys.stdout.write(json.dumps(plan_json_schema(), indent=2) + "\n")


@plan_app.command("duration")
def plan_duration(
    plan: Annotated[Path, typer.Argument(help="plan file")],
    rate: Annotated[str, typer.Option("--rate", help="expected traffic, e.g. 50/s, 3000/m")],
    baseline: Annotated[list[str] | None, typer.Option(
        "--baseline", help="baseline level of a metric, e.g. error_rate=0.01 (repeatable)")] = None,
    label_share: Annotated[float, typer.Option(
        "--label-share", help="share of requests that get a label")] = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """Estimate how long each stage needs to prove safety at the given traffic."""
    from safeshift.duration import estimate_durations, parse_baselines, parse_rate, render
    from safeshift.plan import Plan

    try:
        p = Plan.load(plan)
        report = estimate_durations(p, parse_rate(rate), parse_baselines(baseline or []),
                                    label_share=label_share)
    except (PlanError, ValueError) as exc:
        fail(str(exc))
    if json_out:
        out.print_json(data=report.to_json())
    else:
        render(report, out)


# -- running -----------------------------------------------------------------------------


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="smaller traffic; under a minute")] = False,
    directory: Annotated[Path, typer.Option("--dir", help="where models and the store go")] = Path(
        "safeshift-demo"),
    seed: Annotated[int, typer.Option("--seed")] = 7,
) -> None:
    """Train two real models and run two rollouts: one promoted, one rolled back."""
    from safeshift.demo import run_demo

    try:
        ok = run_demo(directory, quick=quick, seed=seed, console=out)
    except SafeshiftError as exc:
        fail(str(exc), 1)
    raise typer.Exit(0 if ok else 1)


@app.command()
def simulate(
    plan: Annotated[Path | None, typer.Argument(help="plan file")] = None,
    scenario: Annotated[str, typer.Option("--scenario", help="see --list")] = "good",
    seed: Annotated[int, typer.Option("--seed")] = 1,
    rate: Annotated[float | None, typer.Option(
        "--rate", min=0.001, help="requests per virtual second (default: the scenario's, 20)")] = None,
    hours: Annotated[float, typer.Option("--hours", min=0.001, help="virtual time limit")] = 48.0,
    store: Annotated[str | None, typer.Option(
        "--store", help="store URL or SQLite path (default: in memory)")] = None,
    json_out: JsonOpt = False,
    list_scenarios: Annotated[bool, typer.Option("--list", help="list the scenarios")] = False,
) -> None:
    """Run a rollout on a virtual clock with synthetic traffic and tell the story."""
    from safeshift.plan import Plan
    from safeshift.simulate import SCENARIOS, get_scenario
    from safeshift.simulate import simulate as run

    if list_scenarios:
        for name, sc in SCENARIOS.items():
            out.print(f"{name:18} {sc.description}", markup=False)
        return
    if plan is None:
        fail("give a plan file, e.g. safeshift simulate examples/churn/plan.yaml")
    try:
        p = Plan.load(plan)
        sc = get_scenario(scenario)
    except (PlanError, KeyError) as exc:
        fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    if sc.challengers and not p.challengers:
        err.print(f"warning: scenario {scenario!r} describes challengers, but the plan has none",
                  markup=False)
    result = run(p, sc, seed=seed, rate=rate or sc.rate or 20.0, max_hours=hours, store=store,
                 console=None if json_out else out)
    if json_out:
        out.print_json(data=result.to_json())


@app.command()
def serve(
    plans: Annotated[list[Path], typer.Argument(help="one or more plan files")],
    store: StoreOpt = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    controller: Annotated[bool, typer.Option(
        "--controller/--no-controller", help="run the controller in this process")] = True,
    tick: Annotated[float, typer.Option("--tick", help="seconds between controller ticks")] = 1.0,
) -> None:
    """Serve predictions for the plans' endpoints while their rollouts run."""
    from safeshift.gateway.server import serve as run_server

    try:
        run_server(plans, store=store, host=host, port=port, controller=controller,
                   tick_interval=tick)
    except (PlanError, SafeshiftError) as exc:
        fail(str(exc))


# -- control -----------------------------------------------------------------------------


def _open(store: str | None, *, migrate: bool = True) -> Any:
    """The store to read or act on; a path that does not exist is a typo, not a new store.
    Commands that only read open it with ``migrate=False``: they never create or upgrade it."""
    from safeshift.store import DEFAULT_STORE, open_store

    path = store if store is not None else DEFAULT_STORE
    if "://" not in path and not Path(path).exists():
        fail(f"no store at {path}; give --store (or SAFESHIFT_STORE) the path a rollout wrote")
    try:
        return open_store(store, migrate=migrate)
    except SafeshiftError as exc:
        fail(str(exc))


@app.command()
def status(
    rollout: Annotated[str | None, typer.Argument(help="rollout name (default: all)")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show where each rollout is and what its guardrails say."""
    from safeshift._units import format_duration
    from safeshift.clock import SystemClock

    st = _open(store, migrate=False)  # reads only: never creates nor upgrades
    try:
        results = ops.statuses(st, SystemClock(), [rollout] if rollout else None)
    except SafeshiftError as exc:
        fail(str(exc))
    if json_out:
        out.print_json(data=[r.to_json() for r in results])
        return
    if not results:
        out.print(f"no rollouts in {st.url}", markup=False)
    for s in results:
        stage = s.stage or "-"
        out.print(f"{s.rollout} ({s.endpoint}): {s.phase} — stage {stage}, candidate "
                  f"{s.traffic / 100:g}% (shadow {s.shadow / 100:g}%)", markup=False)
        if s.reason:
            out.print(f"  {printable(s.reason)}", markup=False)
        if s.pending_stage is not None:
            out.print(f"  awaiting approval of stage {s.pending_stage!r}: safeshift approve "
                      f"{printable(s.rollout)} --reason …", markup=False)
        if s.watch is not None:
            out.print(f"  watch after promotion: {s.watch['holdback'] / 100:g}% of units held "
                      f"back on the baseline, {format_duration(s.watch['remaining'])} of "
                      f"{format_duration(s.watch['watch'])} left", markup=False)
        if s.request_faults:
            faults = ", ".join(f"{arm} {f['count']:,.0f} ({f['share']:.1%})"
                               for arm, f in s.request_faults.items())
            out.print(f"  request faults (inputs the baseline rejects; counted against neither "
                      f"model): {faults}", markup=False)
        if s.analysis:
            table = Table(show_header=True, header_style="bold", box=None)
            for col in ("guardrail", "segment", "verdict", "evidence"):
                table.add_column(col)
            for v in s.analysis.verdicts:
                if v.segment is None or v.status.value == "harm":
                    # segment values come from clients: escaped, and never read as markup
                    table.add_row(*(Text(printable(cell)) for cell in (
                        v.guardrail, v.segment or "all", v.status.value, v.sentence)))
            out.print(table)


def _action(action: str, rollout: str, store: str | None, actor: str | None, reason: str,
            json_out: bool) -> None:
    from safeshift.clock import SystemClock
    from safeshift.state import Action

    st = _open(store)
    try:
        decision = ops.act(st, rollout, Action(action), SystemClock(), actor=_actor(actor),
                           reason=reason)
    except SafeshiftError as exc:
        fail(str(exc))
    if json_out:
        out.print_json(data=decision.to_json())
    else:
        out.print(f"{printable(rollout)}: {decision.action} → {decision.phase}; "
                  f"{printable(decision.reason)}", markup=False)


_ACTIONS = {
    "approve": "Approve the stage a rollout is waiting for.",
    "pause": "Stop automatic decisions; traffic stays where it is.",
    "resume": "Resume a paused rollout.",
    "rollback": "Send all traffic back to the baseline now.",
    "promote": "Promote the candidate now, skipping the remaining stages.",
}


def _register_action(name: str, doc: str) -> None:
    def command(rollout: str, store: StoreOpt = None, actor: ActorOpt = None,
                reason: ReasonOpt = "", json_out: JsonOpt = False) -> None:
        _action(name, rollout, store, actor, reason, json_out)

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in _ACTIONS.items():
    _register_action(_name, _doc)


@app.command()
def history(rollout: str, store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """Every decision of a rollout, with its reason."""
    from datetime import UTC, datetime

    st = _open(store, migrate=False)  # reads only: never creates nor upgrades
    try:
        decisions = ops.history(st, rollout)
    except SafeshiftError as exc:
        fail(str(exc))
    if json_out:
        out.print_json(data=[d.to_json() for d in decisions])
        return
    for d in decisions:
        when = datetime.fromtimestamp(d.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        out.print(f"{d.seq:3} {when} {printable(d.actor):12} {d.action!s:15} → {d.phase!s:18} "
                  f"{printable(d.reason)}",
                  markup=False)


@audit_app.command("verify")
def audit_verify(rollout: str, store: StoreOpt = None) -> None:
    """Check that a rollout's audit log is complete and unaltered (exit 1 if not)."""
    st = _open(store, migrate=False)  # reads only: never creates nor upgrades
    try:
        ok, message = ops.verify_audit(st, rollout)
    except SafeshiftError as exc:
        fail(str(exc))
    (out if ok else err).print(f"{printable(rollout)}: {printable(message)}", markup=False)
    raise typer.Exit(0 if ok else 1)


@store_app.command("migrate")
def store_migrate(store: StoreOpt = None) -> None:
    """Upgrade a store's schema in place to this release's (serve does it on start)."""
    from safeshift.store import SCHEMA_VERSION

    st = _open(store)  # opening with migrate=True upgrades it
    out.print(f"{st.url}: schema version {SCHEMA_VERSION}", markup=False)
    st.close()


# -- benchmarks --------------------------------------------------------------------------


@bench_app.command("assign")
def bench_assign(
    quick: Annotated[bool, typer.Option("--quick")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
) -> None:
    """In-process Rollout.assign throughput on one core."""
    from safeshift.bench.assign import main as run

    run(quick=quick, json_path=json_path, console=out)


@bench_app.command("decisions")
def bench_decisions(
    quick: Annotated[bool, typer.Option("--quick", help="under 60 s")] = False,
    runs: Annotated[int | None, typer.Option("--runs", help="rollouts per cell")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="draw a PNG")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 2026,
) -> None:
    """safeshift's decisions against naive, threshold, Mann-Whitney and oracle methods."""
    from safeshift.bench.decisions import main as run

    run(quick=quick, runs=runs, json_path=json_path, plot_path=plot, seed=seed, console=out)


@bench_app.command("gateway")
def bench_gateway(
    quick: Annotated[bool, typer.Option("--quick")] = False,
    requests: Annotated[int | None, typer.Option("--requests", help="requests per target")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency")] = 32,
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
) -> None:
    """The gateway against the same model served directly, same load, side by side."""
    from safeshift.bench.gateway import main as run

    run(quick=quick, requests=requests, concurrency=concurrency, json_path=json_path, console=out)


@bench_app.command("tick")
def bench_tick(
    quick: Annotated[bool, typer.Option("--quick", help="1k and 10k cells, under 30 s")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
) -> None:
    """The controller tick's analysis against the stage's cells, beside the previous algorithm."""
    from safeshift.bench.tick import main as run

    run(quick=quick, json_path=json_path, console=out)


def _version(value: bool) -> None:
    if value:
        from safeshift import __version__

        out.print(f"safeshift {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version")] = False) -> None:
    """Safe, incremental rollout of machine-learning model changes."""


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SafeshiftError as exc:  # anything a command did not catch itself
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
