"""A whole rollout through a real ``safeshift serve`` with e-mail addresses as unit ids and as a
segment attribute, request ids that embed them, and phone numbers and e-mails in report text:
then the database, every log line, the webhook payloads and every export hold none of them."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from tests.notify_receiver import Receiver
from tests.serve_process import serve_process

from safeshift import ops
from safeshift.auth import Role
from safeshift.clock import SystemClock
from safeshift.store import open_store

pytestmark = pytest.mark.process

EMAILS = [f"customer.{i}@mail.example.net" for i in range(25)]
PHONES = [f"+1 415 555 01{i:02d}" for i in range(25)]


def _found(blob: bytes) -> list[str]:
    """Every raw personal value in ``blob``: an e-mail, a phone number, their local parts."""
    needles = [*EMAILS, *PHONES, "mail.example.net", "415 555"]
    return [n for n in needles if n.encode() in blob]


def test_the_scan_finds_a_planted_value() -> None:
    assert _found(b"... customer.7@mail.example.net ...") == ["customer.7@mail.example.net",
                                                           "mail.example.net"]
    assert _found(b"phone +1 415 555 0103") == ["+1 415 555 0103", "415 555"]
    assert _found(b"nothing personal") == []


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "safeshift.cli", *args], capture_output=True,
                          timeout=120)


def test_no_raw_personal_value_survives_a_rollout(tmp_path: Path) -> None:
    with Receiver() as receiver:
        plan = {
            "rollout": "support-v2", "endpoint": "support",
            "baseline": {"version": "v1", "model": "fake:base?output=1"},
            "candidate": {"version": "v2", "model": "fake:cand?output=1"},
            "change": {"summary": "a support model"}, "unit": "user_id",
            "segments": ["country", "email"], "personal": ["email"],
            "notifications": [{"url": f"{receiver.url}/hook"}],
            "stages": [{"name": "canary", "traffic": "50%", "min_duration": "1h"},
                       {"name": "full", "traffic": "100%"}],
            "guardrails": [{"metric": "error_rate", "tolerance": 0.05},
                           {"metric": "report_rate", "tolerance": 0.5},
                           {"metric": "accuracy", "tolerance": 0.1}],
        }
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
        store = str(tmp_path / "store.db")
        st = open_store(store)
        client, _ = ops.create_token(st, SystemClock(), name="app", role=Role.CLIENT,
                                     expires_in=None, rights={"labels": True})
        operator, _ = ops.create_token(st, SystemClock(), name="olga", role=Role.OPERATOR,
                                       expires_in=None)
        st.close()
        log = tmp_path / "serve.log"
        with serve_process([tmp_path / "plan.yaml"], store=store, log=log,
                           env={"SAFESHIFT_NOTIFY_INTERVAL": "0.1"}) as url:
            rng = random.Random(9)
            auth = {"authorization": f"Bearer {client}"}
            ids = []
            with httpx.Client(base_url=url, headers=auth, timeout=10) as c:
                for i in range(300):
                    k = rng.randrange(len(EMAILS))
                    body = {"unit": EMAILS[k], "inputs": {"x": 1},
                            "context": {"country": "US", "email": EMAILS[k]}}
                    if i % 3 == 0:
                        body["id"] = f"ticket-{i}-{EMAILS[k]}"  # a client-chosen request id
                    r = c.post("/v1/endpoints/support/predict", json=body)
                    assert r.status_code == 200, r.text
                    ids.append((r.json()["id"], k))
                time.sleep(0.5)  # flushed
                for request_id, _ in ids[:40]:
                    assert c.post("/v1/feedback", json={"id": request_id, "label": 1}
                                  ).status_code == 200
                for request_id, k in ids[40:70]:
                    r = c.post("/v1/reports", json={
                        "id": request_id, "kind": "wrong",
                        "text": f"wrong again, call {PHONES[k]} or write {EMAILS[k]}"})
                    assert r.status_code == 200, r.text
            r = httpx.post(f"{url}/v1/rollouts/support-v2/rollback",
                           json={"reason": "privacy drill"},
                           headers={"authorization": f"Bearer {operator}"})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 20
            while len(receiver.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(receiver.requests) >= 2  # the start and the rollback
        webhooks = b"".join(r.body for r in receiver.requests)
    # what the reviewer would export
    export = tmp_path / "audit.jsonl"
    outputs = [_cli("audit", "export", "support-v2", "-o", str(export), "--store", store)]
    for args in (("report", "support-v2", "--format", "json"),
                 ("report", "support-v2", "--format", "md"),
                 ("report", "support-v2", "--format", "html"),
                 ("history", "support-v2", "--json"), ("status", "support-v2", "--json"),
                 ("privacy", "report", "--json"), ("explain", "support-v2", "--json")):
        outputs.append(_cli(*args, "--store", store))
    for out in outputs:
        assert out.returncode == 0, out.stderr[-2000:]
    st = open_store(store)
    texts = st.report_texts("support-v2")  # once per unit: fewer than the reports sent
    st.close()
    assert len(texts) >= 10 and all("[phone]" in t.text and "[email]" in t.text for t in texts)
    files = [f for f in tmp_path.iterdir() if f.name.startswith("store.db")]
    blobs = {
        "database": b"".join(f.read_bytes() for f in files),
        "log": log.read_bytes(),
        "webhooks": webhooks,
        "audit export": export.read_bytes(),
        "exports": b"".join(o.stdout for o in outputs),
    }
    assert all(blobs.values()), [k for k, v in blobs.items() if not v]
    leaks = {where: _found(blob) for where, blob in blobs.items() if _found(blob)}
    assert not leaks, leaks
    assert b"email=p:" in blobs["database"] and b"email=p:" in blobs["exports"]
