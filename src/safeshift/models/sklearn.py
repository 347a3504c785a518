"""scikit-learn (or any estimator) saved with joblib: ``joblib:models/churn_v1.joblib``.

The file holds either an estimator, or a bundle ``{"model": estimator, "features": [...]}`` that
names the feature order so that rows can be sent as mappings. ``predict_proba`` supplies the
score (probability of the last class) where the estimator has it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from safeshift.errors import ModelLoadError
from safeshift.models.base import Rows, SyncBackend, oip_datatype


class SklearnModel(SyncBackend):
    """An in-process estimator with ``predict`` (and optionally ``predict_proba``)."""

    def __init__(self, estimator: Any, features: list[str] | None = None, name: str = "sklearn"):
        if not hasattr(estimator, "predict"):
            raise ModelLoadError(f"{name}: object of type {type(estimator).__name__} has no predict()")
        self.estimator = estimator
        names = features
        if names is None and hasattr(estimator, "feature_names_in_"):
            names = [str(f) for f in estimator.feature_names_in_]
        self.features = names
        self._feature_set = frozenset(names or ())
        self.name = name
        self._proba = hasattr(estimator, "predict_proba")
        # fitted on a data frame (with feature names), called with arrays: scikit-learn warns on
        # every call; only then is the warning filter swapped (it costs microseconds a call, and
        # the swap is not thread-safe: the candidate's pool thread predicts concurrently)
        self._named = hasattr(estimator, "feature_names_in_")

    @classmethod
    def load(cls, path: Path) -> SklearnModel:
        if not path.exists():
            raise ModelLoadError(f"joblib:{path}: no such file; paths are relative to the plan file")
        try:
            obj = joblib.load(path)
        except Exception as exc:
            raise ModelLoadError(f"joblib:{path}: cannot load it ({type(exc).__name__}: {exc})") from None
        if isinstance(obj, dict) and "model" in obj:
            return cls(obj["model"], obj.get("features"), name=path.name)
        return cls(obj, name=path.name)

    def to_matrix(self, rows: Rows) -> np.ndarray:
        if rows and isinstance(rows[0], dict):
            if self.features is None:
                raise ValueError("this model does not name its features; send rows as lists")
            if not rows[0].keys() >= self._feature_set:
                missing = [f for f in self.features if f not in rows[0]]
                raise ValueError(f"missing feature(s) {', '.join(missing[:5])}")
            return np.array([[row[f] for f in self.features] for row in rows], dtype=float)
        return np.asarray(rows, dtype=float)

    @property
    def output_datatype(self) -> str | None:
        """The Open Inference Protocol datatype of this model's outputs: its classes' for a
        classifier, FP64 for a regressor, None when the estimator does not say."""
        classes = getattr(self.estimator, "classes_", None)
        if classes is not None:
            return oip_datatype(np.asarray(classes).tolist())[0]
        from sklearn.base import is_regressor

        return "FP64" if is_regressor(self.estimator) else None

    def _call(self, rows: Rows) -> tuple[list[Any], list[float] | None]:
        x = self.to_matrix(rows)
        if not self._named:
            return self._estimate(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fitted with names, called with arrays
            return self._estimate(x)

    def _estimate(self, x: np.ndarray) -> tuple[list[Any], list[float] | None]:
        if self._proba:
            proba = self.estimator.predict_proba(x)
            classes = self.estimator.classes_
            outputs = classes[proba.argmax(axis=1)].tolist()
            return outputs, proba[:, -1].astype(float).tolist()
        pred = self.estimator.predict(x)
        values = np.asarray(pred).tolist()
        scores = [float(v) for v in values] if np.issubdtype(np.asarray(pred).dtype, np.number) else None
        return values, scores
