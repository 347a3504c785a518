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
audit_app = typer.Typer(help="The keyed, hash-chained audit log.", no_args_is_help=True)
store_app = typer.Typer(help="The store itself.", no_args_is_help=True)
token_app = typer.Typer(help="Access tokens: who may serve traffic, read and act (roles client, "
                             "viewer, operator, approver, admin).", no_args_is_help=True)
app.add_typer(plan_app, name="plan")
app.add_typer(bench_app, name="bench")
app.add_typer(audit_app, name="audit")
app.add_typer(store_app, name="store")
app.add_typer(token_app, name="token")
notify_app = typer.Typer(help="Webhook notifications: the store's outbox.", no_args_is_help=True)
app.add_typer(notify_app, name="notify")
privacy_app = typer.Typer(help="What the store holds about people.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")

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
    str | None, typer.Option("--actor", envvar="SAFESHIFT_ACTOR",
                             help="a label beside who acts (with --store: local:<you>)")
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why (required; recorded in the audit "
                                                           "log)")]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="SAFESHIFT_URL",
                 help="a running safeshift serve to act through (token from $SAFESHIFT_TOKEN) "
                      "instead of --store"),
]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"error: {printable(message)}", markup=False)
    raise typer.Exit(code)


def _actor(actor: str | None) -> str:
    """The label of someone acting on the store directly: their login, or what they said."""
    return actor or os.environ.get("USER") or "cli"


def _client(url: str) -> Any:
    from safeshift.client import Client

    if not os.environ.get("SAFESHIFT_TOKEN"):
        fail("--url needs a token in SAFESHIFT_TOKEN (an admin creates one with safeshift "
             "token create --role viewer --name you)")
    return Client(url)


def _read(url: str | None, remote: Any, store: str | None, local: Any) -> Any:
    """What a reading command shows: ``remote(client)`` from the server at ``url``, else
    ``local(store)`` from the store, opened read-only (never created nor upgraded)."""
    if url:
        return _remote(url, remote)
    st = _open(store, migrate=False)
    try:
        return local(st)
    except SafeshiftError as exc:
        fail(str(exc))


