"""``safeshift report``: a rollout in one file — HTML (self-contained: styles and SVG charts
inline, no script, no external reference), Markdown for a pull request or a wiki, or JSON for
tools. All three render the same :func:`safeshift.view.rollout_view` as the dashboard's rollout
page: what was tested, on how much traffic, what each guardrail showed, and why it ended as it
did."""

from __future__ import annotations

import json
import math
from typing import Any

from safeshift._units import markdown_text as _md

__all__ = ["FORMATS", "render_report"]

FORMATS = ("html", "md", "json")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def render_report(view: dict[str, Any], fmt: str) -> str:
    """The report of ``view`` in ``fmt`` (html, md or json)."""
    if fmt == "json":
        return json.dumps(_json_safe(view), indent=2, sort_keys=True) + "\n"
    if fmt == "md":
        return _markdown(view)
    if fmt == "html":
        from markupsafe import Markup

        from safeshift.dashboard.render import charts_for, render, static_text
        from safeshift.view import GRID_CLASSES

        body = render("_rollout.html", v=view, charts=charts_for(view), actions=[], report=True,
                      classes=GRID_CLASSES, csrf="")
        return render("report.html", v=view, body=Markup(body), css=static_text("dashboard.css"))
    raise ValueError(f"unknown report format {fmt!r}; the formats are {', '.join(FORMATS)}")


def _markdown(v: dict[str, Any]) -> str:
    from safeshift.dashboard.render import _band, _count, _duration, _measure, _tolerance, _when

    c = v["change"]
    lines = [f"# Rollout report: {_md(v['rollout'])}", "",
             f"{_md(v['endpoint'])}: {_md(v['baseline'])} → {_md(v['candidate'])} — "
             f"**{v['phase']}**", "", f"> {_md(v['reason'])}", "",
             "## The change", "", f"- What: {_md(c['summary'])}"]
    for label, key in (("Why", "why"), ("Owner", "owner"), ("Validated offline", "validation"),
                       ("Link", "link")):
        if c.get(key):
            lines.append(f"- {label}: {_md(c[key])}")
    lines += [f"- Plan `{v['plan_hash'][:12]}`, unit `{_md(v['unit'] or 'request')}`, "
              f"alpha {v['alpha']}, created by {_md(v['created_by'] or '-')} at "
              f"{_when(v['created_at'])}", "", "## Stages", "",
              "| stage | traffic | min duration | approval | started | ended | status |",
              "|---|---|---|---|---|---|---|"]
    for s in v["stages"]:
        traffic = s["traffic_text"] + (f" (+{s['shadow_text']} shadow)" if s["shadow_text"] else "")
        lines.append(f"| {_md(s['name'])} | {traffic} | {_duration(s['min_duration'])} | "
                     f"{s['approval'] or '-'} | {_when(s['started'])} | {_when(s['ended'])} | "
                     f"{s['status']} |")
    counts = v["counts"]
    requests = ", ".join(f"{arm} {_count(n)}" for arm, n in counts["requests"].items()) or "none"
    per_stage = "; ".join(f"{_md(x['stage'])}: " + ", ".join(f"{arm} {_count(n)}"
                                                           for arm, n in x["requests"].items())
                          for x in counts["per_stage"]) or "none"
    lines += ["", "## Traffic", "", f"- Requests per stage: {per_stage}",
              f"- In stage {_md(counts['stage'] or '-')} (the verdicts' stage): {requests}",
              f"- Fallbacks: {_count(counts['fallbacks'])} candidate failures answered with the "
              "baseline"]
    if counts["request_faults"]:
        lines.append("- Request faults (counted against neither model): " + ", ".join(
            f"{arm} {_count(f['count'])}" for arm, f in counts["request_faults"].items()))
    if counts["reports"]:
        lines.append("- User reports: " + ", ".join(f"{_md(k)} {_count(n)}"
                                                    for k, n in counts["reports"].items()))
    if v.get("report_texts"):
        lines.append("- Latest user reports (redacted): " + "; ".join(
            f"{_md(r['kind'])}: {_md(r['text'])}" for r in v["report_texts"][:10]))
    lines += ["", f"## Guardrails (verdicts from {v['verdicts_from']})", "",
              "| guardrail | verdict | estimate | band | tolerance | n baseline / candidate |",
              "|---|---|---|---|---|---|"]
    for g in v["guardrails"]:
        x = g["latest"]
        lines.append(f"| {_md(g['label'])} | {g['class']} | {_measure(x)} | {_band(x)} | "
                     f"{_tolerance(x)} | {_count(x and x['n_baseline'])} / "
                     f"{_count(x and x['n_candidate'])} |")
    if v.get("probes"):
        lines += ["", "## Probes", ""]
        lines += [f"- {_md(p['label'])}: {p['class']}"
                  + (f" — {_md(p['latest']['sentence'])}" if p["latest"] else "")
                  for p in v["probes"]]
    worst = [(row["segment"], cell) for row in v["grid"]["rows"] for cell in row["cells"]
             if cell and cell["class"] in ("harm", "suspected")]
    if worst:
        lines += ["", "### Segments where harm is proven or suspected", ""]
        for segment, cell in worst[:30]:
            lines.append(f"- {_md(segment)} · {_md(cell['guardrail'])}: {cell['class']}, "
                         f"estimate {_measure(cell)} {_band(cell)}")
    srm = v["srm"]
    if srm:
        lines += ["", f"Sample-ratio check: {'MISMATCH' if srm['mismatch'] else 'healthy'} "
                  f"(candidate share {100 * srm['observed'][1]:.3g}%, expected "
                  f"{100 * srm['expected'][1]:.3g}%, p = {srm['p_value']:.3g})."]
    if v["drift"]:
        lines.append(f"Prediction drift: PSI {v['drift']['psi']:.3f} over {v['drift']['kind']}.")
    lines += ["", "## Decisions", ""]
    for d in v["decisions"]:
        how = f" (re-derive: `safeshift explain {v['rollout']}#{d['seq']}`)" if d["explainable"] else ""
        lines.append(f"{d['seq']}. {_when(d['at'])} — **{d['action']}** → {d['phase']} by "
                     f"{_md(d['actor'])}: {_md(d['reason'])}{how}")
    audit = v["audit"]
    lines += ["", f"Audit log: {_md(audit['message'])}", ""]
    return "\n".join(lines)
