"""Notifications against a real receiver on 127.0.0.1: signed, written with their decision,
delivered once each and in order through an outage and a restart, dead-lettered and requeued;
Slack's shape; and the confirm gate that holds a stage until its hook says go."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ROOT, plan_dict
from tests.notify_receiver import Receiver

from safeshift import FakeModel, Phase, Plan, Rollout, VirtualClock
from safeshift.errors import ConcurrencyError, PlanValidationError
from safeshift.notify import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    backoff,
    deliver_due,
    render,
    verify,
)
from safeshift.plan import plan_json_schema
from safeshift.state import Action, OutboxEntry
from safeshift.store import MemoryStore, SQLStore, Store, sqlite_url

pytestmark = pytest.mark.timeout(120)

SECRET_ENV = "SAFESHIFT_TEST_WEBHOOK_SECRET"
SECRET = "webhook-secret-for-tests"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=2.0) as client:
        yield client


def hook_plan(url: str, *, hooks: list[dict[str, Any]] | None = None, **changes: Any) -> Plan:
    hooks = hooks if hooks is not None else [{"url": f"{url}/hook", "secret_env": SECRET_ENV}]
    return Plan.from_dict(plan_dict(notifications=hooks, **changes))


def rollout_for(plan: Plan, store: Store, clock: VirtualClock, *, start: bool = True) -> Rollout:
    return Rollout.from_plan(plan, store=store, clock=clock, start=start,
                             models={"baseline": FakeModel(output=1),
                                     "candidate": FakeModel(output=1)})


def five_decisions(rollout: Rollout, clock: VirtualClock) -> None:
    """start (already taken by from_plan), pause, resume, pause, rollback: five events."""
    for action in (Action.PAUSE, Action.RESUME, Action.PAUSE, Action.ROLLBACK):
        clock.advance(1)
        rollout.act(action, actor="alice", reason=f"drill {action}")


def _documented_verifier() -> Callable[[str, bytes, str], bool]:
    """The receiver's check exactly as docs/gateway.md#notifications shows it."""
    text = (ROOT / "docs" / "gateway.md").read_text()
    code = text.split("**Verifying the signature**", 1)[1].split("```python", 1)[1]
    namespace: dict[str, Any] = {}
    exec(code.split("```", 1)[0], namespace)
    verified: Callable[[str, bytes, str], bool] = namespace["verified"]
    return verified


receiver_verifies = _documented_verifier()


def test_the_documented_check_is_hmac_sha256_over_the_body() -> None:
    body = b'{"seq":1}'
    header = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert receiver_verifies("k", body, header) and not receiver_verifies("k", body + b"x", header)


# -- payload, headers, signature ----------------------------------------------------------


def test_each_notification_is_signed_and_names_its_event_and_delivery(
        store: Store, receiver: Receiver, http: httpx.Client, clock: VirtualClock) -> None:
    plan = hook_plan(receiver.url)
    rollout = rollout_for(plan, store, clock)
    clock.advance(5)
    rollout.pause(actor="alice", reason="checking a dashboard")
    report = deliver_due(store, clock.now(), client=http)
    assert (report.delivered, report.failed, report.dead) == (2, 0, 0)
    got = receiver.accepted()
    assert [r.json()["event"] for r in got] == ["stage_change", "pause"]
    ids = [e.id for e in sorted(store.outbox(rollout=plan.rollout), key=lambda e: e.id)]
    assert [int(r.headers[DELIVERY_HEADER.lower()]) for r in got] == ids
    for r in got:
        header = r.headers[SIGNATURE_HEADER.lower()]
        assert header.startswith("sha256=") and receiver_verifies(SECRET, r.body, header)
        assert verify(SECRET, r.body, header)
        assert not verify(SECRET, r.body + b" ", header)  # over the exact body
        assert not receiver_verifies("another secret", r.body, header)
        assert r.headers[EVENT_HEADER.lower()] == r.json()["event"]
        assert r.headers["content-type"] == "application/json"
    pause = got[1].json()
    assert {k: pause[k] for k in ("rollout", "seq", "event", "action", "phase", "from_phase",
                                  "from_stage", "to_stage", "reason", "actor", "endpoint",
                                  "baseline", "candidate")} == {
        "rollout": plan.rollout, "seq": 2, "event": "pause", "action": "pause",
        "phase": "paused", "from_phase": "running", "from_stage": "canary",
        "to_stage": "canary", "reason": "paused by alice (checking a dashboard)",
        "actor": "alice", "endpoint": "score", "baseline": "v1", "candidate": "v2"}
    assert pause["at"].endswith("Z") and isinstance(pause["evidence"], dict)
    start = got[0].json()
    assert (start["action"], start["from_stage"], start["to_stage"]) == ("start", None, "canary")


