"""A Python callable as a model: ``python:package.module:name``.

``name`` may be a function taking the list of rows and returning one output per row, an object
with ``predict(rows)``, or a class (instantiated once with no arguments).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeshift.errors import ModelLoadError
from safeshift.models.base import Rows, SyncBackend


class PythonModel(SyncBackend):
    """Wraps a callable (or an object with ``predict``)."""

    def __init__(self, target: Any, name: str = "python") -> None:
        if isinstance(target, type):
            try:
                target = target()
            except Exception as exc:
                raise ModelLoadError(
                    f"{name}: creating {target.__name__}() failed ({type(exc).__name__}: {exc})"
                ) from None
        fn: Callable[[Rows], Any] | None = getattr(target, "predict", None)
        if fn is None and callable(target):
            fn = target
        if fn is None:
            raise ModelLoadError(f"{name}: not callable and has no predict()")
        self._fn = fn
        self._proba = getattr(target, "predict_proba", None)
        self.name = name

    @classmethod
    def load(cls, spec: str, base_dir: Path) -> PythonModel:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ModelLoadError(f"python:{spec}: write it as python:package.module:callable")
        added = str(base_dir) not in sys.path
        if added:
            sys.path.insert(0, str(base_dir))
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ModelLoadError(f"python:{spec}: cannot import {module_name} ({exc})") from None
        finally:
            if added:
                sys.path.remove(str(base_dir))
        try:
            target = getattr(module, attr)
        except AttributeError:
            raise ModelLoadError(f"python:{spec}: module {module_name} has no {attr!r}") from None
        return cls(target, name=spec)

    def _call(self, rows: Rows) -> tuple[list[Any], list[float] | None]:
        outputs = list(self._fn(list(rows)))
        scores = None
        if self._proba is not None:
            scores = [float(p[-1]) for p in self._proba(list(rows))]
        return outputs, scores
