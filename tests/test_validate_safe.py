"""``safeshift validate`` on an untrusted plan runs none of its code: ``python:`` modules are
looked for, not imported, and ``joblib:`` files are checked, not unpickled, unless ``--load``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import joblib
import pytest
import yaml
from tests.conftest import plan_dict
from typer.testing import CliRunner

from safeshift.cli import app as cli
from safeshift.errors import ModelLoadError
from safeshift.models import inspect_model_ref


class _MakesADirectory:
    """Unpickling it calls ``os.mkdir(marker)``: code that runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _plan(tmp_path: Path, baseline: str, candidate: str) -> Path:
    data = plan_dict()
    data["baseline"]["model"] = baseline
    data["candidate"]["model"] = candidate
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _validate(*args: str) -> Any:
    return CliRunner().invoke(cli, ["validate", *args], env={"COLUMNS": "200"})


def test_validate_runs_no_code_from_the_plan_unless_told_to_load(tmp_path: Path) -> None:
    imported, unpickled = tmp_path / "imported", tmp_path / "unpickled"
    (tmp_path / "evil_model.py").write_text(
        f"open({str(imported)!r}, 'w').close()\n\ndef predict(rows):\n    return rows\n")
    joblib.dump(_MakesADirectory(unpickled), tmp_path / "evil.joblib")
    plan = _plan(tmp_path, "python:evil_model:predict", "joblib:evil.joblib")
    res = _validate(str(plan))
    assert res.exit_code == 0, res.output
    assert not imported.exists() and not unpickled.exists()
    res = _validate(str(plan), "--load")
    assert imported.exists() and unpickled.exists()  # --load does what it says
    assert res.exit_code == 2 and "candidate.model" in res.output  # not a model, once loaded


@pytest.mark.parametrize(("ref", "words"), [
    ("python:no_such_module_here:predict", "no module no_such_module_here"),
    ("python:os.path", "write it as python:package.module:callable"),
    ("python:os;rm:predict", "is not a module path"),
    ("joblib:missing.joblib", "no such file"),
    ("joblib:.", "a directory, not a file"),
    ("joblib:notes.txt", "not a joblib or pickle file"),
    ("fake:x?output=1&bogus=2", "bogus"),
])
def test_bad_references_are_named_without_loading(tmp_path: Path, ref: str, words: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError) as info:
        inspect_model_ref(ref, tmp_path)
    assert words in str(info.value)
    plan = _plan(tmp_path, "fake:base?output=1", ref)
    res = _validate(str(plan))
    assert res.exit_code == 2 and "candidate.model" in res.output and words in res.output


def test_good_references_pass_without_loading(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("raise SystemExit('imported')\n")
    (tmp_path / "pkg" / "model.py").write_text("def predict(rows):\n    return rows\n")
    for ref in ("python:pkg.model:predict", "python:json:dumps", "python:math:floor",
                "python:sklearn.dummy:DummyClassifier", "fake:b?output=1",
                "joblib:../../examples/churn/models/churn_v1.joblib"):
        base = tmp_path if not ref.startswith("joblib:") else Path(__file__).parent / "data"
        inspect_model_ref(ref, base)
