"""The curl examples of docs/gateway.md work as written: replayed in order against the
example plan (examples/churn), each data-plane call answers 200 (the doc says which one is an
error on purpose)."""

from __future__ import annotations

import json
import re

import httpx
from gateway_helpers import running
from tests.conftest import ROOT

from safeshift import Plan, ops
from safeshift.auth import Role
from safeshift.clock import SystemClock
from safeshift.gateway import create_app
from safeshift.store import MemoryStore

CURL = re.compile(r"^curl -s localhost:8000(?P<path>\S+)(?: -H (?:'[^']*'|\"[^\"]*\"))* "
                  r"-d '(?P<body>.*?)'$", re.MULTILINE | re.DOTALL)


def _examples() -> list[tuple[str, object]]:
    text = (ROOT / "docs" / "gateway.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for m in CURL.finditer(block):
            out.append((m["path"], json.loads(m["body"])))
    return out


def test_the_feedback_and_report_examples_answer_200() -> None:
    examples = _examples()
    paths = [p for p, _ in examples]
    assert "/v1/feedback" in paths and "/v1/reports" in paths  # the regex still finds them
    plan = Plan.load(ROOT / "examples" / "churn" / "plan.yaml")
    store = MemoryStore()
    token, _ = ops.create_token(store, SystemClock(), name="labels-job", role=Role.CLIENT,
                                expires_in=None, rights={"labels": True})
    app = create_app([plan], store=store, tick_interval=3600, access_log=False)
    with running(app) as url, httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {token}"}) as c:
        seen = set()
        for path, body in examples:
            if path.endswith("/predict") and isinstance(body, dict):
                if body.get("id") in seen:
                    continue  # the docs repeat an id on purpose to show the 409
                seen.add(body.get("id"))
            r = c.post(path, json=body)
            assert r.status_code == 200, (path, body, r.text)
