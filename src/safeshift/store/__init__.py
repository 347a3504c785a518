"""Stores: one protocol, an in-memory and a SQL implementation, chosen by URL."""

from __future__ import annotations

from pathlib import Path

from safeshift.errors import StoreError
from safeshift.store.base import SCHEMA_VERSION, Store
from safeshift.store.memory import MemoryStore
from safeshift.store.sql import SQLStore, sqlite_url

DEFAULT_STORE = "safeshift.db"


def open_store(url: str | Path | None = None, *, migrate: bool = True,
               read_only: bool = False) -> Store:
    """``None`` → ``./safeshift.db``; ``memory://``; a path; or any SQLAlchemy URL. With
    ``migrate=False`` (commands that only read) the store is neither created nor upgraded: its
    schema must be this release's, else :class:`StoreError` says how to upgrade it.
    ``read_only`` (SQLite) opens connections that cannot write, so that a store on a
    read-only mount or a backup can be read."""
    if url is None:
        return SQLStore(sqlite_url(DEFAULT_STORE), migrate=migrate, read_only=read_only)
    text = str(url)
    if text == "memory://":
        return MemoryStore()
    if "://" not in text:
        return SQLStore(sqlite_url(text), migrate=migrate, read_only=read_only)
    if text.startswith(("sqlite", "postgresql")):
        return SQLStore(text, migrate=migrate, read_only=read_only)
    raise StoreError(f"unsupported store URL {text!r}; use a file path, sqlite:///PATH, "
                     "postgresql+psycopg://USER:PASS@HOST/DB or memory://")


__all__ = ["DEFAULT_STORE", "SCHEMA_VERSION", "MemoryStore", "SQLStore", "Store", "open_store",
           "sqlite_url"]
