"""The dashboard's SVG charts: well-formed, accessible, escaped, finite and drawn to scale."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from safeshift.dashboard.charts import (
    BandPoint,
    Marker,
    TimelineStage,
    band_chart,
    default_fmt,
    split_bar,
    timeline_chart,
)

NS = "{http://www.w3.org/2000/svg}"
T0 = 1_700_000_000.0
HOSTILE = "<script>alert(1)</script>"
COORDS = ("x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "width", "height")


def _accessible(svg: str) -> ET.Element:
    """Parse, and check the root, the title/desc pair and what aria-labelledby names."""
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    assert root.get("role") == "img"
    assert root.get("viewBox") and root.get("width") == "100%"
    ids = (root.get("aria-labelledby") or "").split()
    assert len(ids) == 2
    title, desc = root[0], root[1]
    assert (title.tag, desc.tag) == (f"{NS}title", f"{NS}desc")
    assert [title.get("id"), desc.get("id")] == ids
    assert (title.text or "").strip() and (desc.text or "").strip()
    for element in root.iter():
        assert element.tag != f"{NS}script"
        assert not any(name.lower().startswith("on") for name in element.attrib)
        assert not any("url(" in value or "href" in name for name, value in element.attrib.items())
    return root


def _view(root: ET.Element) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in (root.get("viewBox") or "").split())
    return x, y, x + w, y + h


def _vertices(element: ET.Element) -> list[tuple[float, float]]:
    pairs = (element.get("points") or "").split()
    return [(float(a), float(b)) for a, b in (p.split(",") for p in pairs)]


def _find(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{NS}{tag}") if cls in (e.get("class") or "").split()]


def _desc(root: ET.Element) -> str:
    return root[1].text or ""


def _band(n: int = 60, *, step: float = 60.0) -> list[BandPoint]:
    points = []
    for i in range(n):
        half = 2.0 / math.sqrt(i + 1)
        points.append(BandPoint(T0 + i * step, 0.1, 0.1 - half, 0.1 + half))
    return points


def test_every_chart_is_accessible_xml() -> None:
    stages = [TimelineStage("canary-5%", 1800, T0, None, "current")]
    for svg in (
        band_chart(_band(), title="error rate", tolerance=0.5, markers=[Marker(T0 + 600, "advance")]),
        band_chart([], title="error rate", tolerance=0.5),
        timeline_chart(stages, now=T0 + 900),
        timeline_chart([], now=T0),
        split_bar([("baseline", 0.95), ("candidate", 0.05)]),
    ):
        root = _accessible(svg)
        assert 'font-family="system-ui, sans-serif"' in svg and 'font-size="12"' in svg
        assert "max-width:" in (root.get("style") or "")


def test_ids_derive_from_chart_id() -> None:
    root = _accessible(band_chart(_band(), title="t", tolerance=None, chart_id='g1 "x"'))
    assert root.get("aria-labelledby") == "g1--x--title g1--x--desc"


def test_hostile_labels_are_escaped_everywhere() -> None:
    markers = [Marker(T0 + 600, HOSTILE, "operator"), Marker(T0 + 900, f'" onload="x {HOSTILE}', "harm")]
    stages = [TimelineStage(HOSTILE, 600, T0, T0 + 700), TimelineStage("b", 600, T0 + 700, None, "current")]
    charts = [
        band_chart(_band(), title=HOSTILE, tolerance=0.5, markers=markers, fmt=lambda v: f"<i>{v:.2f}</i>"),
        timeline_chart(stages, now=T0 + 1000, markers=markers),
        split_bar([(HOSTILE, 0.5), ("candidate", 0.5)]),
        band_chart([], title=HOSTILE, tolerance=None),
    ]
    for svg in charts:
        assert "<script" not in svg and "<i>" not in svg
        root = _accessible(svg)
        assert HOSTILE in "".join(root.itertext())  # present, as text
    band = ET.fromstring(charts[0])
    assert HOSTILE in _desc(band) and (band[0].text or "") == HOSTILE
    marker_titles = [g.find(f"{NS}title") for g in _find(band, "g", "marker")]
    assert [t.text for t in marker_titles if t is not None] == [HOSTILE, f'" onload="x {HOSTILE}']


def test_infinite_and_nan_bounds_stay_finite_and_inside() -> None:
    points = [BandPoint(T0, math.nan, math.nan, math.nan), BandPoint(T0 + 10, 0.2, -math.inf, math.inf)]
    points += [BandPoint(T0 + 20 + i, 0.1 * i, math.nan if i % 3 else -0.5, math.inf if i % 2 else 0.9)
               for i in range(30)]
    points.append(BandPoint(T0 + 15, 1e30, -1e300, 1e300))  # absurd finite values are clipped too
    svg = band_chart(points, title="latency", tolerance=math.inf, markers=[Marker(math.nan, "x")])
    root = _accessible(svg)
    x0, y0, x1, y1 = _view(root)
    for element in list(root.iter())[1:]:  # the root's width is "100%"
        for name, value in element.attrib.items():
            if name in COORDS or name == "points":
                assert not re.search(r"inf|nan", value, re.IGNORECASE), (name, value)
                for number in re.split(r"[ ,]+", value.strip()):
                    assert math.isfinite(float(number))
    shapes = _find(root, "polygon", "band") + _find(root, "polyline", "estimate")
    assert len(shapes) == 2
    for shape in shapes:
        for x, y in _vertices(shape):
            assert x0 <= x <= x1 and y0 <= y <= y1
    assert "band [−∞, +∞]" in _desc(root) and "no tolerance" in _desc(root)


@pytest.mark.parametrize(("outlier", "pixels", "limit"), [(0, 20, 1), (10, 5, 2)])
def test_a_very_wide_band_does_not_squash_the_chart(outlier: int, pixels: float, limit: float) -> None:
    """Early wide bands (the first 20 %) are left out of the range; later ones are capped."""
    points = [BandPoint(T0, 0.0, -1e9, 1e9), BandPoint(T0 + 1, 0.0, -5e8, 5e8)] + [
        BandPoint(T0 + 10 * i, 0.05, 0.0, 0.1) for i in range(1, 20)]
    if outlier:
        points[outlier] = BandPoint(points[outlier].t, 0.05, -1e6, 1e6)
    root = _accessible(band_chart(points, title="t", tolerance=0.2))
    band = _vertices(_find(root, "polygon", "band")[0])
    n = len(band) // 2
    upper_last, lower_last = band[n - 1][1], band[n][1]
    assert lower_last - upper_last > pixels  # the latest band, 0.1 wide, keeps a visible height
    ticks = [float((t.text or "").replace("−", "-")) for t in _find(root, "g", "y-axis")[0].iter(f"{NS}text")]
    assert max(abs(t) for t in ticks) <= limit


def test_many_points_are_thinned_keeping_first_and_last() -> None:
    points = [BandPoint(T0 + i, math.sin(i / 100), -1.0, 1.0) for i in range(5000)]
    root = _accessible(band_chart(points, title="t", tolerance=1.0, max_points=400))
    line = _vertices(_find(root, "polyline", "estimate")[0])
    assert 2 < len(line) <= 400
    ends = _vertices(_find(ET.fromstring(band_chart([points[0], points[-1]], title="t", tolerance=1.0)),
                           "polyline", "estimate")[0])
    assert (line[0][0], line[-1][0]) == (ends[0][0], ends[1][0])
    assert [x for x, _ in line] == sorted(x for x, _ in line)
    assert "5000 points" in _desc(root)


def _tolerance_y(root: ET.Element) -> float:
    (line,) = _find(root, "line", "tolerance")
    assert line.get("y1") == line.get("y2") and line.get("stroke-dasharray")
    return float(line.get("y1") or "nan")


@pytest.mark.parametrize("harm_up", [True, False])
def test_tolerance_line_is_placed_on_the_scale(harm_up: bool) -> None:
    sign = 1.0 if harm_up else -1.0
    points = [BandPoint(T0, sign * 0.8, sign * 0.7, sign * 0.9), BandPoint(T0 + 60, sign * 0.2, 0.1, 0.3)]
    root = _accessible(band_chart(points, title="t", tolerance=0.5, harm_up=harm_up))
    (y_beyond, y_within) = (y for _, y in _vertices(_find(root, "polyline", "estimate")[0]))
    y_tol, zero = _tolerance_y(root), float(_find(root, "line", "zero")[0].get("y1") or "nan")
    assert min(y_beyond, y_within) < y_tol < max(y_beyond, y_within)
    assert (y_tol < zero) is harm_up  # +tolerance is above zero, -tolerance below
    assert "tolerance" in "".join(root.itertext())
    assert f"tolerance {default_fmt(sign * 0.5)}" in _desc(root)


def test_desc_states_the_latest_estimate_band_and_tolerance() -> None:
    points = [BandPoint(T0 + 60 * i, 0.12, -0.3, 0.5) for i in range(142)]
    svg = band_chart(points, title="error rate", tolerance=0.5, fmt=lambda v: f"{v:+.2f} pt")
    desc = _desc(_accessible(svg))
    assert "latest estimate +0.12 pt" in desc and "band [-0.30 pt, +0.50 pt]" in desc
    assert "tolerance +0.50 pt" in desc and "142 points" in desc and "crossing the tolerance" in desc
    safe = band_chart([BandPoint(T0, -0.1, -0.2, 0.0)], title="e", tolerance=0.5)
    assert "safe side" in _desc(ET.fromstring(safe))
    harm = band_chart([BandPoint(T0, -0.9, -1.0, -0.8)], title="e", tolerance=0.5, harm_up=False)
    assert "harm side" in _desc(ET.fromstring(harm))


@pytest.mark.parametrize("span", [3.0, 90.0, 1200.0, 5 * 3600.0, 3 * 86400.0, 90 * 86400.0])
def test_time_axis_has_four_to_six_elapsed_ticks(span: float) -> None:
    points = [BandPoint(T0, 0.0, -1.0, 1.0), BandPoint(T0 + span, 0.1, -0.5, 0.5)]
    root = _accessible(band_chart(points, title="t", tolerance=None))
    labels = [t.text or "" for t in _find(root, "g", "x-axis")[0].iter(f"{NS}text")]
    assert 4 <= len(labels) <= 6 and labels[0] == "0"
    assert all(re.fullmatch(r"\d+ (d|h|min|s)( \d+ (h|min|s))?", label) for label in labels[1:]), labels


@pytest.mark.parametrize("scale", [1e-5, 0.01, 1.0, 37.0, 2e4])
def test_value_axis_has_four_to_six_ticks(scale: float) -> None:
    points = [BandPoint(T0 + i, scale * 0.3, scale * -0.2, scale * 0.9) for i in range(5)]
    root = _accessible(band_chart(points, title="t", tolerance=scale * 0.5))
    assert 4 <= len(list(_find(root, "g", "y-axis")[0].iter(f"{NS}text"))) <= 6


def test_no_finite_point_says_no_data_yet() -> None:
    points = [BandPoint(T0 + i, math.nan, -math.inf, math.inf) for i in range(10)]
    root = _accessible(band_chart(points, title="latency", tolerance=0.5))
    assert "no data yet" in "".join(root.itertext())
    assert not _find(root, "polyline", "estimate")


def test_default_fmt_uses_three_significant_digits() -> None:
    assert [default_fmt(v) for v in (0.0, 0.123456, -0.0559, 1234.5, 12.0, 2.5e7)] == [
        "0", "0.123", "−0.0559", "1230", "12", "2.5e+07"]


def _stage_groups(root: ET.Element) -> dict[str, ET.Element]:
    groups = {}
    for group in _find(root, "g", "stage"):
        title = group.find(f"{NS}title")
        assert title is not None
        groups[(title.text or "").rsplit(" (", 1)[0]] = group
    return groups


def _rect(group: ET.Element, cls: str) -> tuple[float, float] | None:
    rects = _find(group, "rect", cls)
    if not rects:
        return None
    x, w = float(rects[0].get("x") or "nan"), float(rects[0].get("width") or "nan")
    return x, x + w


def test_timeline_current_stage_runs_to_now_and_future_stages_follow() -> None:
    now = T0 + 5400
    stages = [
        TimelineStage("shadow", 1800, T0, T0 + 2000),
        TimelineStage("canary-5%", 1800, T0 + 2000, None, "current"),
        TimelineStage("canary-25%", 3600, None, None, "future"),
        TimelineStage("rollback-drill", 0, None, None, "skipped"),
    ]
    root = _accessible(timeline_chart(stages, now=now, markers=[Marker(T0 + 2000, "advance")]))
    groups = _stage_groups(root)
    assert set(groups) == {s.name for s in stages}
    shadow, current = _rect(groups["shadow"], "actual"), _rect(groups["canary-5%"], "actual")
    assert shadow is not None and current is not None
    assert current[0] == pytest.approx(shadow[1], abs=0.1)
    # both bars share one scale: 2000 s for the shadow, 3400 s (to now) for the current stage
    assert (current[1] - current[0]) / (shadow[1] - shadow[0]) == pytest.approx(3400 / 2000, abs=0.01)
    future = _rect(groups["canary-25%"], "planned")
    assert _rect(groups["canary-25%"], "actual") is None and future is not None
    assert future[0] == pytest.approx(current[1], abs=0.1)  # after the running stage's end (now)
    assert (future[1] - future[0]) / (shadow[1] - shadow[0]) == pytest.approx(3600 / 2000, abs=0.01)
    desc = _desc(root)
    assert all(f"stage {s.name}:" in desc for s in stages)
    assert "stage canary-5%: planned 30 min, ran 56 min 40 s (current)" in desc
    assert "not started (future)" in desc and "advance at 33 min" in desc
    labels = "".join(root.itertext())
    assert "(current)" in labels and "(skipped)" in labels  # status in words, not colour only
    assert len(_find(root, "g", "marker")) == 1


def test_timeline_with_no_stage_started_lays_out_the_plan_from_now() -> None:
    stages = [TimelineStage("a", 600, None, None, "future"), TimelineStage("b", 1200, None, None, "future")]
    root = _accessible(timeline_chart(stages, now=T0))
    groups = _stage_groups(root)
    a, b = _rect(groups["a"], "planned"), _rect(groups["b"], "planned")
    assert a is not None and b is not None and b[0] == pytest.approx(a[1], abs=0.1)
    assert not _find(root, "rect", "actual")


def _segments(svg: str) -> tuple[list[tuple[str, float, ET.Element]], float]:
    root = _accessible(svg)
    out = []
    for group in _find(root, "g", "segment"):
        title, rect = group.find(f"{NS}title"), group.find(f"{NS}rect")
        assert title is not None and rect is not None
        out.append((title.text or "", float(rect.get("width") or "nan"), group))
    outline = [r for r in root.iter(f"{NS}rect") if r.get("fill") == "none"]
    return out, float(outline[0].get("width") or "nan")


def _contrast(a: str, b: str) -> float:
    def lum(colour: str) -> float:
        h = colour.lstrip("#")
        h = "".join(c * 2 for c in h) if len(h) == 3 else h
        c = [int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        c = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_split_bar_widths_are_proportional_and_labels_readable() -> None:
    shares = [("baseline", 0.9), ("candidate", 0.05), ("shadow", 0.04), ("other", 0.01)]
    segments, total = _segments(split_bar(shares))
    labels = ["baseline 90.0%", "candidate 5.0%", "shadow 4.0%", "other 1.0%"]
    assert [label for label, _, _ in segments] == labels
    for (_, share), (_, width, _) in zip(shares, segments, strict=True):
        assert abs(width - share * total) <= 1
    svg = split_bar(shares)
    text = "".join(ET.fromstring(svg).itertext())
    assert all(label in text for label, _, _ in segments)  # tiny segments are labelled outside
    for _, _, group in segments:
        rect, inside = group.find(f"{NS}rect"), group.find(f"{NS}text")
        if inside is not None and rect is not None:
            assert _contrast(rect.get("fill") or "", inside.get("fill") or "") >= 4.5


def test_split_bar_remainder_is_unassigned_and_excess_normalised() -> None:
    segments, total = _segments(split_bar([("baseline", 0.5), ("candidate", 0.2)]))
    assert [label for label, _, _ in segments] == ["baseline 50.0%", "candidate 20.0%", "unassigned 30.0%"]
    assert abs(segments[2][1] - 0.3 * total) <= 1
    desc = _desc(ET.fromstring(split_bar([("baseline", 0.5), ("candidate", 0.2)])))
    assert "baseline 50.0%" in desc and "unassigned 30.0%" in desc
    segments, total = _segments(split_bar([("baseline", 3.0), ("candidate", 1.0), ("broken", math.nan)]))
    assert [label for label, _, _ in segments] == ["baseline 75.0%", "candidate 25.0%"]
    assert abs(sum(w for _, w, _ in segments) - total) <= 1


def test_chart_colours_meet_contrast_against_white() -> None:
    svg = band_chart(_band(), title="t", tolerance=0.5, markers=[Marker(T0 + 60, "h", "harm"),
                                                                   Marker(T0 + 120, "o", "operator")])
    root = ET.fromstring(svg)
    strokes = {e.get("stroke") for e in root.iter() if e.tag in (f"{NS}polyline", f"{NS}line")}
    strokes -= {"#e6e6e6"}  # the grid: decoration only
    assert strokes and all(_contrast(s or "", "#ffffff") >= 3 for s in strokes)
    fills = {e.get("fill") for e in root.iter(f"{NS}text")} | {root.get("fill")}
    assert all(_contrast(f or "", "#ffffff") >= 4.5 for f in fills if f)
