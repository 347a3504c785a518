"""Pages from views: the Jinja environment, the charts of a rollout view, and the HTML of the
dashboard's pages and of the self-contained report. Every value is escaped by the templates
(autoescape); the charts are SVG built by :mod:`safeshift.dashboard.charts`, which escapes its
own text."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from safeshift._units import format_duration, printable
from safeshift.analysis import format_measure
from safeshift.dashboard.charts import BandPoint, Marker, TimelineStage, band_chart, split_bar, timeline_chart

__all__ = ["charts_for", "environment", "render", "static_text"]

_OPERATOR_ACTIONS = {"approve", "pause", "resume", "rollback", "promote"}


def _when(at: float | None) -> str:
    if at is None or not math.isfinite(at):
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return format_duration(max(seconds, 0.0))


def _measure(v: dict[str, Any] | None, key: str = "estimate") -> str:
    if not v:
        return "-"
    value = v.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format_measure(float(value), bool(v.get("rate")), bool(v.get("relative")),
                          level=bool(v.get("bound")))


def _band(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    return f"[{_measure(v, 'lower')}, {_measure(v, 'upper')}]"


def _tolerance(v: dict[str, Any] | None) -> str:
    if not v or v.get("tolerance") is None:
        return "-"
    tol = float(v["tolerance"])
    if v.get("bound"):
        return f"{v['bound']} {format_measure(tol, bool(v.get('rate')), False, signed=False, level=True)}"
    return format_measure(tol, bool(v.get("rate")), bool(v.get("relative")), signed=False)


def _count(n: float | None) -> str:
    return "-" if n is None else f"{n:,.0f}"


@cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("safeshift.dashboard", "templates"),
                      autoescape=select_autoescape(["html"], default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, duration=_duration, measure=_measure, band=_band,
                       tolerance=_tolerance, count=_count, printable=lambda s: printable(str(s)),
                       pct=lambda x: "-" if x is None else f"{100 * float(x):.3g}%")
    env.globals["operator_actions"] = _OPERATOR_ACTIONS
    return env


@cache
def static_text(name: str) -> str:
    """A file of the dashboard's static assets (shipped with the package)."""
    return resources.files("safeshift.dashboard").joinpath("static", name).read_text()


def _markers(view: dict[str, Any]) -> list[Marker]:
    out = []
    for d in view["decisions"]:
        kind = "harm" if d["action"] == "rollback" else (
            "operator" if d["actor"] != "controller" else "decision")
        out.append(Marker(d["at"], f"{d['seq']} {d['action']}"
                          + ("" if d["actor"] == "controller" else f" by {d['actor']}"), kind))
    return out


def charts_for(view: dict[str, Any]) -> dict[str, Any]:
    """The SVG charts of a rollout view: the stage timeline, the split, a band per guardrail."""
    markers = _markers(view)
    now = view["updated_at"] if view["phase"] in ("promoted", "rolled_back") else view["generated_at"]
    stages = [TimelineStage(s["name"], float(s["min_duration"] or 0.0), s["started"], s["ended"],
                            s["status"]) for s in view["stages"]]
    traffic, shadow = float(view["traffic"]), float(view["shadow"])
    shares = [("baseline", 1.0 - traffic), ("candidate", traffic)]
    out: dict[str, Any] = {
        "timeline": Markup(timeline_chart(stages, now=now, markers=markers)),
        "split": Markup(split_bar(shares)),
        "shadow": shadow,
        "bands": {},
    }
    for i, g in enumerate(view["guardrails"]):
        latest = g["latest"] or {}
        points = [BandPoint(t, _f(e), _f(lo, -math.inf), _f(hi, math.inf))
                  for t, e, lo, hi, _status, _stage in g["series"]]
        rate, relative = bool(latest.get("rate")), bool(latest.get("relative"))
        bound = latest.get("bound")

        def fmt(x: float, rate: bool = rate, relative: bool = relative,
                bound: Any = bound) -> str:
            return format_measure(x, rate, relative, level=bool(bound))

        tol = latest.get("tolerance")
        out["bands"][g["key"]] = Markup(band_chart(
            points, title=f"{g['label']}: estimate and always-valid band over time",
            tolerance=None if tol is None else float(tol), markers=markers, fmt=fmt,
            harm_up=bool(g["harm_up"]) if not bound else True, chart_id=f"band-{i}"))
    return out


def _f(value: Any, default: float = math.nan) -> float:
    return default if value is None else float(value)


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