def test_an_unsigned_webhook_has_no_signature_and_a_missing_secret_is_not_sent_unsigned(
        receiver: Receiver, http: httpx.Client, clock: VirtualClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    plan = hook_plan(receiver.url, hooks=[{"url": f"{receiver.url}/hook"},
                                          {"url": f"{receiver.url}/signed",
                                           "secret_env": "SAFESHIFT_TEST_UNSET_SECRET"}])
    monkeypatch.delenv("SAFESHIFT_TEST_UNSET_SECRET", raising=False)
    rollout_for(plan, store, clock)
    report = deliver_due(store, clock.now(), client=http)
    assert (report.delivered, report.failed) == (1, 1)
    assert SIGNATURE_HEADER.lower() not in receiver.accepted()[0].headers
    assert receiver.on("/signed") == []  # never sent unsigned
    [held] = store.outbox(status="pending")
    assert "SAFESHIFT_TEST_UNSET_SECRET" in held.last_error and "not set" in held.last_error


def test_a_webhook_gets_only_the_events_it_asks_for(store: Store, receiver: Receiver,
                                                     http: httpx.Client,
                                                     clock: VirtualClock) -> None:
    plan = hook_plan(receiver.url, hooks=[
        {"url": f"{receiver.url}/hook"},
        {"url": f"{receiver.url}/incidents", "events": ["rollback", "pause"]}])
    rollout = rollout_for(plan, store, clock)
    five_decisions(rollout, clock)
    entries = sorted(store.outbox(rollout=plan.rollout), key=lambda e: e.id)
    assert [(e.seq, e.event) for e in entries if e.target.endswith("/incidents")] == [
        (2, "pause"), (3, "pause"), (4, "pause"), (5, "rollback")]  # resume is a pause event
    assert len([e for e in entries if e.target.endswith("/hook")]) == 5
    deliver_due(store, clock.now(), client=http)
    assert [r.json()["action"] for r in receiver.accepted("/incidents")] == [
        "pause", "resume", "pause", "rollback"]


# -- the outbox is written with its decision --------------------------------------------------


def test_an_outbox_entry_is_written_atomically_with_its_decision(
        store: Store, clock: VirtualClock) -> None:
    plan = hook_plan("http://127.0.0.1:9", hooks=[
        {"url": "http://127.0.0.1:9/a"}, {"url": "http://127.0.0.1:9/b", "events": ["rollback"]}])
    rollout = rollout_for(plan, store, clock)
    [decision] = store.decisions(plan.rollout)
    [entry] = store.outbox(rollout=plan.rollout)  # the start: /b wants only rollbacks
    assert (entry.seq, entry.event, entry.target, entry.status) == (
        decision.seq, "stage_change", "http://127.0.0.1:9/a", "pending")
    assert entry.created_at == entry.next_attempt_at == decision.at
    # a commit that fails (another controller moved the state) writes no notification either
    state = store.get_state(plan.rollout)
    stale = OutboxEntry(plan.rollout, 99, "pause", "http://127.0.0.1:9/a", {"body": {}},
                        clock.now())
    with pytest.raises(ConcurrencyError):
        store.commit(state, expected_version=state.version - 1, outbox=[stale])
    assert [e.seq for e in store.outbox(rollout=plan.rollout)] == [1]
    rollout.rollback(actor="alice", reason="drill")
    assert sorted((e.seq, e.target[-1]) for e in store.outbox(rollout=plan.rollout)) == [
        (1, "a"), (2, "a"), (2, "b")]
    assert [d.seq for d in store.decisions(plan.rollout)] == [1, 2]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_notification_that_cannot_be_written_takes_its_decision_with_it(
        kind: str, tmp_path: Path, clock: VirtualClock, request: pytest.FixtureRequest) -> None:
    url = (sqlite_url(tmp_path / "s.db") if kind == "sqlite"
           else request.getfixturevalue("postgres_db_url"))
    store = SQLStore(url)
    try:
        plan = hook_plan("http://127.0.0.1:9")
        rollout_for(plan, store, clock)
        state = store.get_state(plan.rollout)
        before = (state.version, len(store.decisions(plan.rollout)),
                  len(store.audit_events(plan.rollout)))
        moved = state.copy()
        moved.reason = "this must not be written"
        broken = OutboxEntry(plan.rollout, 2, "pause", None, {}, clock.now())  # type: ignore[arg-type]
        with pytest.raises(Exception, match=r"(?i)null"):
            store.commit(moved, expected_version=state.version, outbox=[broken])
        after = store.get_state(plan.rollout)
        assert (after.version, len(store.decisions(plan.rollout)),
                len(store.audit_events(plan.rollout))) == before
        assert after.reason != "this must not be written"
        assert [e.seq for e in store.outbox()] == [1]
    finally:
        store.close()


# -- delivery through an outage, in order, once ------------------------------------------------


def test_a_receiver_down_for_30_s_then_up_gets_every_event_once_in_order(
        tmp_path: Path, http: httpx.Client, clock: VirtualClock) -> None:
    """The 30 s are virtual: the VirtualClock steps 1 s per delivery round while the
    receiver's port is bound but not listening (connections refused); then it listens, first
    answering 503 twice, and the rounds go on. Real time: well under a second."""
    store = SQLStore(sqlite_url(tmp_path / "s.db"))
    with Receiver(listening=False) as receiver:
        plan = hook_plan(receiver.url)
        other = hook_plan(receiver.url, rollout="other-rollout", endpoint="other")
        rollout, second = rollout_for(plan, store, clock), rollout_for(other, store, clock)
        five_decisions(rollout, clock)
        five_decisions(second, clock)
        down_from = clock.now()
        attempts_at = []
        while clock.now() - down_from < 30:
            report = deliver_due(store, clock.now(), client=http)
            assert report.delivered == 0
            if report.failed:
                attempts_at.append(clock.now() - down_from)
            clock.advance(1)
        # the head of each rollout's queue was retried with backoff (1, 2, 4, 8 s ...)
        assert attempts_at == [0, 1, 3, 7, 15]
        pending = store.outbox(status="pending")
        assert len(pending) == 10
        heads = [e for e in pending if e.attempts]
        assert sorted(e.seq for e in heads) == [1, 1]  # later ones were held back, not tried
        assert all("cannot reach" in e.last_error for e in heads)
        receiver.statuses = [503, 503]
        receiver.up()
        for _ in range(120):
            deliver_due(store, clock.now(), client=http)
            if store.outbox_counts()["pending"] == 0:
                break
            clock.advance(1)
    store.close()
    assert receiver.statuses == []  # the 503s were answered, and retried
    got = receiver.accepted()
    ids = [r.headers[DELIVERY_HEADER.lower()] for r in got]
    assert len(ids) == len(set(ids)) == 10  # every event once
    for name in (plan.rollout, other.rollout):
        mine = [r.json() for r in got if r.json()["rollout"] == name]
        assert [b["seq"] for b in mine] == [1, 2, 3, 4, 5]  # in order
        assert [b["action"] for b in mine] == ["start", "pause", "resume", "pause", "rollback"]
    assert all(receiver_verifies(SECRET, r.body, r.headers[SIGNATURE_HEADER.lower()])
               for r in got)


def test_pending_notifications_survive_a_restart(tmp_path: Path, http: httpx.Client,
                                                 clock: VirtualClock) -> None:
    path = tmp_path / "s.db"
    with Receiver() as receiver:
        first = SQLStore(sqlite_url(path))
        plan = hook_plan(receiver.url)
        five_decisions(rollout_for(plan, first, clock), clock)
        # the process claims the first entry, then dies before posting or settling it
        [claimed] = first.claim_outbox(clock.now(), limit=10, lease=60)
        assert claimed.seq == 1
        first.close()
        again = SQLStore(sqlite_url(path))  # a new process on the same file
        assert deliver_due(again, clock.now(), client=http).attempted == 0  # still claimed
        clock.advance(61)  # the claim lapsed: the entry is due again
        report = deliver_due(again, clock.now(), client=http)
        assert report.delivered == 5
        assert [r.json()["seq"] for r in receiver.accepted()] == [1, 2, 3, 4, 5]
        assert deliver_due(again, clock.now() + 3600, client=http).attempted == 0
        assert again.outbox_counts() == {"pending": 0, "delivered": 5, "dead": 0}
        again.close()


def test_dead_letter_after_the_last_attempt_and_retry_dead(
        store: Store, receiver: Receiver, http: httpx.Client, clock: VirtualClock) -> None:
    plan = hook_plan(receiver.url)
    rollout = rollout_for(plan, store, clock)
    rollout.pause(actor="alice", reason="drill")
    receiver.statuses = [503, 503, 503]
    outcomes = []
    for _ in range(20):
        r = deliver_due(store, clock.now(), client=http, max_attempts=3)
        outcomes.append((r.delivered, r.failed, r.dead))
        clock.advance(5)
    assert outcomes[:3] == [(0, 1, 0), (0, 1, 0), (1, 0, 1)]  # the dead one holds back no more
    [dead] = store.outbox(status="dead")
    assert (dead.seq, dead.attempts) == (1, 3) and "HTTP 503" in dead.last_error
    assert store.outbox_counts() == {"pending": 0, "delivered": 1, "dead": 1}
    assert store.requeue_dead(clock.now(), rollout=plan.rollout) == 1
    assert deliver_due(store, clock.now(), client=http).delivered == 1
    assert [r.json()["seq"] for r in receiver.accepted()] == [2, 1]
    assert store.outbox_counts() == {"pending": 0, "delivered": 2, "dead": 0}


def test_backoff_doubles_to_a_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4, 9, 10, 12)] == [1, 2, 4, 8, 256, 300, 300]
    assert backoff(3, base=0.1, cap=0.3) == pytest.approx(0.3)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_replicas_claiming_at_once_never_claim_one_entry_twice(
        kind: str, tmp_path: Path, clock: VirtualClock, request: pytest.FixtureRequest) -> None:
    url = (sqlite_url(tmp_path / "s.db") if kind == "sqlite"
           else request.getfixturevalue("postgres_db_url"))
    stores = [SQLStore(url) for _ in range(4)]
    try:
        for i in range(30):  # 30 queues: 30 rollouts with one webhook each
            plan = hook_plan("http://127.0.0.1:9", rollout=f"r{i}", endpoint=f"e{i}")
            rollout_for(plan, stores[0], clock)
        claimed: list[list[int]] = [[] for _ in stores]
        barrier = threading.Barrier(len(stores))

        def claim(k: int) -> None:
            barrier.wait()
            for _ in range(10):
                claimed[k] += [e.id for e in stores[k].claim_outbox(clock.now(), limit=2,
                                                                    lease=60)]

        threads = [threading.Thread(target=claim, args=(k,)) for k in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        everything = [i for ids in claimed for i in ids]
        assert len(everything) == len(set(everything)) == 30
    finally:
        for s in stores:
            s.close()


# -- Slack -------------------------------------------------------------------------------------


def test_slack_format_is_an_incoming_webhook_message(receiver: Receiver, http: httpx.Client,
                                                     clock: VirtualClock) -> None:
    store = MemoryStore()
    plan = hook_plan(receiver.url, hooks=[{"url": f"{receiver.url}/hook", "format": "slack",
                                           "events": ["rollback"]}])
    rollout = rollout_for(plan, store, clock)
    rollout.rollback(actor="alice", reason="p99 <250ms> & rising")
    deliver_due(store, clock.now(), client=http)
    [got] = receiver.accepted()
    message = got.json()
    assert set(message) == {"text", "blocks"}
    assert isinstance(message["text"], str) and "test-rollout" in message["text"]
    assert [b["type"] for b in message["blocks"]] == ["header", "section", "section", "context"]
    header = message["blocks"][0]["text"]
    assert header["type"] == "plain_text" and header["text"] == "test-rollout: rolled back"
    section = message["blocks"][1]["text"]
    assert section["type"] == "mrkdwn"
    assert "p99 &lt;250ms&gt; &amp; rising" in section["text"]  # Slack's escapes
    fields = message["blocks"][2]["fields"]
    assert all(f["type"] == "mrkdwn" and len(f["text"]) <= 2000 for f in fields)
    assert len(fields) <= 10
    assert got.headers[EVENT_HEADER.lower()] == "rollback"
    [entry] = store.outbox()
    assert render(entry) == got.body  # the same bytes on every attempt


# -- the confirm gate --------------------------------------------------------------------------


def traffic(rollout: Rollout, clock: VirtualClock, rng: random.Random, *, steps: int) -> None:
    for _ in range(steps):
        for _ in range(60):
            rollout.predict({"x": 1}, unit=f"u{rng.randrange(1_000_000)}",
                            context={"country": rng.choice(["US", "BR", "IN", "GB"])})
        clock.advance(10)
        rollout.tick()


def test_the_confirm_gate_holds_a_stage_until_the_hook_says_go(
        receiver: Receiver, clock: VirtualClock) -> None:
    data = plan_dict()
    data["stages"][1]["confirm"] = {"url": f"{receiver.url}/confirm", "secret_env": SECRET_ENV,
                                    "timeout": "1s"}
    plan = Plan.from_dict(data)
    rollout = rollout_for(plan, MemoryStore(), clock)
    receiver.confirm = [{"go": False, "reason": "change freeze until Monday"}]
    rng = random.Random(3)
    for _ in range(300):  # until the canary passes and the hook is asked
        traffic(rollout, clock, rng, steps=1)
        if receiver.on("/confirm"):
            break
    asked = receiver.on("/confirm")
    assert asked, "the canary never passed"
    traffic(rollout, clock, rng, steps=5)  # the hook keeps saying no
    state = rollout.state()
    assert (state.phase, state.stage_index) == (Phase.RUNNING, 0)  # the canary keeps running
    assert state.reason.startswith(f"waiting for confirm hook {receiver.url}/confirm to answer go "
                                   "before stage 'half' starts: it answered go: false (change "
                                   "freeze until Monday)")
    assert [d.action for d in rollout.decisions()] == [Action.START]
    assert len(receiver.on("/confirm")) >= 6  # asked again on every tick
    proposal = asked[0]
    assert receiver_verifies(SECRET, proposal.body, proposal.headers[SIGNATURE_HEADER.lower()])
    assert proposal.headers[EVENT_HEADER.lower()] == "confirm"
    body = proposal.json()
    assert (body["action"], body["from_stage"], body["to_stage"], body["phase"]) == (
        "advance", "canary", "half", "running")
    assert body["evidence"]["guardrails"][0]["status"] == "pass"
    # a hold writes the state once, not on every tick
    version = rollout.state().version
    traffic(rollout, clock, rng, steps=3)
    assert rollout.state().version == version
    receiver.confirm = [{"go": True}]
    traffic(rollout, clock, rng, steps=1)
    state = rollout.state()
    assert (state.phase, state.stage_index) == (Phase.RUNNING, 1)
    advance = rollout.decisions()[-1]
    assert advance.action is Action.ADVANCE
    assert advance.reason.endswith(f"; confirmed by hook {receiver.url}/confirm")


@pytest.mark.parametrize("answer", ["unreachable", 500, {"ok": True}, {"go": "yes"}, "slow"])
def test_a_confirm_hook_that_does_not_answer_go_holds_and_the_reason_says_so(
        answer: Any, clock: VirtualClock) -> None:
    with Receiver(listening=answer != "unreachable") as receiver:
        if answer == "slow":
            receiver.delay = 0.5
        elif answer != "unreachable":
            receiver.confirm = [answer]
        data = plan_dict()
        data["stages"][0]["confirm"] = {"url": f"{receiver.url}/confirm?token=x",
                                        "timeout": "200ms"}
        plan = Plan.from_dict(data)
        rollout = rollout_for(plan, MemoryStore(), clock)  # from_plan ticks: the start is held
        for _ in range(3):
            clock.advance(60)
            assert rollout.tick() is None
        state = rollout.state()
        assert state.phase is Phase.PENDING and rollout.decisions() == []  # never skipped
        said = {"unreachable": "it is unreachable (ConnectError", 500: "it answered HTTP 500",
                "slow": "it is unreachable (ReadTimeout"}.get(
            answer if isinstance(answer, str | int) else "",
            'it answered 200 without {"go": true}' if answer == {"ok": True}
            else 'it answered go: "yes"')
        assert state.reason.startswith(f"waiting for confirm hook {receiver.url}/confirm to "
                                       f"answer go before stage 'canary' starts: {said}")
        assert "token" not in state.reason  # the query (maybe a secret) is not repeated
        receiver.delay = 0.0
        receiver.confirm = [{"go": True}]
        if answer == "unreachable":
            receiver.up()
        assert rollout.tick() is not None
        assert rollout.state().phase is Phase.RUNNING


def test_operator_actions_do_not_ask_the_confirm_hook(clock: VirtualClock) -> None:
    data = plan_dict()
    data["stages"][1]["confirm"] = {"url": "http://127.0.0.1:9/confirm"}
    plan = Plan.from_dict(data)
    rollout = rollout_for(plan, MemoryStore(), clock)
    # a rollback is never held, and promotion by hand is a person's confirmation
    assert rollout.promote(actor="alice", reason="hotfix").action is Action.PROMOTE


# -- the plan and the CLI ----------------------------------------------------------------------


def test_plan_fields_validate_and_are_in_the_schema() -> None:
    import jsonschema

    def problems(**changes: Any) -> dict[str, str]:
        with pytest.raises(PlanValidationError) as info:
            Plan.from_dict(plan_dict(**changes))
        return {p.path: p.message for p in info.value.problems}

    assert "notifications.0.url" in problems(notifications=[{"url": "ftp://x/y"}])
    bad = problems(notifications=[{"url": "https://x.example/h", "secret_env": "MY-SECRET"}])
    assert "not an environment variable name" in bad["notifications.0.secret_env"]
    assert "notifications.0.format" in problems(notifications=[{"url": "https://x.example",
                                                                "format": "teams"}])
    stages = plan_dict()["stages"]
    stages[1]["confirm"] = {"url": "https://x.example/c", "timeout": "5m"}
    assert "stages.1.confirm.timeout" in problems(stages=stages)
    # a plan without them keeps its hash: stored rollouts still match their plans
    assert "notifications" not in Plan.from_dict(plan_dict()).canonical()
    good = plan_dict(notifications=[{"url": "https://hooks.example.com/x", "format": "slack",
                                     "events": ["rollback", "promotion"],
                                     "secret_env": "SAFESHIFT_WEBHOOK_SECRET"}])
    good["stages"][1]["confirm"] = {"url": "https://ci.example.com/go", "timeout": "2s"}
    plan = Plan.from_dict(good)
    assert Plan.from_dict(plan.canonical()).hash == plan.hash
    schema = plan_json_schema()
    jsonschema.validate(good, schema)
    for wrong in ({"url": "ftp://x"}, {"url": "https://x.example", "secret_env": "1X"},
                  {"url": "https://x.example", "events": ["deploy"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(plan_dict(notifications=[wrong]), schema)


def test_cli_lists_the_outbox_and_requeues_dead_entries(tmp_path: Path,
                                                         clock: VirtualClock) -> None:
    path = tmp_path / "s.db"
    store = SQLStore(sqlite_url(path))
    plan = hook_plan("http://127.0.0.1:9")
    rollout_for(plan, store, clock).pause(actor="alice", reason="drill")
    [first] = store.claim_outbox(clock.now(), limit=5, lease=60)  # the head: seq 1
    first.attempts, first.dead, first.last_error = 12, True, "127.0.0.1 answered HTTP 503"
    store.settle_outbox([first])
    store.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "safeshift.cli", "notify", *args,
                               "--store", str(path)], capture_output=True, text=True,
                              timeout=60, check=False)

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["seq"], r["status"]) for r in rows] == [(2, "pending"), (1, "dead")]
    assert rows[1]["last_error"] == "127.0.0.1 answered HTTP 503"
    text = cli("list", "--status", "dead")
    assert text.returncode == 0 and "HTTP 503" in text.stdout and "pause" not in text.stdout
    retried = cli("retry-dead", "--rollout", plan.rollout)
    assert retried.returncode == 0 and "requeued 1" in retried.stdout
    again = SQLStore(sqlite_url(path))
    assert again.outbox_counts() == {"pending": 2, "delivered": 0, "dead": 0}
    again.close()


def test_a_version_3_store_gains_the_outbox_by_migration(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from safeshift.errors import StoreError
    from safeshift.store import SCHEMA_VERSION

    url = sqlite_url(tmp_path / "old.db")
    SQLStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # as release 3 left it: no outbox, version 3
        conn.exec_driver_sql("DROP TABLE outbox")
        conn.exec_driver_sql("UPDATE safeshift_schema SET version = 3")
    engine.dispose()
    with pytest.raises(StoreError, match="store migrate"):
        SQLStore(url, migrate=False)  # a command that only reads says how to upgrade
    store = SQLStore(url)
    assert SCHEMA_VERSION >= 4 and store.schema_version() == SCHEMA_VERSION
    assert store.outbox_counts() == {"pending": 0, "delivered": 0, "dead": 0}
    store.close()
