"""Models from an MLflow model registry: ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``.

A registry reference names a registered model version, or an alias that points at one. An
alias can be moved at any time, so a rollout never follows it: when a rollout is registered,
:func:`pin` resolves every alias to the version it points at *then*, and the rollout's plan
names that version (``models:/churn@challenger`` becomes ``models:/churn/3``; a side that gives
no ``version:`` label is labelled ``churn/3``). A restart loads the same version whatever the
alias points at by then; serving a plan whose alias has since moved is a different plan, which
the store refuses under the same rollout name.

On promotion, a plan's ``registry: {promote_alias: champion}`` moves that alias to the
candidate's version (:func:`move_alias`, called by the controller, which records the move in
the audit log); a rollback leaves every alias where it was.

The registry is MLflow's (``pip install 'safeshift[mlflow]'``): ``registry.uri`` in the plan, or
MLflow's own ``MLFLOW_REGISTRY_URI`` / ``MLFLOW_TRACKING_URI``. Parsing a reference
(:func:`parse_ref`) needs neither MLflow nor the registry; resolving, loading and moving do.
Loading unpickles the model (it runs code), like ``joblib:``: ``safeshift validate`` only parses.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safeshift.errors import ModelLoadError, RegistryError
from safeshift.models.base import Rows, SyncBackend

if TYPE_CHECKING:
    from safeshift.plan import Plan

SCHEME = "models"
_NAME = r"[^/@\s]+"
_REF = re.compile(rf"^models:/(?P<name>{_NAME})(?:/(?P<version>[1-9][0-9]*)|@(?P<alias>[A-Za-z0-9_-]+))$")
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
"""What MLflow accepts as an alias (and not ``latest``, nor ``v`` and a number, which name versions)."""

INSTALL = "pip install 'safeshift[mlflow]'"


@dataclass(frozen=True, slots=True)
class RegistryRef:
    """A parsed ``models:/`` reference: a registered model and a version or an alias."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def ref(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else \
            f"models:/{self.name}@{self.alias}"

    @property
    def label(self) -> str:
        """The version label a plan side without ``version:`` gets."""
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@{self.alias}"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A registered model version as the registry describes it."""

    name: str
    version: str
    run_id: str | None
    source: str | None


def is_registry_ref(ref: str) -> bool:
    return ref.startswith(f"{SCHEME}:")


def parse_ref(ref: str) -> RegistryRef:
    """Parse ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; raise :class:`ModelLoadError`
    naming the right form."""
    m = _REF.match(ref)
    if m is None:
        raise ModelLoadError(f"{ref!r}: write a registry reference as models:/NAME/VERSION "
                             "(a version number) or models:/NAME@ALIAS")
    alias = m.group("alias")
    problem = alias_problem(alias) if alias is not None else None
    if problem is not None:
        raise ModelLoadError(f"{ref!r}: {problem}")
    return RegistryRef(m.group("name"), m.group("version"), alias)


def alias_problem(alias: str) -> str | None:
    """Why MLflow would refuse ``alias``, or None."""
    if not ALIAS.match(alias):
        return f"alias {alias!r}: letters, digits, _ and - only"
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        return f"alias {alias!r} is reserved by MLflow (latest, or v and a number)"
    return None


# -- the registry -------------------------------------------------------------------------------

_LOCK = threading.Lock()


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ModelLoadError(f"models:/ references need MLflow: {INSTALL}") from None
    return mlflow


