"""Model backends behind one protocol, chosen by the scheme of a model reference.

``joblib:PATH`` (scikit-learn), ``python:MODULE:CALLABLE``, ``fake:NAME?options``; HTTP
upstreams register ``oip:`` and ``mlflow:``. An unknown scheme raises; it never falls back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

from safeshift.errors import ModelLoadError, Problem
from safeshift.models.base import ModelBackend, ModelResult, SyncBackend, call_with_timeout
from safeshift.models.fake import FakeModel
from safeshift.models.python import PythonModel
from safeshift.models.sklearn import SklearnModel
from safeshift.plan import Plan

Loader = Callable[[str, Path], ModelBackend]

_LOADERS: dict[str, Loader] = {
    "joblib": lambda spec, base: SklearnModel.load((base / spec).resolve()),
    "python": lambda spec, base: PythonModel.load(spec, base),
    "fake": lambda spec, base: FakeModel.parse(spec),
}


def register_loader(scheme: str, loader: Loader) -> None:
    """Add a backend for ``scheme:`` references."""
    _LOADERS[scheme] = loader


def load_model(ref: str, base_dir: Path | str = ".") -> ModelBackend:
    """Load the model that ``ref`` names; paths are relative to ``base_dir``."""
    scheme, sep, spec = ref.partition(":")
    if not sep or scheme not in _LOADERS:
        _ensure_http_loaders()
    if not sep or scheme not in _LOADERS:
        known = ", ".join(f"{s}:" for s in sorted(_LOADERS))
        raise ModelLoadError(f"unknown model reference {ref!r}; use one of {known}")
    return _LOADERS[scheme](spec, Path(base_dir))


def check_models(plan: Plan) -> list[Problem]:
    """Load both models of a plan and report each that cannot be loaded, by field path."""
    sides = [("baseline", plan.baseline), ("candidate", plan.candidate)]
    sides += [(f"challengers.{i}", c) for i, c in enumerate(plan.challengers)]
    return check_model_refs([(f"{where}.model", spec.model) for where, spec in sides],
                            plan.base_dir)


def check_model_refs(refs: Sequence[tuple[str, str]], base_dir: Path) -> list[Problem]:
    """Load each ``(field path, model reference)`` and report those that cannot be loaded."""
    problems = []
    for where, ref in refs:
        try:
            model = load_model(ref, base_dir)
        except ModelLoadError as exc:
            problems.append(Problem(where, str(exc)))
        else:
            model.close()
    return problems


def _ensure_http_loaders() -> None:
    with contextlib.suppress(ImportError):
        import safeshift.models.http  # noqa: F401  (registers oip: and mlflow:)


__all__ = [
    "FakeModel",
    "ModelBackend",
    "ModelResult",
    "PythonModel",
    "SklearnModel",
    "SyncBackend",
    "call_with_timeout",
    "check_model_refs",
    "check_models",
    "load_model",
    "register_loader",
]
