"""The OpenAPI document against the running gateway, fuzzed by schemathesis: every documented
status, no 500s, schema-valid requests accepted and schema-violating ones rejected."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_helpers import make_plan, running

from safeshift.gateway import create_app

pytestmark = pytest.mark.process


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None
    # a body limit above the largest schema-valid batch, so that 1001 items get 422, not 413
    app = create_app([make_plan()], auth=False, store="memory://", tick_interval=3600,
                     max_body_bytes=64 << 20)
    infer = "/infer$"  # unversioned and pinned to a version
    # the control API: a schema-valid plan or token request can still be refused (a plan's
    # stages must make sense, a token's name must be free), so acceptance is not checked
    control = "^/v1/(rollouts|tokens|denials)"
    common = ["--seed", "1", "--generation-database", "none", "--max-examples", "25"]
    with running(app) as url:
        runs = [  # tensor data must match its datatype and shape, which a schema cannot say
            [cli, "run", f"{url}/openapi.json", "--checks", "all", "--exclude-path-regex",
             f"{infer}|{control}", *common],
            [cli, "run", f"{url}/openapi.json", "--checks", "all", "--include-path-regex",
             control, "--exclude-checks", "positive_data_acceptance", *common],
            [cli, "run", f"{url}/openapi.json", "--checks", "all", "--include-path-regex", infer,
             "--exclude-checks", "positive_data_acceptance", *common]]
        for args in runs:
            out = subprocess.run(args, capture_output=True, text=True, timeout=240,
                                 cwd=tmp_path)
            assert out.returncode == 0, out.stdout[-4000:]
