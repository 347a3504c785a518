"""Two SQLStore instances on one real PostgreSQL database, racing as gateway replicas would.

The session's server is a throwaway cluster started by ``tests/conftest.py`` (or the one named
by ``$SAFESHIFT_TEST_POSTGRES_URL``); each test gets a fresh database.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
from sqlalchemy.engine import make_url

from safeshift import ConcurrencyError
from safeshift.audit import AuditEvent, verify_chain
from safeshift.state import Action, Decision, Phase, RolloutState
from safeshift.store import SCHEMA_VERSION, SQLStore, open_store
from safeshift.telemetry import TelemetryRow

T = TypeVar("T")


@pytest.fixture
def two_stores(postgres_db_url: str) -> Iterator[tuple[SQLStore, SQLStore]]:
    a, b = SQLStore(postgres_db_url), SQLStore(postgres_db_url)
    yield a, b
    a.close()
    b.close()


def _together(fa: Callable[[], T], fb: Callable[[], T]) -> tuple[T, T]:
    """Run both functions in two threads, released at the same instant."""
    barrier = threading.Barrier(2, timeout=30)

    def wrap(fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            barrier.wait()
            return fn()
        return run

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(wrap(fa)), pool.submit(wrap(fb))
        return first.result(timeout=60), second.result(timeout=60)


def test_concurrent_additive_upserts_sum_exactly(two_stores: tuple[SQLStore, SQLStore]) -> None:
    a, b = two_stores
    cells = [("candidate" if i % 2 else "baseline", f"country=C{i % 5}", 60 * (i % 3))
             for i in range(30)]
    batches, per_batch = 40, 3  # each batch touches every cell: maximal contention

    def writer(store: SQLStore, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(batches):
            rows = [TelemetryRow("r1", 0, arm, "hash", seg, w, sig, 1, 2, 4, {7: 1})
                    for arm, seg, w in cells for sig in ("requests", "latency_ms")
                    for _ in range(per_batch)]
            rng.shuffle(rows)  # writers list rows in different orders: the store must not deadlock
            store.add_telemetry(rows)

    _together(lambda: writer(a, 1), lambda: writer(b, 2))
    rows = a.telemetry("r1")
    assert len(rows) == len(cells) * 2
    expected = 2 * batches * per_batch
    assert {(r.n, r.s, r.ss) for r in rows} == {(expected, 2 * expected, 4 * expected)}
    assert {tuple(r.hist.items()) for r in rows if r.hist} == {((7, expected),)}
    totals = b.telemetry_totals("r1", 0)
    assert sum(t.n for t in totals) == expected * len(cells) * 2


def test_compare_and_set_lets_exactly_one_commit_win(two_stores: tuple[SQLStore, SQLStore]) -> None:
    """Both stores read the same version, then commit at the same instant: one wins, the other
    gets ConcurrencyError and writes nothing (no decision, no audit event)."""
    a, b = two_stores
    a.create_rollout({}, RolloutState(name="r1", plan_hash="h1"))
    rounds = 12
    winners = []
    for round_ in range(rounds):
        read = {"a": a.get_state("r1"), "b": b.get_state("r1")}
        assert {s.version for s in read.values()} == {round_}

        def commit(store: SQLStore, actor: str) -> bool:
            state = read[actor]  # noqa: B023
            state.reason = actor
            decision = Decision("r1", state.version + 1, 1.0, Action.RESUME, 0, 0, Phase.RUNNING,
                                actor, actor=actor)
            try:
                store.commit(state, expected_version=state.version, decisions=[decision],
                             audit=[AuditEvent("r1", 0, 1.0, actor, "resume", {})])
            except ConcurrencyError:
                return False
            return True

        ok = _together(lambda: commit(a, "a"), lambda: commit(b, "b"))
        assert sorted(ok) == [False, True], ok
        winners.append("a" if ok[0] else "b")
    final = b.get_state("r1")
    assert final.version == rounds and final.reason == winners[-1]
    assert [(d.seq, d.actor) for d in a.decisions("r1")] == list(
        zip(range(1, rounds + 1), winners, strict=True))
    events = b.audit_events("r1")
    assert [e.actor for e in events] == winners and verify_chain(events)[0]


def test_only_one_store_holds_the_lease(two_stores: tuple[SQLStore, SQLStore]) -> None:
    a, b = two_stores
    now = 1000.0
    holders = []
    for _ in range(15):
        got = _together(lambda: a.acquire_lease("controller:r1", "a", 10, now),  # noqa: B023
                        lambda: b.acquire_lease("controller:r1", "b", 10, now))  # noqa: B023
        assert sum(got) == 1, got
        holders.append("a" if got[0] else "b")
        now += 1  # renewals before expiry: the first holder keeps it
    assert len(set(holders)) == 1
    other = "b" if holders[0] == "a" else "a"
    store_of = {"a": a, "b": b}
    assert not store_of[other].acquire_lease("controller:r1", other, 10, now)
    assert store_of[other].acquire_lease("controller:r1", other, 10, now + 10)  # expired: handover
    assert not store_of[holders[0]].acquire_lease("controller:r1", holders[0], 10, now + 10)


def test_replicas_starting_together_create_and_migrate_once(postgres_db_url: str) -> None:
    stores = _together(lambda: SQLStore(postgres_db_url), lambda: SQLStore(postgres_db_url))
    try:
        assert [s.schema_version() for s in stores] == [SCHEMA_VERSION] * 2
        state = RolloutState(name="r1", plan_hash="h1", created_at=1.0)
        created = _together(lambda: stores[0].create_rollout({"p": 1}, state),
                            lambda: stores[1].create_rollout({"p": 1}, state))
        assert [s.version for s in created] == [0, 0]
        assert [s.name for s in stores[0].list_states()] == ["r1"]
    finally:
        for s in stores:
            s.close()


def test_url_in_messages_hides_the_password(postgres_db_url: str) -> None:
    password = make_url(postgres_db_url).password
    assert password  # the test server's role has one
    store = open_store(postgres_db_url)
    try:
        assert store.url.startswith("postgresql+psycopg://")
        assert ":***@" in store.url and str(password) not in store.url
    finally:
        store.close()
