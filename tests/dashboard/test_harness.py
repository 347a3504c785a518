"""The browser harness itself: Chromium loads pages from a real HTTP server, axe-core finds known
violations (and none on a clean page), and screenshots are real PNGs."""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page
from tests.dashboard.browser import axe_violations, format_violations, screenshot

CLEAN = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Harness: clean page</title></head>
<body>
  <main>
    <h1>Rollouts</h1>
    <form>
      <label for="rollout">Rollout name</label>
      <input id="rollout" name="rollout" type="text">
      <button type="submit">Search</button>
    </form>
  </main>
</body>
</html>
"""

# Three violations axe must find: an image without alt text, an unlabelled input, #aaa on #fff.
BROKEN = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Harness: broken page</title></head>
<body style="background: #fff">
  <main>
    <h1>Rollouts</h1>
    <img src="pixel.png">
    <input id="unlabelled" type="text">
    <p id="faint" style="color: #aaa">This text is too faint to read.</p>
  </main>
</body>
</html>
"""

# Served with a strict Content-Security-Policy: its inline script must stay blocked, and axe must
# still run (it cannot be injected as an inline script tag there).
STRICT = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Harness: strict policy</title></head>
<body>
  <main>
    <h1 id="heading">Rollouts</h1>
    <img src="pixel.png">
    <script>document.getElementById("heading").textContent = "inline script ran";</script>
  </main>
</body>
</html>
"""
STRICT_POLICY = "default-src 'self'; script-src 'self'"


def _pixel_png() -> bytes:
    """A 1x1 transparent PNG, so that the broken page's image loads."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    pixels = zlib.compress(b"\x00" + b"\x00" * 4)  # filter byte, then one RGBA pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


class _Handler(SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        if self.path.startswith("/strict"):
            self.send_header("Content-Security-Policy", STRICT_POLICY)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A static site on 127.0.0.1 at a free port, served by a real HTTP server; its base URL."""
    root: Path = tmp_path_factory.mktemp("site")
    (root / "clean.html").write_text(CLEAN, encoding="utf-8")
    (root / "broken.html").write_text(BROKEN, encoding="utf-8")
    (root / "strict.html").write_text(STRICT, encoding="utf-8")
    (root / "pixel.png").write_bytes(_pixel_png())
    handler = functools.partial(_Handler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="dashboard-test-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_clean_page_loads_and_has_no_violations(page: Page, site: str) -> None:
    response = page.goto(f"{site}/clean.html")
    assert response is not None and response.ok
    assert page.title() == "Harness: clean page"
    assert page.get_by_role("heading", level=1).inner_text() == "Rollouts"
    page.get_by_label("Rollout name").fill("churn-v2")
    assert page.get_by_role("textbox", name="Rollout name").input_value() == "churn-v2"
    violations = axe_violations(page)
    assert violations == [], format_violations(violations)


def test_axe_finds_known_violations(page: Page, site: str) -> None:
    page.goto(f"{site}/broken.html")
    violations = axe_violations(page)
    by_rule = {v["id"]: v for v in violations}
    assert {"image-alt", "label", "color-contrast"} <= by_rule.keys(), format_violations(violations)
    assert by_rule["image-alt"]["targets"] == ["img"]
    assert by_rule["label"]["targets"] == ["#unlabelled"]
    assert by_rule["color-contrast"]["targets"] == ["#faint"]
    assert all(v["impact"] in {"minor", "moderate", "serious", "critical"} for v in violations)
    message = format_violations(violations)
    assert "image-alt" in message and "#unlabelled" in message

    # A second run on the same document reuses the injected engine; tags narrow the rules.
    assert [v["id"] for v in axe_violations(page, tags=("wcag2aa",))] == ["color-contrast"]


def test_axe_runs_under_a_strict_content_security_policy(page: Page, site: str) -> None:
    response = page.goto(f"{site}/strict.html")
    assert response is not None and response.headers["content-security-policy"] == STRICT_POLICY
    assert page.locator("#heading").inner_text() == "Rollouts"  # the page's policy is enforced
    assert [v["id"] for v in axe_violations(page)] == ["image-alt"]
    assert page.evaluate("() => typeof window.axe.run") == "function"


def test_screenshot_writes_a_png(page: Page, site: str) -> None:
    page.goto(f"{site}/clean.html")
    path = screenshot(page, "harness-clean")
    assert path.name == "harness-clean.png" and path.parent.name == "dashboard"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
