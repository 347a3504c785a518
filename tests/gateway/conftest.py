"""Fixtures for the gateway tests (helpers live in ``gateway_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")
