"""The stats package re-exports every public name of its modules, in a sorted ``__all__``."""

from __future__ import annotations

import importlib

import safeshift.stats as stats

MODULES = ["bandits", "clustered", "drift", "power", "sequential", "srm"]


def test_all_public_names_are_reexported() -> None:
    expected: set[str] = set()
    for name in MODULES:
        module = importlib.import_module(f"safeshift.stats.{name}")
        expected |= set(module.__all__)
        for public in module.__all__:
            assert getattr(stats, public) is getattr(module, public)
    assert set(stats.__all__) == expected


def test_all_is_sorted_and_unique() -> None:
    # ruff's RUF022 order: SCREAMING_CASE, then CamelCase, then the rest, each alphabetical
    def key(name: str) -> tuple[int, str]:
        rank = 0 if name.isupper() else 1 if name[0].isupper() else 2
        return rank, name

    assert list(stats.__all__) == sorted(stats.__all__, key=key)
    assert len(set(stats.__all__)) == len(stats.__all__)