def client(uri: str | None) -> Any:
    """An MLflow client for the registry at ``uri`` (None: MLflow's environment)."""
    mlflow = _mlflow()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _registry_uri(uri: str | None) -> Iterator[Any]:
    """MLflow's loaders read a process-wide registry URI: set it for one load at a time."""
    mlflow = _mlflow()
    with _LOCK:
        if uri is None:
            yield mlflow
            return
        before_registry, before_tracking = mlflow.get_registry_uri(), mlflow.get_tracking_uri()
        mlflow.set_registry_uri(uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield mlflow
        finally:
            mlflow.set_registry_uri(before_registry)
            mlflow.set_tracking_uri(before_tracking)


def _where(uri: str | None) -> str:
    return uri or "the registry in MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI"


def resolve(ref: RegistryRef, uri: str | None) -> ModelVersion:
    """The version ``ref`` names now (an alias followed once)."""
    c = client(uri)
    try:
        if ref.alias is not None:
            mv = c.get_model_version_by_alias(ref.name, ref.alias)
        else:
            mv = c.get_model_version(ref.name, ref.version)
    except Exception as exc:  # MlflowException, or the registry is unreachable
        raise RegistryError(f"{ref.ref}: {_why(exc)} (at {_where(uri)}); check the name and "
                            "the version or alias with the MLflow UI or MlflowClient") from None
    return ModelVersion(mv.name, str(mv.version), mv.run_id or None, mv.source or None)


def _why(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def move_alias(uri: str | None, name: str, alias: str, version: str) -> str | None:
    """Point ``alias`` of model ``name`` at ``version``; return the version it pointed at
    before (None: the alias is new). Moving it where it already points changes nothing."""
    c = client(uri)
    try:
        try:
            before: str | None = str(c.get_model_version_by_alias(name, alias).version)
        except Exception:  # no such alias yet
            before = None
        if before != version:
            c.set_registered_model_alias(name, alias, version)
    except Exception as exc:
        raise RegistryError(f"cannot move alias {alias!r} of {name!r} to version {version} "
                            f"({_why(exc)}, at {_where(uri)})") from None
    return before


# -- loading ------------------------------------------------------------------------------------


class PyfuncModel(SyncBackend):
    """An MLflow model of any flavour, called through its ``pyfunc`` interface: rows that are
    mappings become a data frame's columns, lists its rows."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name

    def _call(self, rows: Rows) -> tuple[list[Any], list[float] | None]:
        import numpy as np
        import pandas as pd

        frame = pd.DataFrame(list(rows)) if rows and isinstance(rows[0], dict) else \
            pd.DataFrame(np.asarray(rows, dtype=float))
        out = self.model.predict(frame)
        values = np.asarray(out).reshape(len(rows), -1)
        outputs = values[:, 0].tolist() if values.shape[1] == 1 else values.tolist()
        scores = [float(v) for v in values[:, 0]] if values.shape[1] == 1 and np.issubdtype(
            values.dtype, np.number) else None
        return outputs, scores


def load(ref: RegistryRef, uri: str | None) -> SyncBackend:
    """Load the version ``ref`` names: a scikit-learn model as one (its scores from
    ``predict_proba``, its feature order from the model's signature), any other flavour
    through ``pyfunc``."""
    from safeshift.models.sklearn import SklearnModel

    mv = resolve(ref, uri)
    pinned = f"models:/{mv.name}/{mv.version}"
    label = f"{mv.name}/{mv.version}"
    with _registry_uri(uri) as mlflow:
        try:
            info = mlflow.models.get_model_info(pinned)
            if "sklearn" in info.flavors:
                estimator = mlflow.sklearn.load_model(pinned)
                features = None
                signature = info.signature
                if signature is not None and signature.inputs is not None:
                    names = signature.inputs.input_names()
                    features = [str(n) for n in names] if names and all(
                        isinstance(n, str) for n in names) else None
                return SklearnModel(estimator, features, name=label)
            return PyfuncModel(mlflow.pyfunc.load_model(pinned), name=label)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{ref.ref} (version {mv.version}): cannot load it "
                                 f"({type(exc).__name__}: {_why(exc)})") from None


def load_ref(ref: str, uri: str | None) -> SyncBackend:
    return load(parse_ref(ref), uri)


# -- pinning ------------------------------------------------------------------------------------


def has_registry_refs(plan: Plan) -> bool:
    return any(is_registry_ref(plan.variant(arm).model) for arm in ("baseline", *plan.variants))


def pin(plan: Plan, *, stored: Mapping[str, Any] | None = None) -> Plan:
    """``plan`` with every ``models:/NAME@ALIAS`` replaced by the version it points at now, and
    every registry side that gave no ``version:`` labelled ``NAME/VERSION`` (see the module's
    docstring). ``stored``: the canonical plan a store already holds under this rollout name;
    when it is this plan pinned earlier, its versions are kept (a restart serves what the
    rollout started with, wherever the aliases point by now, and asks the registry nothing).
    A plan without registry references is returned as it is."""
    if not has_registry_refs(plan):
        return plan
    if stored is not None:
        kept = _pinned_as(plan, stored)
        if kept is not None:
            return kept
    uri = plan.registry_uri

    def resolved(ref: RegistryRef, arm: int) -> RegistryRef:
        mv = resolve(ref, uri)
        return RegistryRef(mv.name, mv.version)

    return _pinned(plan, resolved)


def _sides(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc["baseline"], doc["candidate"], *doc.get("challengers", [])]


def _pinned(plan: Plan, resolved: Callable[[RegistryRef, int], RegistryRef | None]) -> Plan:
    """``plan`` with each alias side pinned to ``resolved(ref, side index)``."""
    from safeshift.plan import Plan as PlanType

    doc = plan.canonical()
    for i, side in enumerate(_sides(doc)):
        if not is_registry_ref(side["model"]):
            continue
        ref = parse_ref(side["model"])
        default_label = side.get("version") == ref.label
        if ref.alias is not None:
            pinned_ref = resolved(ref, i)
            if pinned_ref is None:
                raise RegistryError(f"{ref.ref}: not pinned")
            ref = pinned_ref
            side["model"] = ref.ref
        if default_label:
            side["version"] = ref.label
    return PlanType.from_dict(doc, base_dir=plan.base_dir, source=f"plan {plan.rollout}")


def _pinned_as(plan: Plan, stored: Mapping[str, Any]) -> Plan | None:
    """``plan`` pinned to the versions of ``stored``, if that makes it ``stored``; else None."""
    try:
        sides = _sides(dict(stored))
    except (KeyError, TypeError):
        return None

    def as_stored(ref: RegistryRef, i: int) -> RegistryRef | None:
        model = sides[i].get("model") if i < len(sides) else None
        m = _REF.match(model) if isinstance(model, str) else None
        if m is None or m.group("name") != ref.name or m.group("version") is None:
            return None
        return RegistryRef(ref.name, m.group("version"))

    try:
        kept = _pinned(plan, as_stored)
    except (RegistryError, ModelLoadError, ValueError):
        return None
    return kept if kept.canonical() == dict(stored) else None


__all__ = ["ModelVersion", "PyfuncModel", "RegistryError", "RegistryRef", "alias_problem",
           "has_registry_refs", "is_registry_ref", "load", "load_ref", "move_alias",
           "parse_ref", "pin", "resolve"]
