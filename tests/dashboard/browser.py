"""Helpers for the dashboard's real-browser tests: Debian's Chromium driven by Playwright's sync API,
the vendored axe-core accessibility engine, and full-page screenshots.

The fixtures ``browser`` and ``page`` are in this folder's ``conftest.py``; the helpers here take a
Playwright ``Page``::

    from tests.dashboard.browser import axe_violations, format_violations, screenshot

    def test_overview(page):
        page.goto(url)
        violations = axe_violations(page)
        assert violations == [], format_violations(violations)
        screenshot(page, "overview")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, ViewportSize

ROOT = Path(__file__).resolve().parents[2]
VENDOR = Path(__file__).resolve().parent / "vendor"
AXE_JS = VENDOR / "axe.min.js"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium: the only browser these tests use (never ``playwright install``)."""

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)

VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
DEFAULT_TIMEOUT_MS = 10_000

WCAG_TAGS = ("wcag2a", "wcag2aa", "wcag21a", "wcag21aa")
"""axe's rules for WCAG 2.0 and 2.1, levels A and AA."""

# Runs in the page: axe's violations, cut down to what an assertion message needs. A node's target
# has one selector per frame, outermost first (joined with " | "), and one per shadow root inside
# a frame (joined with " >>> "); for an element of the top document it is a single selector.
_RUN_AXE = """
async (tags) => {
  const result = await axe.run(document, {runOnly: {type: 'tag', values: tags}});
  return result.violations.map((v) => ({
    id: v.id,
    impact: v.impact,
    help: v.help,
    help_url: v.helpUrl,
    targets: v.nodes.map((n) => n.target.map((t) => (Array.isArray(t) ? t.join(' >>> ') : t)).join(' | ')),
  }));
}
"""


def axe_violations(page: Page, *, tags: Sequence[str] = WCAG_TAGS) -> list[dict[str, Any]]:
    """Run axe-core on the page's document with the rules of ``tags``; its violations, each a dict
    with ``id`` (the rule, e.g. ``"image-alt"``), ``impact`` (``"minor"`` .. ``"critical"``),
    ``help``, ``help_url`` and ``targets`` (a CSS selector for each offending element).

    The vendored ``axe.min.js`` is injected on the first call for the page's current document: as a
    script tag, or, where the page's Content-Security-Policy forbids inline scripts, evaluated
    through the DevTools protocol (which the policy does not govern). The page under test keeps
    its policy either way; ``bypass_csp`` would hide the dashboard's own CSP mistakes."""
    if not page.evaluate("() => typeof window.axe === 'object' && typeof window.axe.run === 'function'"):
        try:
            page.add_script_tag(path=AXE_JS)
        except PlaywrightError as exc:
            if "Content Security Policy" not in str(exc):
                raise
            page.evaluate(AXE_JS.read_text(encoding="utf-8") + "\n;undefined")
    violations: list[dict[str, Any]] = page.evaluate(_RUN_AXE, list(tags))
    return violations


def format_violations(violations: Sequence[dict[str, Any]]) -> str:
    """The violations, one rule a paragraph, for an assertion message."""
    if not violations:
        return "no accessibility violations"
    lines = [f"{len(violations)} accessibility violation(s):"]
    for v in violations:
        lines.append(f"- {v['id']} ({v.get('impact') or 'unknown impact'}): {v['help']}")
        if v.get("help_url"):
            lines.append(f"  {v['help_url']}")
        lines.extend(f"    at {target}" for target in v.get("targets", []))
    return "\n".join(lines)


def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG of the page at ``test-artifacts/dashboard/<name>.png`` (in the repository's
    root, ignored by git); its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path
