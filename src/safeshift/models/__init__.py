"""Model backends behind one protocol, chosen by the scheme of a model reference.

``joblib:PATH`` (scikit-learn), ``python:MODULE:CALLABLE``, ``fake:NAME?options``, an MLflow
registry's ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (:mod:`safeshift.models.registry`);
HTTP upstreams register ``oip:`` and ``mlflow-server:`` (``mlflow:``, its older name, still
loads). An unknown scheme raises; it never falls back.
"""

from __future__ import annotations

import contextlib
import sys
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


def load_model(ref: str, base_dir: Path | str = ".", *,
               registry_uri: str | None = None) -> ModelBackend:
    """Load the model that ``ref`` names; paths are relative to ``base_dir``, ``models:/``
    references are looked up in the MLflow registry at ``registry_uri`` (None: MLflow's
    environment)."""
    scheme, sep, spec = ref.partition(":")
    if scheme == "models" and sep:
        from safeshift.models import registry

        return registry.load_ref(ref, registry_uri)
    if not sep or scheme not in _LOADERS:
        _ensure_http_loaders()
    if not sep or scheme not in _LOADERS:
        known = ", ".join(f"{s}:" for s in sorted(_LOADERS))
        raise ModelLoadError(f"unknown model reference {ref!r}; use one of {known}")
    return _LOADERS[scheme](spec, Path(base_dir))


def check_models(plan: Plan, *, load: bool = False) -> list[Problem]:
    """Check every model reference of a plan and report each that is wrong, by field path;
    see :func:`check_model_refs` for what ``load`` runs."""
    sides = [("baseline", plan.baseline), ("candidate", plan.candidate)]
    sides += [(f"challengers.{i}", c) for i, c in enumerate(plan.challengers)]
    return check_model_refs([(f"{where}.model", spec.model) for where, spec in sides],
                            plan.base_dir, load=load,
                            registry_uri=plan.registry_uri)


def check_model_refs(refs: Sequence[tuple[str, str]], base_dir: Path, *,
                     load: bool = False, registry_uri: str | None = None) -> list[Problem]:
    """Check each ``(field path, model reference)`` and report those that are wrong.

    Without ``load`` nothing the reference names is run: a ``joblib:`` file must exist and be
    a readable pickle or joblib file (it is not unpickled: unpickling can run any code), a
    ``python:`` module's source must be found on the plan's directory or ``sys.path`` (it is
    not imported: importing runs its top-level code), other schemes are parsed. With ``load``
    each model is loaded as ``serve`` would load it — only for plans you trust."""
    problems = []
    for where, ref in refs:
        try:
            if load:
                load_model(ref, base_dir, registry_uri=registry_uri).close()
            else:
                inspect_model_ref(ref, base_dir)
        except ModelLoadError as exc:
            problems.append(Problem(where, str(exc)))
    return problems


_PICKLE_STARTS = (b"\x80", b"\x1f\x8b", b"ZF", b"BZh", b"\xfd7zXZ", b"]\x00\x00", b"PK")
"""The first bytes of a pickle (protocol 2+), or of the gzip, zlib, bz2, xz, lzma or zip file
joblib may compress one into."""


def _inspect_joblib(spec: str, base_dir: Path) -> None:
    path = (base_dir / spec).resolve()
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        raise ModelLoadError(f"joblib:{path}: {what}; paths are relative to the plan file")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelLoadError(f"joblib:{path}: cannot read it ({exc.strerror})") from None
    if not head.startswith(_PICKLE_STARTS) and not head[:1] == b"x":  # x: a zlib stream
        raise ModelLoadError(f"joblib:{path}: not a joblib or pickle file (it starts with "
                             f"{head[:4]!r}); save the model with joblib.dump")


def _inspect_python(spec: str, base_dir: Path) -> None:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"python:{spec}: write it as python:package.module:callable")
    parts = module_name.split(".")
    if not all(p.isidentifier() for p in parts) or not attr.isidentifier():
        raise ModelLoadError(f"python:{spec}: {module_name}:{attr} is not a module path and a "
                             "name (letters, digits and _, dotted for the module)")
    if module_name in sys.builtin_module_names:
        return
    for root in [base_dir, *(Path(p or ".") for p in sys.path)]:
        where = root.joinpath(*parts)
        if (where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()
                or any(where.parent.glob(f"{parts[-1]}.*.so"))):
            return
    raise ModelLoadError(f"python:{spec}: no module {module_name} next to the plan or on the "
                         "Python path (it was looked for, not imported; validate --load imports "
                         "it)")


def _inspect_registry(spec: str, base_dir: Path) -> None:
    from safeshift.models.registry import parse_ref

    parse_ref(f"models:{spec}")


_INSPECTORS: dict[str, Loader | Callable[[str, Path], None]] = {
    "joblib": _inspect_joblib, "python": _inspect_python, "models": _inspect_registry}
"""Schemes whose loading would run code the reference names (a registry model is unpickled),
checked without running it."""


def inspect_model_ref(ref: str, base_dir: Path | str = ".") -> None:
    """Check ``ref`` without running anything it names (see :func:`check_model_refs`); raise
    :class:`ModelLoadError` saying what is wrong."""
    scheme, sep, spec = ref.partition(":")
    inspector = _INSPECTORS.get(scheme) if sep else None
    if inspector is None:
        load_model(ref, base_dir).close()  # the other schemes only parse their reference
        return
    inspector(spec, Path(base_dir))


def _ensure_http_loaders() -> None:
    with contextlib.suppress(ImportError):
        import safeshift.models.http  # noqa: F401  (registers oip:, mlflow-server:, mlflow:)


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
    "inspect_model_ref",
    "load_model",
    "register_loader",
]
