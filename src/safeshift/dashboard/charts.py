"""Accessible inline SVG charts for the rollout dashboard and the self-contained HTML report.

Each function returns one ``<svg>`` element as a string, embedded directly in an HTML page: no
JavaScript, no stylesheet, font, image or CDN to fetch, no event attributes.

* :func:`band_chart` — one guardrail over time: the confidence band of the candidate-minus-baseline
  difference (shaded), the estimate (line), zero, the tolerance (dashed, labelled) and markers.
* :func:`timeline_chart` — one row per stage: planned minimum duration (thin grey bar) against the
  actual duration (solid bar) on a shared time axis, with the same markers.
* :func:`split_bar` — a 100 % stacked bar of the arms' traffic shares.

Accessibility (WCAG 2.1 AA): ``role="img"`` and ``aria-labelledby`` naming a ``<title>`` and a
``<desc>`` that says in words what the picture shows (latest estimate, band, tolerance and the side
of it the band is on; each stage's planned and actual duration and status; every share). Nothing is
told by colour alone: statuses and shares are written out, the tolerance is dashed and labelled,
marker kinds differ in dash pattern too and carry their full label as a ``<title>`` tooltip. Lines
have at least 3:1 contrast against white, text 4.5:1; text inside a split segment is white or
near-black, whichever contrasts more. Charts scale by ``viewBox`` with ``width="100%"`` and an inline
``max-width`` (a Content-Security-Policy without ``'unsafe-inline'`` styles only drops the cap). The
ids of title and desc derive from ``chart_id`` (letters, digits, ``-``, ``_``; the caller makes it
unique on the page). All text goes through :func:`html.escape`, so labels typed by operators cannot
inject markup, and every coordinate is finite and inside the ``viewBox``.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["BandPoint", "Marker", "TimelineStage", "band_chart", "default_fmt", "split_bar", "timeline_chart"]

_TEXT, _LINE, _BAND, _BAND_EDGE = "#222", "#1f4e99", "#c9daf5", "#5d84c6"
_TOL, _AXIS, _GRID, _PLANNED, _WHITE = "#b3261e", "#595959", "#e6e6e6", "#8a8a8a", "#fff"
_MARKER_STYLE = {  # kind -> (colour, dash pattern, stroke width)
    "decision": ("#333", "4 3", 1.5),
    "harm": (_TOL, "", 2.0),
    "operator": ("#5b3a99", "1.5 2.5", 2.0),
}
_ARM_COLOURS = {"baseline": "#1f4e99", "candidate": "#f2a33a", "shadow": "#5b3a99", "unassigned": "#e0e0e0"}
_PALETTE = ("#2e7d32", "#c9daf5", "#8c564b", "#b8860b", "#00796b")
_HALO = f'paint-order="stroke" stroke="{_WHITE}" stroke-width="3" stroke-linejoin="round"'
_HUGE = 1e12  # bounds this large count as unbounded
_MIN_SPAN = 5.0  # seconds: the shortest time axis
_TIME_STEPS = (1, 2, 3, 5, 10, 15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400, 172800, 259200, 432000, 864000)  # consecutive ratios <= 2: 4-6 ticks
_UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


@dataclass(frozen=True, slots=True)
class BandPoint:
    """The guardrail's state at time ``t`` (unix seconds); a nan estimate (no data yet) is skipped."""

    t: float
    estimate: float
    lower: float  # may be -inf or nan: drawn to the bottom edge
    upper: float  # may be +inf or nan: drawn to the top edge


@dataclass(frozen=True, slots=True)
class Marker:
    """A vertical line at ``t`` with a short label; ``kind`` (decision, harm, operator) sets its style."""

    t: float
    label: str
    kind: str = "decision"


@dataclass(frozen=True, slots=True)
class TimelineStage:
    """One stage: planned minimum duration (seconds), actual start and end (None: not reached / running)."""

    name: str
    planned: float
    started: float | None
    ended: float | None
    status: str = "done"  # done | current | future | skipped


