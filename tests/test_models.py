"""Model backends: errors, timeouts, NaN and wrong shapes come back as data."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import joblib
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

from safeshift import FakeModel, ModelLoadError
from safeshift.models import PythonModel, SklearnModel, call_with_timeout, load_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = load_breast_cancer()
    model = LogisticRegression(max_iter=5000).fit(data.data[:, :3], data.target)
    path = tmp_path_factory.mktemp("m") / "m.joblib"
    joblib.dump({"model": model, "features": ["a", "b", "c"]}, path)
    return path


def test_joblib_bundle_accepts_mappings_and_lists(bundle: Path) -> None:
    model = load_model(f"joblib:{bundle.name}", bundle.parent)
    r = model.predict([{"a": 14.0, "b": 20.0, "c": 90.0}, {"a": 20.0, "b": 25.0, "c": 130.0}])
    assert r.ok and len(r.outputs or []) == 2 and r.scores is not None
    assert all(0.0 <= s <= 1.0 for s in r.scores)
    assert model.predict([[14.0, 20.0, 90.0]]).outputs == r.outputs[:1]


def test_joblib_missing_feature_is_an_error_result(bundle: Path) -> None:
    r = load_model(f"joblib:{bundle.name}", bundle.parent).predict([{"a": 1.0}])
    assert not r.ok and "missing feature(s) b, c" in (r.error or "")


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model("joblib:nope.joblib", tmp_path)
    (tmp_path / "bad.joblib").write_text("not a pickle")
    with pytest.raises(ModelLoadError, match="cannot load it"):
        load_model("joblib:bad.joblib", tmp_path)
    with pytest.raises(ModelLoadError, match="unknown model reference"):
        load_model("s3:bucket/key", tmp_path)
    with pytest.raises(ModelLoadError, match="cannot import"):
        load_model("python:no_such_module_xyz:f", tmp_path)
    with pytest.raises(ModelLoadError, match="unknown option"):
        load_model("fake:x?colour=red", tmp_path)
    with pytest.raises(ModelLoadError, match="has no predict"):
        SklearnModel(object())


def test_python_reference_relative_to_the_plan(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(
        "def double(rows):\n    return [r['x'] * 2 for r in rows]\n\n"
        "class Broken:\n    def predict(self, rows):\n        raise ValueError('boom')\n")
    assert load_model("python:mymodel:double", tmp_path).predict([{"x": 2}]).outputs == [4]
    r = load_model("python:mymodel:Broken", tmp_path).predict([{"x": 2}])
    assert not r.ok and r.error == "ValueError: boom"


def test_wrong_shape_and_nan_are_failures() -> None:
    short = PythonModel(lambda rows: [1])
    assert "wrong shape" in (short.predict([{}, {}]).error or "")
    nan = PythonModel(lambda rows: [math.nan for _ in rows])
    assert "non-finite" in (nan.predict([{}]).error or "")
    fake = FakeModel(nan_rate=1.0)
    assert not fake.predict([{}]).ok


def test_fake_model_faults_are_seeded() -> None:
    a = FakeModel(error_rate=0.3, seed=4)
    b = FakeModel(error_rate=0.3, seed=4)
    ra = [a.predict([{}]).ok for _ in range(200)]
    assert ra == [b.predict([{}]).ok for _ in range(200)]
    assert 30 < ra.count(False) < 90
    assert FakeModel.parse("x?output=7&error_rate=0").predict([{}, {}]).outputs == [7, 7]


def test_timeout_comes_back_as_data() -> None:
    slow = FakeModel(latency_ms=300)
    r = asyncio.run(call_with_timeout(slow, [{}], 0.05))
    assert not r.ok and r.timed_out and "timeout after 50 ms" in (r.error or "")
    fast = asyncio.run(call_with_timeout(FakeModel(output=3), [{}], 1.0))
    assert fast.outputs == [3]


def test_sklearn_models_declare_their_output_datatype() -> None:
    from sklearn.linear_model import LinearRegression

    data = load_breast_cancer()
    x, y = data.data[:, :4], data.target
    assert SklearnModel(LogisticRegression(max_iter=500).fit(x, y)).output_datatype == "INT64"
    names = data.target_names[y]  # 'malignant' / 'benign'
    labelled = SklearnModel(LogisticRegression(max_iter=500).fit(x, names))
    assert labelled.output_datatype == "BYTES"
    assert labelled.predict(x[:2].tolist()).outputs[0] in {"malignant", "benign"}
    assert SklearnModel(LinearRegression().fit(x, y.astype(float))).output_datatype == "FP64"
