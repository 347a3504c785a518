"""Fixtures for the dashboard's real-browser tests: Debian's Chromium, headless, through Playwright's
sync API (helpers live in ``tests.dashboard.browser``).

``browser`` is shared by the tests of one module, not the whole session: while Playwright's sync
API is started, its event loop is marked as running in the main thread, and every later test that
calls ``asyncio.run()`` would fail ("cannot be called from a running event loop"). Stopping it at
the end of each dashboard module keeps the rest of the suite unaffected. For the same reason these
fixtures are plain-sync: the sync API refuses to start inside a running event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from tests.dashboard.browser import CHROMIUM, CHROMIUM_ARGS, DEFAULT_TIMEOUT_MS, VIEWPORT


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium (``/usr/bin/chromium``); a missing browser fails, never skips."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"the dashboard tests need Debian's Chromium at {CHROMIUM}: "
            "sudo apt-get install -y chromium (or `make browser`; never `playwright install`)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh browser context (1280x900, no shared cookies or storage), 10 s timeouts."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()
