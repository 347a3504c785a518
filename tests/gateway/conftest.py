"""Fixtures for the gateway tests (helpers live in ``gateway_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store several gateways (replicas) and operators share: a SQLite file, or a fresh
    database on the session's throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "shared.db")
    url: str = request.getfixturevalue("postgres_db_url")
    return url