def _remote(url: str, call: Any) -> Any:
    """``call(client)`` against the server at ``url``; its error answers exit 2."""
    with _client(url) as client:
        try:
            return call(client)
        except SafeshiftError as exc:
            fail(str(exc))


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
    from safeshift.plan import Plan, plan_warnings

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
    warnings = plan_warnings(p)
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
def drill(
    plan: Annotated[Path, typer.Argument(help="plan file")],
    fault: Annotated[str, typer.Option(
        "--fault", help="errors, latency, wrong-segment, hang or all")] = "all",
    store: Annotated[str | None, typer.Option(
        "--store", help="store URL or SQLite path for the drill copies (default: temporary)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    against: Annotated[str | None, typer.Option(
        "--against", "--url", help="drill on this running safeshift serve (one replica's own "
        "address; an admin token in $SAFESHIFT_TOKEN) instead of in this process")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Rehearse the rollback path on a sandboxed copy of the rollout: inject faults into the
    candidate, drive traffic, report fault → decision, → last candidate answer, user errors.
    With --against, the copy runs on the server, on routes of its own: real users keep their
    rollout and their assignment."""
    from safeshift.drill import FAULTS, FaultReport, run_drill
    from safeshift.errors import ModelLoadError
    from safeshift.plan import Plan

    faults = list(FAULTS) if fault == "all" else [fault]

    def told(r: FaultReport) -> None:
        if json_out:
            return
        if r.skipped:
            out.print(f"{r.fault:14} skipped: {r.skipped}", markup=False)
            return
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f} s"
        out.print(f"{r.fault:14} {'rolled back' if r.rolled_back else 'NOT rolled back'}: "
                  f"fault → decision {s(r.decision_s)}, → last candidate answer "
                  f"{s(r.last_candidate_s)}, user-visible errors {r.user_errors}, "
                  f"{r.requests} requests ({r.candidate_answers} candidate answers, "
                  f"{r.fallbacks} fallbacks); caught by {r.caught_by or '-'}; audit: {r.audit}"
                  + (f"; rolled back BEFORE the fault: {r.early}" if r.early else ""),
                  markup=False)

    try:
        p = Plan.load(plan)
        token = os.environ.get("SAFESHIFT_TOKEN")
        if against is not None and store is not None:
            fail("--store is for drills in this process; with --against the drill copy is in "
                 "the server's store")
        if against is not None and not token:
            fail("--against needs an admin token in SAFESHIFT_TOKEN (an admin creates one with "
                 "safeshift token create --role admin --name drills)")
        report = run_drill(p, faults, store=store, seed=seed, on_fault=told, against=against,
                           token=token)
    except (PlanError, ModelLoadError) as exc:
        fail(str(exc))
    except SafeshiftError as exc:
        fail(str(exc), 1)
    if json_out:
        out.print_json(data=report.to_json())
    else:
        out.print(f"drill of {report.plan} in stage {report.stage!r} "
                  f"({report.traffic:.0%} candidate traffic), store {report.store}: "
                  + ("passed" if report.ok else "FAILED"), markup=False)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def serve(
    plans: Annotated[list[Path], typer.Argument(help="one or more plan files")],
    store: StoreOpt = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    controller: Annotated[bool, typer.Option(
        "--controller/--no-controller", help="run the controller in this process")] = True,
    tick: Annotated[float, typer.Option("--tick", help="seconds between controller ticks")] = 1.0,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="serve without tokens (local demos only: refused beyond loopback)")
    ] = False,
) -> None:
    """Serve predictions for the plans' endpoints while their rollouts run. Every route but
    health probes and /metrics needs a token (safeshift token create)."""
    from safeshift.gateway.server import serve as run_server

    try:
        run_server(plans, store=store, host=host, port=port, controller=controller,
                   tick_interval=tick, auth=not no_auth)
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
        # commands that only read open SQLite read-only too (a read-only mount, a backup)
        return open_store(store, migrate=migrate, read_only=not migrate)
    except SafeshiftError as exc:
        fail(str(exc))


@app.command()
def status(
    rollout: Annotated[str | None, typer.Argument(help="rollout name (default: all)")] = None,
    store: StoreOpt = None,
    url: UrlOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show where each rollout is and what its guardrails say."""
    from safeshift.clock import SystemClock

    where: list[str] = [url or ""]

    def local(st: Any) -> Any:
        where[0] = st.url
        return [s.to_json() for s in ops.statuses(st, SystemClock(),
                                                   [rollout] if rollout else None)]

    results = _read(url, lambda c: [c.status(rollout)] if rollout else c.rollouts(), store,
                    local)
    if json_out:
        out.print_json(data=results)
        return
    if not results:
        out.print(f"no rollouts in {where[0]}", markup=False)
    for s in results:
        _render_status(s)


def _render_status(s: dict[str, Any]) -> None:
    """One rollout's status (its JSON form, from the store or a server alike)."""
    from safeshift._units import format_duration

    out.print(f"{printable(s['rollout'])} ({printable(s['endpoint'])}): {s['phase']} — stage "
              f"{printable(s['stage'] or '-')}, candidate {s['traffic'] * 100:g}% (shadow "
              f"{s['shadow'] * 100:g}%)", markup=False)
    if s["reason"]:
        out.print(f"  {printable(s['reason'])}", markup=False)
    approval = s.get("approval")
    for r in (approval or {}).get("reviews", []):
        note = f" ({printable(r['note'])})" if r.get("note") else ""
        state = (f"signed by {printable(r['signed_by'])}" if r["signed_by"] else
                 f"waiting: safeshift review {printable(s['rollout'])} --as {r['role']} "
                 "--reason …")
        out.print(f"  {r['role']} review{note}: {state}", markup=False)
    if approval is not None and approval.get("role") is None:
        pass  # reviews only: said above
    elif approval is not None:
        who = (f"{approval['needed']} more approver(s) with role {approval['role']} or higher"
               if approval["approvers"] > 1 else f"an approver with role {approval['role']} or "
               "higher")
        done = (f"; approved by {', '.join(printable(a) for a in approval['approved_by'])}"
                if approval["approved_by"] else "")
        creator = (f"; not its creator {printable(approval['excluded_creator'])}"
                   if approval["excluded_creator"] else "")
        out.print(f"  awaiting approval of stage {printable(approval['stage'])!r} by {who}"
                  f"{done}{creator}: safeshift approve {printable(s['rollout'])} --reason …",
                  markup=False)
    elif s["pending_stage"] is not None:
        out.print(f"  awaiting approval of stage {printable(s['pending_stage'])!r}: safeshift "
                  f"approve {printable(s['rollout'])} --reason …", markup=False)
    watch = s.get("watch")
    if watch is not None:
        out.print(f"  watch after promotion: {watch['holdback'] * 100:g}% of units held back on "
                  f"the baseline, {format_duration(watch['remaining'])} of "
                  f"{format_duration(watch['watch'])} left", markup=False)
    if s["request_faults"]:
        faults = ", ".join(f"{arm} {f['count']:,.0f} ({f['share']:.1%})"
                           for arm, f in s["request_faults"].items())
        out.print(f"  request faults (inputs the baseline rejects; counted against neither "
                  f"model): {faults}", markup=False)
    if s.get("label_conflicts"):
        conflicts = ", ".join(f"{printable(sig)} {n:,.0f}"
                              for sig, n in s["label_conflicts"].items())
        out.print(f"  conflicting labels (two clients disagree; the first counts): {conflicts}",
                  markup=False)
    if s["analysis"]:
        table = Table(show_header=True, header_style="bold", box=None)
        for col in ("guardrail", "segment", "verdict", "evidence"):
            table.add_column(col)
        for v in s["analysis"]["verdicts"]:
            if v["segment"] is None or v["status"] == "harm":
                # segment values come from clients: escaped, and never read as markup
                table.add_row(*(Text(printable(cell)) for cell in (
                    v["guardrail"], v["segment"] or "all", v["status"], v["sentence"])))
        out.print(table)


def _action(action: str, rollout: str, store: str | None, url: str | None,
            actor: str | None, reason: str, json_out: bool) -> None:
    from safeshift.clock import SystemClock
    from safeshift.state import Action

    if not reason.strip():
        fail(f"{action} needs --reason (it is recorded in the audit log), e.g. --reason "
             "'error budget spent'")
    if url:
        if actor:
            fail("--actor labels local access only; through --url you act as your token's "
                 "holder")
        decision = _remote(url, lambda c: c.act(rollout, action, reason=reason))
    else:
        st = _open(store)
        try:
            decision = ops.act(st, rollout, Action(action), SystemClock(), reason=reason,
                               actor=_actor(actor)).to_json()
        except SafeshiftError as exc:
            fail(str(exc))
    if json_out:
        out.print_json(data=decision)
    else:
        out.print(f"{printable(rollout)}: {decision['action']} → {decision['phase']}; "
                  f"{printable(decision['reason'])}", markup=False)


_ACTIONS = {
    "approve": "Approve the stage a rollout is waiting for (role approver).",
    "pause": "Stop automatic decisions; traffic stays where it is (role operator).",
    "resume": "Resume a paused rollout (role operator).",
    "rollback": "Send all traffic back to the baseline now (role operator).",
    "promote": "Promote the candidate now, skipping the remaining stages (role approver).",
}


def _register_action(name: str, doc: str) -> None:
    def command(rollout: str, reason: ReasonOpt = "", store: StoreOpt = None,
                url: UrlOpt = None, actor: ActorOpt = None, json_out: JsonOpt = False) -> None:
        _action(name, rollout, store, url, actor, reason, json_out)

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in _ACTIONS.items():
    _register_action(_name, _doc)


@app.command()
def create(
    plan: Annotated[Path, typer.Argument(help="plan file (YAML or JSON)")],
    store: StoreOpt = None,
    url: UrlOpt = None,
    start: Annotated[bool, typer.Option("--start/--no-start",
                                        help="begin the first stage now")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Register a rollout from a plan (role operator); safeshift serve then serves it."""
    from safeshift.clock import SystemClock
    from safeshift.plan import Plan, read_plan_file

    try:
        if url:
            data = read_plan_file(plan)
            Plan.from_dict(data, base_dir=plan.resolve().parent, source=str(plan))
        else:
            p = Plan.load(plan)
    except PlanError as exc:
        fail(str(exc))
    if url:
        result = _remote(url, lambda c: c.create(data, start=start))
    else:
        st = _open(store)
        try:
            ops.create(st, p, SystemClock(), start=start)
            result = ops.status(st, p, SystemClock()).to_json()
        except SafeshiftError as exc:
            fail(str(exc))
    if json_out:
        out.print_json(data=result)
    else:
        _render_status(result)


@app.command()
def history(rollout: str, store: StoreOpt = None, url: UrlOpt = None,
            json_out: JsonOpt = False,
            markdown: Annotated[bool, typer.Option(
                "--markdown", help="release notes: the change, its stages, every decision with "
                "its evidence and who acted, as Markdown")] = False) -> None:
    """Every decision of a rollout, with its reason."""
    from datetime import UTC, datetime

    if markdown:
        sys.stdout.write(_read(url, lambda c: c.release_notes(rollout), store,
                               lambda st: ops.release_notes(st, rollout)))
        return
    decisions = _read(url, lambda c: c.history(rollout), store,
                      lambda st: [d.to_json() for d in ops.history(st, rollout)])
    if json_out:
        out.print_json(data=decisions)
        return
    for d in decisions:
        when = datetime.fromtimestamp(d["at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        out.print(f"{d['seq']:3} {when} {printable(d['actor']):12} {d['action']:15} → "
                  f"{d['phase']:18} {printable(d['reason'])}", markup=False)


@app.command()
def review(
    rollout: str,
    role: Annotated[str, typer.Option("--as", help="the review role you sign off, e.g. privacy")],
    reason: ReasonOpt,
    store: StoreOpt = None,
    url: UrlOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Sign off a review the stage awaiting it needs (your token must hold that review role:
    safeshift token create --reviews ROLE); the last one starts the stage, unless it also needs
    an approval."""
    from safeshift.clock import SystemClock

    if url:
        d = _remote(url, lambda c: c.review(rollout, role, reason))
    else:
        st = _open(store)
        try:
            d = ops.review(st, rollout, role, SystemClock(), reason=reason,
                           actor=_actor(actor)).to_json()
        except SafeshiftError as exc:
            fail(str(exc))
        finally:
            st.close()
    out.print(f"{printable(d['rollout'])}: {d['action']} → {d['phase']}: "
              f"{printable(d['reason'])}", markup=False)


@app.command()
def explain(
    decision: Annotated[str, typer.Argument(
        help="ROLLOUT (every decision) or ROLLOUT#SEQ (one; SEQ as in safeshift history)")],
    seq: Annotated[int | None, typer.Argument(help="the decision's number (or ROLLOUT#SEQ)")] = None,
    what_if: Annotated[list[str] | None, typer.Option(
        "--what-if", help="re-run under another setting, e.g. tolerance.error_rate=0.005, "
        "alpha=0.01, stage.canary.min_samples=500 (repeat, or several in one: comma-free "
        "words separated by spaces)")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-derive stored decisions from what they were computed from and show that they match
    (exit 0; 1 if one does not); with --what-if, say whether one would have changed."""
    from safeshift import explain as ex

    rollout = decision
    if seq is None and "#" in decision:
        rollout, _, number = decision.rpartition("#")
        if not number.isdigit():
            fail(f"{decision!r}: write ROLLOUT#SEQ with SEQ a decision number, e.g. "
                 f"{rollout}#2")
        seq = int(number)
    settings: dict[str, Any] = {}
    try:
        settings = ex.parse_what_if([w for item in what_if or [] for w in item.split()])
    except SafeshiftError as exc:
        fail(str(exc))

    def run(st: Any) -> list[Any]:
        numbers = [seq] if seq is not None else [d.seq for d in ops.history(st, rollout)]
        return [ex.explain(st, rollout, n, what_if=settings or None) for n in numbers]

    explanations = _read(None, None, store, run)
    if json_out:
        out.print_json(data=[e.to_json() for e in explanations])
    else:
        for i, e in enumerate(explanations):
            if i:
                out.print("")
            for line in ex.explain_lines(e):
                out.print(line, markup=False)
    if any(e.matches is False for e in explanations):
        raise typer.Exit(1)


@app.command()
def report(
    rollout: str,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="the file to write (default: standard output)")] = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="html (one self-contained file, charts inline), md (for a pull "
        "request or wiki) or json (for tools)")] = "html",
    store: StoreOpt = None,
) -> None:
    """A rollout's report: what was tested, on how much traffic, what each guardrail showed
    and why it ended as it did — the dashboard's rollout page in one file."""
    from safeshift.clock import SystemClock
    from safeshift.report import FORMATS, render_report
    from safeshift.view import rollout_view

    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    text = _read(None, None, store, lambda st: render_report(
        rollout_view(st, rollout, SystemClock()), fmt))
    if output is None:
        sys.stdout.write(text)
        return
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, output)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}; choose a writable path with -o")
    err.print(f"wrote {output} ({len(text.encode()):,} bytes, {fmt})", markup=False)


@app.command()
def dashboard(
    store: StoreOpt = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8080,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="no sign-in: everyone acts as admin (loopback only)")] = False,
) -> None:
    """The web dashboard over a store, without serving models (safeshift serve has it at /
    too). Sign in with a token (safeshift token create --role viewer)."""
    import uvicorn

    from safeshift.dashboard.app import create_dashboard_app
    from safeshift.gateway.logs import configure_logging, gateway_logger
    from safeshift.gateway.server import check_listen, is_loopback

    if no_auth and not is_loopback(host):
        fail(f"refusing to serve the dashboard on {host} without sign-in: anyone who can reach "
             "it could steer rollouts; use 127.0.0.1, or create tokens and drop --no-auth")
    try:
        check_listen(host, port)
    except SafeshiftError as exc:
        fail(str(exc))
    st = _open(store, migrate=False)
    configure_logging()
    if not no_auth and not st.list_tokens():
        gateway_logger.warning("no tokens in the store: nobody can sign in; create one with "
                               "safeshift token create --role viewer --name you")
    gateway_logger.info("dashboard", extra={"url": f"http://{host}:{port}/", "store": st.url})
    try:
        uvicorn.run(create_dashboard_app(st, auth=not no_auth), host=host, port=port,
                    log_config=None, access_log=False, server_header=False)
    finally:
        st.close()


@app.command()
def pseudonym(
    attribute: Annotated[str, typer.Argument(help="the personal attribute, e.g. email")],
    values: Annotated[list[str], typer.Argument(help="raw values (read from here, not stored)")],
) -> None:
    """The pseudonym of each value of a personal attribute (plan rules on personal attributes
    list pseudonyms; the dashboard shows them). Uses $SAFESHIFT_PSEUDONYM_KEY[_FILE], else a key
    derived from the audit key; during a rotation also the pseudonym under the previous key."""
    from safeshift.pseudonym import PseudonymKeyError, pseudonymizer

    try:
        p = pseudonymizer()
    except PseudonymKeyError as exc:
        fail(str(exc))
    for value in values:
        names = p.candidates(attribute, value)
        extra = f"  (previous key: {names[1]})" if len(names) > 1 else ""
        out.print(f"{attribute}={names[0]}{extra}", markup=False)


@app.command()
def purge(
    rollout: Annotated[str | None, typer.Argument(help="one rollout (default: every one)")] = None,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", help="an age for every kind of record, e.g. 30d (default: each plan's "
        "retention)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count, delete nothing")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete records past their age: request records, report texts, telemetry and decision
    inputs of stages that ended, verdict snapshots. Decisions and the audit log stay (audit
    verify still passes)."""
    from safeshift._units import parse_duration
    from safeshift.clock import SystemClock

    age = None
    if older_than is not None:
        try:
            age = parse_duration(older_than)
        except ValueError as exc:
            fail(f"--older-than {older_than!r}: {exc}")
    st = _open(store)
    try:
        counts = ops.purge(st, SystemClock(), older_than=age, rollout=rollout, dry_run=dry_run)
    except SafeshiftError as exc:
        fail(str(exc))
    finally:
        st.close()
    if json_out:
        out.print_json(data=counts)
        return
    verb = "would delete" if dry_run else "deleted"
    for name, kinds in counts.items():
        said = ", ".join(f"{n:,} {kind}" for kind, n in kinds.items()) or "nothing (no retention)"
        out.print(f"{printable(name)}: {verb} {said}", markup=False)


@privacy_app.command("report")
def privacy_report(
    rollout: Annotated[str | None, typer.Argument(help="one rollout (default: every one)")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The data inventory per rollout: which attributes are kept and how, each kind of record
    with its count and oldest time, and the retention that applies."""
    from datetime import UTC, datetime

    from safeshift._units import format_duration

    rows = _read(None, None, store, lambda st: ops.privacy_report(st, rollout=rollout))
    if json_out:
        out.print_json(data=rows)
        return
    for r in rows:
        out.print(f"{printable(r['rollout'])} ({r['phase']})", markup=False)
        out.print(f"  unit {r['unit']['attribute']}: stored {r['unit']['stored']}", markup=False)
        for a in r["attributes"]:
            out.print(f"  segment {a['attribute']}: {a['stored_as']}", markup=False)
        consent = r["consent"]
        out.print(f"  consent: {'attribute ' + consent['attribute'] if consent else 'not asked'}",
                  markup=False)
        out.print(f"  request ids: {r['request_ids']}; report text: {r['report_text']}",
                  markup=False)
        for kind, info in r["records"].items():
            oldest = ("-" if info["oldest"] is None else
                      datetime.fromtimestamp(info["oldest"], UTC).strftime("%Y-%m-%d %H:%M UTC"))
            keep = r["retention"].get(kind)
            kept = f", kept {format_duration(keep)}" if keep else (
                ", kept for good" if kind in ("decisions", "audit") else "")
            out.print(f"  {kind:10} {info['count']:>10,.0f}  oldest {oldest}{kept}",
                      markup=False)


@app.command()
def lineage(
    decision: Annotated[str, typer.Argument(help="ROLLOUT#SEQ (SEQ as in safeshift history)")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """What a decision was computed from — which plan, which models (each artifact's digest
    checked against the file as it is now), which code, which data — exit 0 if everything
    still matches, 1 if an artifact or the plan changed."""
    from datetime import UTC, datetime

    from safeshift.lineage import trace

    rollout, _, number = decision.rpartition("#")
    if not rollout or not number.isdigit():
        fail(f"{decision!r}: write ROLLOUT#SEQ, e.g. checkout-v2#3 (safeshift history lists "
             "the numbers)")
    t = _read(None, None, store, lambda st: trace(st, rollout, int(number)))
    if json_out:
        out.print_json(data=t.to_json())
    else:
        when = datetime.fromtimestamp(t.at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        out.print(f"decision {t.seq} of {printable(t.rollout)}: {t.action} "
                  f"({t.from_stage or '-'} -> {t.to_stage or '-'}) at {when}", markup=False)
        held = ("the stored plan still has this hash" if t.plan_ok else
                "CHANGED: the stored plan no longer has this hash")
        out.print(f"plan     {t.plan_hash} ({held})", markup=False)
        out.print(f"code     safeshift {t.code or '(not recorded)'} (this is {t.code_now})",
                  markup=False)
        for m in t.models:
            where = m["path"] or m["model"] or "-"
            status = {"match": "matches the artifact", "changed": "CHANGED: the artifact now "
                      f"has {str(m.get('sha256_now'))[:16]}", "missing": "MISSING: the artifact "
                      "is not there", "reference": "served elsewhere: the reference is all "
                      "there is to check"}[m["status"]]
            out.print(f"model    {m['arm']} {m['version']} sha256 {str(m['sha256'])[:16]} "
                      f"{printable(where)}: {status}", markup=False)
        for key, value in t.data.items():
            out.print(f"data     {key}: {value}", markup=False)
    if not t.ok:
        raise typer.Exit(1)


@app.command()
def grafana(
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="the file to write (default: standard output)")] = None,
) -> None:
    """The Grafana dashboard for the gateway's /metrics (import it in Grafana, choosing your
    Prometheus data source): traffic and split, stage, latency, fallbacks and request faults,
    breaker, decisions, feedback, buffers, access errors, notifications."""
    from importlib import resources

    text = resources.files("safeshift").joinpath("data", "grafana-dashboard.json").read_text()
    _write_out(text, output)


def _write_out(text: str, output: Path | None) -> None:
    """``text`` on standard output, or in ``output`` (exit 2 when it cannot be written)."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}; choose a writable path with -o")
    err.print(f"wrote {output}", markup=False)


@app.command()
def nginx(
    replica: Annotated[list[str], typer.Option(
        "--replica", help="a replica's host:port (repeat for each)")],
    listen: Annotated[str, typer.Option("--listen", help="nginx's listen argument")] = "80",
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="the file to write (default: standard output)")] = None,
) -> None:
    """An nginx site for safeshift serve replicas (conf.d): keep-alive upstream, POSTs never
    resent once sent, client address and request id passed on (docs/gateway.md#replicas)."""
    from safeshift.nginx import render

    try:
        text = render(replica, listen=listen)
    except ValueError as exc:
        fail(str(exc))
    _write_out(text, output)


AllowUnkeyedOpt = Annotated[bool, typer.Option(
    "--allow-unkeyed", help="accept events an older release hashed without the key (they "
    "prove nothing against someone who could write the store)")]


@audit_app.command("verify")
def audit_verify(
    rollout: str,
    store: StoreOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="a file `safeshift audit export` wrote: the chain must still hold "
        "its head (catches the store put back to an older copy)")] = None,
    allow_unkeyed: AllowUnkeyedOpt = False,
) -> None:
    """Check that a rollout's audit log is complete, unaltered and signed with the audit key
    ($SAFESHIFT_AUDIT_KEY_FILE, $SAFESHIFT_AUDIT_KEY or ~/.config/safeshift/audit.key): exit 0
    if so, 1 if it was tampered with (the first bad event is named), 2 if it cannot be checked
    (no key, or another key)."""
    from safeshift.audit import read_checkpoint

    st = _open(store, migrate=False)  # reads only: never creates nor upgrades
    try:
        cp = read_checkpoint(checkpoint) if checkpoint is not None else None
        report = ops.verify_audit(st, rollout, checkpoint=cp, allow_unkeyed=allow_unkeyed)
    except SafeshiftError as exc:
        fail(str(exc))
    (out if report.ok else err).print(f"{printable(rollout)}: {printable(report.message)}",
                                      markup=False)
    raise typer.Exit(report.code)


@audit_app.command("export")
def audit_export(
    rollout: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="file to write")],
    store: StoreOpt = None,
    allow_unkeyed: AllowUnkeyedOpt = False,
) -> None:
    """Write a rollout's audit events (JSON lines) and a signed checkpoint of the chain's
    head, after verifying it. Keep the file outside the store: `safeshift audit verify
    --checkpoint FILE` later proves the store was not put back to an older copy."""
    from safeshift.clock import SystemClock

    st = _open(store, migrate=False)  # reads only: never creates nor upgrades
    try:
        report, cp = ops.export_audit(st, rollout, SystemClock(), output,
                                      allow_unkeyed=allow_unkeyed)
    except SafeshiftError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")
    if cp is None:
        err.print(f"{printable(rollout)}: not exported: {printable(report.message)}",
                  markup=False)
        raise typer.Exit(report.code)
    out.print(f"{printable(rollout)}: wrote {cp.seq} events and a checkpoint (event {cp.seq}, "
              f"head {cp.head[:16]}, key id {cp.key_id}) to {output}", markup=False)


@store_app.command("migrate")
def store_migrate(store: StoreOpt = None) -> None:
    """Upgrade a store's schema in place to this release's (serve does it on start)."""
    from safeshift.store import SCHEMA_VERSION

    st = _open(store)  # opening with migrate=True upgrades it
    out.print(f"{st.url}: schema version {SCHEMA_VERSION}", markup=False)
    st.close()


# -- tokens ------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="client, viewer, operator, approver or "
                                                     "admin")],
    name: Annotated[str, typer.Option("--name", help="who holds it (shown in the audit log)")],
    expires: Annotated[str | None, typer.Option("--expires", help="e.g. 30d, 12h (default: "
                                                                  "never)")] = None,
    attribute: Annotated[list[str] | None, typer.Option(
        "--attribute", help="a targeting attribute this client may assert, e.g. plan "
        "(repeatable; client tokens)")] = None,
    labels: Annotated[bool, typer.Option(
        "--labels", help="its labels and outcomes may count (a labelling pipeline's client "
        "token; an app's needs none)")] = False,
    reviews: Annotated[str | None, typer.Option(
        "--reviews", help="review roles it may sign off, comma-separated, e.g. privacy,legal "
        "(a stage's reviews: in the plan)")] = None,
    store: StoreOpt = None,
    url: UrlOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a token and print it once: it is stored only as a digest."""
    from safeshift._units import parse_duration
    from safeshift.auth import parse_role
    from safeshift.clock import SystemClock

    try:
        parsed = parse_role(role)
        expires_in = None if expires is None else parse_duration(expires)
    except (SafeshiftError, ValueError) as exc:
        fail(str(exc))
    review_roles = sorted({r.strip() for r in (reviews or "").split(",") if r.strip()})
    if url:
        result = _remote(url, lambda c: c.create_token(name, str(parsed), expires=expires,
                                                       attributes=attribute or [],
                                                       labels=labels, reviews=review_roles))
    else:
        st = _open(store)
        try:
            token, record = ops.create_token(
                st, SystemClock(), name=name, role=parsed, expires_in=expires_in,
                rights={**_rights(attribute, labels),
                        **({"reviews": review_roles} if review_roles else {})})
        except SafeshiftError as exc:
            fail(str(exc))
        result = {"token": token, **record.to_json()}
    if json_out:
        out.print_json(data=result)
        return
    out.print(result["token"], markup=False)
    err.print(f"token {result['id']} for {printable(result['name'])} ({result['role']}); shown "
              "once: keep it in a secret store, pass it as SAFESHIFT_TOKEN", markup=False)


def _rights(attributes: list[str] | None, labels: bool) -> dict[str, Any]:
    rights: dict[str, Any] = {}
    if attributes:
        rights["attributes"] = sorted(set(attributes))
    if labels:
        rights["labels"] = True
    return rights


@token_app.command("list")
def token_list(store: StoreOpt = None, url: UrlOpt = None, json_out: JsonOpt = False) -> None:
    """Every token (never its secret): id, holder, role, expiry, revocation."""
    from datetime import UTC, datetime

    records = _read(url, lambda c: c.tokens(), store,
                    lambda st: [t.to_json() for t in ops.list_tokens(st)])
    if json_out:
        out.print_json(data=records)
        return

    def when(at: float | None) -> str:
        return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M")

    table = Table(show_header=True, header_style="bold", box=None)
    for col in ("id", "name", "role", "created", "expires", "revoked"):
        table.add_column(col)
    for t in records:
        table.add_row(t["id"], Text(printable(t["name"])), t["role"], when(t["created_at"]),
                      when(t["expires_at"]), when(t["revoked_at"]))
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, store: StoreOpt = None, url: UrlOpt = None) -> None:
    """Revoke a token: every gateway refuses it within a few seconds."""
    from safeshift.auth import TOKEN_CACHE_SECONDS
    from safeshift.clock import SystemClock

    if url:
        record = _remote(url, lambda c: c.revoke_token(token_id))
    else:
        st = _open(store)
        try:
            record = ops.revoke_token(st, SystemClock(), token_id).to_json()
        except SafeshiftError as exc:
            fail(str(exc))
    out.print(f"revoked token {record['id']} ({printable(record['name'])}); gateways refuse it "
              f"within {TOKEN_CACHE_SECONDS:g} s", markup=False)


@token_app.command("denials")
def token_denials(
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
    store: StoreOpt = None,
    url: UrlOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The latest requests refused for want of a valid token (401) or of the role (403)."""
    from datetime import UTC, datetime

    rows = _read(url, lambda c: c.denials(limit), store,
                 lambda st: [d.to_json() for d in ops.denials(st, limit=limit)])
    if json_out:
        out.print_json(data=rows)
        return
    for d in rows:
        when = datetime.fromtimestamp(d["at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        out.print(f"{when} {d['status']} {printable(d['method'])} {printable(d['path'])} "
                  f"{printable(d['principal'])} from {printable(d['peer'])}: "
                  f"{printable(d['reason'])}", markup=False)


# -- notifications -----------------------------------------------------------------------


@notify_app.command("list")
def notify_list(
    rollout: Annotated[str | None, typer.Option("--rollout", help="only this rollout")] = None,
    status_: Annotated[str | None, typer.Option(
        "--status", help="pending, delivered or dead (default: all)")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The outbox, newest first: each notification's event, webhook, attempts and last error."""
    from datetime import UTC, datetime

    from safeshift.notify import display_url

    if status_ not in (None, "pending", "delivered", "dead"):
        fail(f"--status {status_!r}: use pending, delivered or dead")
    st = _open(store, migrate=False)
    try:
        entries = st.outbox(rollout=rollout, status=status_, limit=limit)
    except SafeshiftError as exc:
        fail(str(exc))
    finally:
        st.close()
    if json_out:
        out.print_json(data=[{
            "id": e.id, "rollout": e.rollout, "seq": e.seq, "event": e.event,
            "target": display_url(e.target), "status": e.status, "attempts": e.attempts,
            "created_at": e.created_at, "next_attempt_at": e.next_attempt_at,
            "delivered_at": e.delivered_at, "last_error": e.last_error} for e in entries])
        return

    def when(at: float | None) -> str:
        return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")

    table = Table(show_header=True, header_style="bold", box=None)
    for col in ("id", "rollout", "seq", "event", "webhook", "status", "attempts", "created",
                "last error"):
        table.add_column(col)
    for e in entries:
        table.add_row(str(e.id), Text(printable(e.rollout)), str(e.seq), e.event,
                      Text(printable(display_url(e.target))), e.status, str(e.attempts),
                      when(e.created_at), Text(printable(e.last_error or "-")))
    out.print(table)


@notify_app.command("retry-dead")
def notify_retry_dead(
    rollout: Annotated[str | None, typer.Option("--rollout", help="only this rollout")] = None,
    store: StoreOpt = None,
) -> None:
    """Requeue dead-lettered notifications: a running gateway sends them again, in order."""
    from safeshift.clock import SystemClock

    st = _open(store)
    try:
        n = st.requeue_dead(SystemClock().now(), rollout=rollout)
    except SafeshiftError as exc:
        fail(str(exc))
    finally:
        st.close()
    out.print(f"requeued {n} dead notification(s); a running gateway sends them within a second",
              markup=False)


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


@bench_app.command("dashboard")
def bench_dashboard(
    quick: Annotated[bool, typer.Option("--quick", help="less telemetry; about a minute")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
    screenshots: Annotated[Path | None, typer.Option(
        "--screenshots", help="save a screenshot of the page in this folder")] = None,
) -> None:
    """The rollout page's weight, server and browser load time, and how fast it follows a change
    in the store (5 guardrails × 10 segment values, 24 h of snapshots)."""
    from safeshift.bench.dashboard import main as run

    run(quick=quick, json_path=json_path, console=out, screenshots=screenshots)


@bench_app.command("replicas")
def bench_replicas(
    duration: Annotated[float, typer.Option("--duration", help="seconds of load", min=8)] = 60.0,
    replicas: Annotated[int, typer.Option("--replicas", help="safeshift serve processes",
                                          min=2)] = 2,
    concurrency: Annotated[int, typer.Option("--concurrency", help="clients", min=1)] = 16,
    quick: Annotated[bool, typer.Option("--quick", help="a 15 s window")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="write figures here")] = None,
) -> None:
    """Replicas behind nginx sharing a throwaway PostgreSQL, under load while the rollout steps
    through stages and is rolled back; then the lease holder is SIGKILLed (needs nginx)."""
    from safeshift.bench._postgres import PostgresUnavailable
    from safeshift.bench._procs import BenchError
    from safeshift.bench.replicas import main as run

    try:
        run(duration=duration, replicas=replicas, concurrency=concurrency, quick=quick,
            json_path=json_path, console=out)
    except (BenchError, PostgresUnavailable) as exc:
        fail(str(exc))


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