def default_fmt(value: float) -> str:
    """At most three significant digits, a real minus sign, no exponent from 1e-4 to 1e6: ``−0.0123``."""
    if not math.isfinite(value):
        return "n/a" if math.isnan(value) else ("+∞" if value > 0 else "−∞")
    value = round(value, 2 - math.floor(math.log10(abs(value)))) if value else 0.0
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if -4 <= magnitude < 6:
        text = f"{value:.{max(0, 2 - magnitude)}f}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
    else:
        text = f"{value:.3g}"
    return text.replace("-", "−")


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _n(value: float) -> str:
    """A coordinate: always finite, one decimal."""
    return f"{value:.1f}" if math.isfinite(value) else "0"


def _safe_id(chart_id: str, fallback: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", chart_id) or fallback


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _elapsed(seconds: float, zero: str = "0") -> str:
    """``0``, ``45 s``, ``15 min``, ``2 h 30 min``, ``1 d 4 h``: the two largest units, rounded down."""
    total = round(seconds)
    for i, (name, size) in enumerate(_UNITS):
        if total >= size:
            major, rest = divmod(total, size)
            text = f"{major} {name}"
            if i + 1 < len(_UNITS) and (minor := rest // _UNITS[i + 1][1]):
                text += f" {minor} {_UNITS[i + 1][0]}"
            return text
    return zero


def _time_step(span: float) -> float:
    """The smallest nice step giving at most 6 ticks from 0 to ``span`` (hence at least 4)."""
    step = float(next((c for c in _TIME_STEPS if span / c < 6), _TIME_STEPS[-1]))
    while span / step >= 6:
        step *= 2
    return step


def _nice_axis(lo: float, hi: float) -> list[float]:
    """4-6 evenly spaced round ticks whose first and last enclose ``[lo, hi]``."""
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    base = 10.0 ** math.floor(math.log10((hi - lo) / 10))
    while True:
        for mult in (1.0, 2.0, 2.5, 5.0):
            step = base * mult
            first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            if last - first <= 5:
                return [(first + k) * step for k in range(last - first + 1)]
        base *= 10


def _svg(cid: str, width: float, height: float, title: str, desc: str, body: Sequence[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:g} {height:g}" width="100%" '
        f'style="max-width:{width:g}px;height:auto" role="img" aria-labelledby="{cid}-title {cid}-desc" '
        f'font-family="system-ui, sans-serif" font-size="12" fill="{_TEXT}">'
        f'<title id="{cid}-title">{_esc(title)}</title><desc id="{cid}-desc">{_esc(desc)}</desc>'
        + "".join(body)
        + "</svg>"
    )


def _message(cid: str, width: int, title: str, message: str) -> str:
    body = [f'<text x="{_n(width / 2)}" y="34" text-anchor="middle">{_esc(message)}</text>']
    return _svg(cid, width, 56, title, f"{title}: {message}.", body)


def _x_axis(t_span: float, x_of: Callable[[float], float], y: float, right: float) -> list[str]:
    out, step, k = ['<g class="x-axis">'], _time_step(t_span), 0
    while k * step <= t_span * (1 + 1e-9):
        x = x_of(k * step)
        anchor = "end" if x > right - 24 else "middle"
        label = _esc(_elapsed(k * step))
        out.append(f'<line x1="{_n(x)}" y1="{_n(y)}" x2="{_n(x)}" y2="{_n(y + 4)}" stroke="{_AXIS}"/>'
                   f'<text x="{_n(x)}" y="{_n(y + 16)}" text-anchor="{anchor}">{label}</text>')
        k += 1
    return [*out, "</g>"]


def _markers(markers: Sequence[Marker], t0: float, t_end: float, x_of: Callable[[float], float],
             top: float, bottom: float, label_y: float, right: float) -> list[str]:
    out = []
    visible = sorted((m for m in markers if math.isfinite(m.t) and t0 <= m.t <= t_end), key=lambda m: m.t)
    for i, marker in enumerate(visible):
        kind = marker.kind if marker.kind in _MARKER_STYLE else "decision"
        colour, dash, stroke = _MARKER_STYLE[kind]
        x = x_of(marker.t - t0)
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        near_end = x > right - 90
        tx, anchor = (x - 3, "end") if near_end else (x + 3, "start")
        out.append(
            f'<g class="marker marker-{kind}"><title>{_esc(marker.label)}</title>'
            f'<line x1="{_n(x)}" y1="{_n(top)}" x2="{_n(x)}" y2="{_n(bottom)}" stroke="{colour}" '
            f'stroke-width="{stroke}"{dashes}/><text x="{_n(tx)}" y="{_n(label_y + (i % 3) * 13)}" '
            f'text-anchor="{anchor}" fill="{colour}" {_HALO}>{_esc(_short(marker.label, 16))}</text></g>'
        )
    return out


def _marker_desc(markers: Sequence[Marker], t0: float) -> str:
    items = [f"{m.label} at {_elapsed(m.t - t0)}" for m in sorted(markers, key=lambda m: m.t)
             if math.isfinite(m.t) and m.t >= t0]
    return f"; markers: {', '.join(items)}" if items else ""


def _ok(value: float) -> bool:
    return math.isfinite(value) and abs(value) < _HUGE


def _hline(y: float, left: float, right: float, attrs: str) -> str:
    return f'<line x1="{_n(left)}" y1="{_n(y)}" x2="{_n(right)}" y2="{_n(y)}" {attrs}/>'


def _clip(value: float, lo: float, hi: float, if_nan: float) -> float:
    return if_nan if math.isnan(value) else min(max(value, lo), hi)


def _y_ticks(points: Sequence[BandPoint], tol_line: float | None) -> list[float]:
    """The y range: the latest point, zero and the tolerance always, plus the finite values of the
    last 80 % of points (the first ones, with few observations, are the widest), each capped at four
    times the latest extent beyond it; 10 % padding, then widened to round ticks."""
    last = points[-1]
    ref = [0.0] + [v for v in (last.estimate, last.lower, last.upper) if _ok(v)]
    if tol_line is not None:
        ref.append(tol_line)
    ref_lo, ref_hi = min(ref), max(ref)
    extent = (ref_hi - ref_lo) or 1.0
    recent = points[len(points) // 5:]
    values = [v for p in recent for v in (p.estimate, p.lower, p.upper) if _ok(v)]
    lo = max(min([*values, ref_lo]), ref_lo - 4 * extent)
    hi = min(max([*values, ref_hi]), ref_hi + 4 * extent)
    pad = 0.1 * (hi - lo)
    return _nice_axis(lo - pad, hi + pad)


def _downsample(points: Sequence[BandPoint], max_points: int) -> list[BandPoint]:
    keep, n = max(2, max_points), len(points)
    if n <= keep:
        return list(points)
    return [points[round(i * (n - 1) / (keep - 1))] for i in range(keep)]


def band_chart(points: Sequence[BandPoint], *, title: str, tolerance: float | None,
               markers: Sequence[Marker] = (), fmt: Callable[[float], str] = default_fmt,
               harm_up: bool = True, width: int = 640, height: int = 220,
               max_points: int = 400, chart_id: str = "band") -> str:
    """A guardrail's difference over time: confidence band, estimate, zero, tolerance and markers.

    ``tolerance`` is the harm margin as a magnitude. With ``harm_up`` (the default) harm is an
    increase and the tolerance line is drawn at ``+tolerance``; with ``harm_up=False`` harm is a
    decrease and the line is drawn at ``-tolerance``. Points with a nan estimate are skipped; nan
    or infinite bounds, and bounds of magnitude 1e12 or more, reach to the edge of the plot. The y
    range is chosen from the latest point, zero, the tolerance and the finite values of the last 80 %
    of the points, each side capped at four times the latest extent (so one early, very wide band
    cannot squash the chart; what lies beyond is clipped to the edge). More than ``max_points``
    points are thinned evenly, keeping the first and the last. Without any point with a finite
    estimate the chart is a small "no data yet" box.
    """
    cid = _safe_id(chart_id, "band")
    pts = sorted((p for p in points if math.isfinite(p.t) and math.isfinite(p.estimate)), key=lambda p: p.t)
    if not pts:
        return _message(cid, width, title, "no data yet")
    tol_line = None
    if tolerance is not None and _ok(tolerance):
        tol_line = tolerance if harm_up else -tolerance
    ticks = _y_ticks(pts, tol_line)
    lo, hi = ticks[0], ticks[-1]
    t0 = pts[0].t
    t_span = max([pts[-1].t - t0, _MIN_SPAN] + [m.t - t0 for m in markers if math.isfinite(m.t)])
    left, right, top, bottom = 62.0, width - 16.0, 28.0, height - 26.0

    def x_of(elapsed: float) -> float:
        return left + elapsed / t_span * (right - left)

    def y_of(value: float, if_nan: float) -> float:
        return top + (hi - _clip(value, lo, hi, if_nan)) / (hi - lo) * (bottom - top)

    body = [f'<text x="{_n(left)}" y="16" font-weight="600">{_esc(title)}</text>', '<g class="y-axis">']
    for tick in ticks:
        y = y_of(tick, lo)
        body.append(_hline(y, left, right, f'stroke="{_GRID}"'))
        body.append(f'<text x="{_n(left - 6)}" y="{_n(y + 4)}" text-anchor="end">{_esc(fmt(tick))}</text>')
    body.append("</g>")
    shown = _downsample(pts, max_points)
    xs = [x_of(p.t - t0) for p in shown]
    upper = [f"{_n(x)},{_n(y_of(p.upper, hi))}" for x, p in zip(xs, shown, strict=True)]
    lower = [f"{_n(x)},{_n(y_of(p.lower, lo))}" for x, p in zip(xs, shown, strict=True)]
    body.append(f'<polygon class="band" points="{" ".join(upper + lower[::-1])}" fill="{_BAND}" '
                f'stroke="{_BAND_EDGE}" stroke-width="1"/>')
    body.append(_hline(y_of(0.0, lo), left, right, f'class="zero" stroke="{_AXIS}"'))
    if tol_line is not None:
        ty = y_of(tol_line, lo)
        body.append(_hline(ty, left, right, f'class="tolerance" stroke="{_TOL}" stroke-width="1.5" '
                           'stroke-dasharray="6 4"'))
        body.append(f'<text x="{_n(right - 2)}" y="{_n(ty - 4)}" text-anchor="end" fill="{_TOL}" {_HALO}>'
                    "tolerance</text>")
    estimate = " ".join(f"{_n(x)},{_n(y_of(p.estimate, lo))}" for x, p in zip(xs, shown, strict=True))
    body.append(f'<polyline class="estimate" points="{estimate}" fill="none" stroke="{_LINE}" '
                'stroke-width="2"/>')
    body.append(f'<circle cx="{_n(xs[-1])}" cy="{_n(y_of(shown[-1].estimate, lo))}" r="3" fill="{_LINE}"/>')
    body.append(_hline(bottom, left, right, f'stroke="{_AXIS}"'))
    body += _x_axis(t_span, x_of, bottom, right)
    body += _markers(markers, t0, t0 + t_span, x_of, top, bottom, top + 11, right)

    last = pts[-1]
    low = -math.inf if math.isnan(last.lower) else last.lower
    high = math.inf if math.isnan(last.upper) else last.upper
    desc = f"{title}: latest estimate {fmt(last.estimate)} at {_elapsed(last.t - t0)}, band ["
    desc += f"{fmt(low) if math.isfinite(low) else '−∞'}, {fmt(high) if math.isfinite(high) else '+∞'}], "
    if tol_line is None:
        desc += "no tolerance"
    else:
        safe, harm = (high < tol_line, low > tol_line) if harm_up else (low > tol_line, high < tol_line)
        side = "on the safe side of" if safe else "on the harm side of" if harm else "crossing"
        direction = "an increase" if harm_up else "a decrease"
        desc += f"tolerance {fmt(tol_line)} (harm is {direction}), band {side} the tolerance"
    desc += f", {len(pts)} points{_marker_desc(markers, t0)}."
    return _svg(cid, width, height, title, desc, body)


def timeline_chart(stages: Sequence[TimelineStage], *, now: float, markers: Sequence[Marker] = (),
                   width: int = 640, chart_id: str = "timeline") -> str:
    """The stages as rows: planned minimum duration (thin grey bar) and actual duration (solid bar).

    The time axis starts at the first stage's start (``now`` if none started). A running stage
    (``ended`` None) lasts until ``now``. A stage never started has no actual bar; its planned bar
    follows the previous stage: after its end, or for a running one after ``now`` and its planned
    end, whichever is later.
    """
    cid, title = _safe_id(chart_id, "timeline"), "Rollout timeline"
    if not stages:
        return _message(cid, width, title, "no stages yet")
    starts = [s.started for s in stages if s.started is not None]
    t0 = min(starts) if starts else now
    rows: list[tuple[TimelineStage, float, float | None]] = []  # stage, planned start, actual end
    cursor = t0
    for stage in stages:
        planned = max(0.0, stage.planned)
        if stage.started is None:
            rows.append((stage, cursor, None))
            cursor += planned
        else:
            end = stage.ended if stage.ended is not None else max(now, stage.started)
            rows.append((stage, stage.started, end))
            cursor = end if stage.ended is not None else max(end, stage.started + planned)
    ends = [start + max(0.0, s.planned) for s, start, _ in rows] + [e for _, _, e in rows if e is not None]
    t_span = max([_MIN_SPAN, *(e - t0 for e in ends)] + [m.t - t0 for m in markers if math.isfinite(m.t)])
    in_view = sum(1 for m in markers if math.isfinite(m.t) and t0 <= m.t <= t0 + t_span)
    left, right, top, row_h = min(170.0, width * 0.35), width - 16.0, 26.0 + 13 * min(3, in_view), 24.0
    bottom = top + row_h * len(rows) + 4

    def x_of(elapsed: float) -> float:
        return left + max(0.0, elapsed) / t_span * (right - left)

    body = [f'<text x="8" y="16" font-weight="600">{title}</text>']
    parts = []
    for i, (stage, start, actual_end) in enumerate(rows):
        y = top + i * row_h
        label = f"{_short(stage.name, 18)} ({stage.status})"
        body.append(f'<g class="stage"><title>{_esc(f"{stage.name} ({stage.status})")}</title>'
                    f'<text x="8" y="{_n(y + 14)}">{_esc(label)}</text>')
        x1, x2 = x_of(start - t0), x_of(start - t0 + max(0.0, stage.planned))
        body.append(f'<rect class="planned" x="{_n(x1)}" y="{_n(y + 16)}" width="{_n(x2 - x1)}" height="4" '
                    f'fill="{_PLANNED}"/>')
        ran = "not started"
        if actual_end is not None:
            ax2 = x_of(actual_end - t0)
            body.append(f'<rect class="actual" x="{_n(x1)}" y="{_n(y + 4)}" width="{_n(max(ax2 - x1, 1.0))}" '
                        f'height="10" fill="{_LINE}"/>')
            ran = f"ran {_elapsed(actual_end - start, '0 s')}"
        body.append("</g>")
        parts.append(f"stage {stage.name}: planned {_elapsed(stage.planned, '0 s')}, {ran} ({stage.status})")
    body.append(_hline(bottom, left, right, f'stroke="{_AXIS}"'))
    body += _x_axis(t_span, x_of, bottom, right)
    body += _markers(markers, t0, t0 + t_span, x_of, top - 2, bottom, 34.0, right)
    desc = f"{title}, {len(rows)} stages: {'; '.join(parts)}{_marker_desc(markers, t0)}."
    return _svg(cid, width, bottom + 22, title, desc, body)


def _luminance(colour: str) -> float:
    hexes = colour.lstrip("#")
    hexes = "".join(c * 2 for c in hexes) if len(hexes) == 3 else hexes
    channels = [int(hexes[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _text_on(fill: str) -> str:
    """White or near-black, whichever contrasts more with ``fill``."""
    bg = _luminance(fill)
    return _WHITE if 1.05 / (bg + 0.05) >= (bg + 0.05) / (_luminance(_TEXT) + 0.05) else _TEXT


def _pct(share: float) -> str:
    return "<0.1%" if 0 < share < 0.0005 else f"{100 * share:.1f}%"


def split_bar(shares: Sequence[tuple[str, float]], *, width: int = 640, chart_id: str = "split") -> str:
    """A 100 % stacked bar of the arms' traffic shares (fractions).

    Negative or nan shares count as 0. Shares summing to more than 1 are normalised; a sum below 1
    leaves the rest as a grey segment labelled ``unassigned`` (so the bar always spans 100 %).
    Labels sit inside their segment when they fit, otherwise below the bar with a leader line.
    """
    cid, title = _safe_id(chart_id, "split"), "Traffic split"
    clean = [(name, v if math.isfinite(v) and v > 0 else 0.0) for name, v in shares]
    total = sum(v for _, v in clean)
    if total > 1 or (total > 0 and 1 - total < 1e-6):
        clean = [(name, v / total) for name, v in clean]
    else:
        clean.append(("unassigned", 1 - total))
    left, right, bar_y, bar_h = 8.0, width - 8.0, 26.0, 28.0
    body = [f'<text x="{_n(left)}" y="16" font-weight="600">{title}</text>']
    outside: list[str] = []
    row_ends: list[float] = []
    x, palette = left, iter(_PALETTE * (len(clean) // len(_PALETTE) + 1))
    for name, share in clean:
        fill = _ARM_COLOURS.get(name) or next(palette)
        seg_w = share * (right - left)
        label = f"{name} {_pct(share)}"
        if seg_w > 0:
            body.append(f'<g class="segment"><title>{_esc(label)}</title><rect x="{x:.2f}" y="{_n(bar_y)}" '
                        f'width="{seg_w:.2f}" height="{_n(bar_h)}" fill="{fill}" stroke="{_WHITE}"/>')
            text_w, centre = 7.0 * len(label), x + seg_w / 2
            if text_w + 8 <= seg_w:
                body.append(f'<text x="{_n(centre)}" y="{_n(bar_y + 18)}" text-anchor="middle" '
                            f'fill="{_text_on(fill)}">{_esc(label)}</text>')
            else:
                tx = min(max(centre - text_w / 2, left), right - text_w)
                row = next((r for r, end in enumerate(row_ends) if end < tx), len(row_ends))
                if row == len(row_ends):
                    row_ends.append(0.0)
                row_ends[row] = tx + text_w + 6
                ly = bar_y + bar_h + 16 + row * 16
                outside.append(f'<line x1="{_n(centre)}" y1="{_n(bar_y + bar_h)}" x2="{_n(centre)}" '
                               f'y2="{_n(ly - 11)}" stroke="{_AXIS}"/><text x="{_n(tx)}" y="{_n(ly)}">'
                               f"{_esc(label)}</text>")
            body.append("</g>")
        x += seg_w
    body.append(f'<rect x="{_n(left)}" y="{_n(bar_y)}" width="{_n(right - left)}" height="{_n(bar_h)}" '
                f'fill="none" stroke="{_AXIS}"/>')
    body += outside
    height = bar_y + bar_h + 16 * len(row_ends) + 10
    desc = f"{title}: " + ", ".join(f"{name} {_pct(share)}" for name, share in clean) + "."
    return _svg(cid, width, height, title, desc, body)
