"""The rollout state's typed fields and the ``extra`` JSON the stores keep them in: the format
of earlier releases, unknown keys kept, the audit seal's MAC unchanged."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from safeshift.audit import AuditKey, seal_state
from safeshift.errors import DamagedStoreError
from safeshift.state import AuditSeal, Phase, RolloutState, StageApprovals
from safeshift.store import SQLStore, sqlite_url

# every key a release has written, and one of a newer release
STORED: dict[str, Any] = {
    "created_by": "ann", "salt_seed": "5eed" * 8, "audit_seq": 4, "audit_head": "ab" * 32,
    "audit_key_id": "b65dc3bcc680629b", "audit_state_mac": "cd" * 32, "seq": 4,
    "paused_from": "awaiting_approval", "approvals": {"stage": 2, "by": ["bob", "carol"]},
    "allocation": {"candidate": 0.25, "b": 0.75}, "winner": "b", "dropped": ["c"],
    "srm_min_p": 0.5, "from_a_newer_release": {"nested": [1, 2.5, None]},
}


def _row(extra: object) -> RolloutState:
    return RolloutState.from_row(name="r1", plan_hash="h1", phase=Phase.PAUSED, stage_index=1,
                                 stage_started_at=1.0, pending_stage=2, version=3,
                                 created_at=1.0, updated_at=2.0, reason="", extra=extra)


def test_every_stored_key_reads_into_its_field_and_writes_back_the_same() -> None:
    state = _row(json.loads(json.dumps(STORED)))
    assert (state.created_by, state.salt_seed, state.seq) == ("ann", "5eed" * 8, 4)
    assert state.paused_from is Phase.AWAITING_APPROVAL
    assert state.approvals == StageApprovals(2, ["bob", "carol"])
    assert (state.allocation, state.winner, state.dropped) == (
        {"candidate": 0.25, "b": 0.75}, "b", ["c"])
    assert state.srm_min_p == 0.5
    assert state.audit == AuditSeal(4, "ab" * 32, "b65dc3bcc680629b", "cd" * 32)
    assert state.unknown_extra == {"from_a_newer_release": {"nested": [1, 2.5, None]}}
    assert state.extra_json() == STORED


def test_a_field_at_its_default_writes_no_key() -> None:
    assert RolloutState("r1", "h1").extra_json() == {}
    assert _row({}).extra_json() == {}
    assert _row({"winner": None, "seq": None}) == _row({})  # null reads as absent


@pytest.mark.parametrize(("extra", "words"), [
    ([], "extra is an object, not list"),
    ({"seq": "4"}, "'seq' is str, not int"),
    ({"seq": True}, "'seq' is bool, not int"),
    ({"audit_seq": 4.0}, "'audit_seq' is float, not int"),
    ({"audit_state_mac": 1}, "'audit_state_mac' is int, not str"),
    ({"paused_from": "exploded"}, "'exploded' is not a valid Phase"),
    ({"approvals": {"by": ["bob"]}}, "'approvals.stage' is missing"),
    ({"approvals": {"stage": 1, "by": [1]}}, "'approvals.by' holds a value that is not"),
    ({"dropped": "c"}, "'dropped' is str, not list"),
    ({"allocation": {"b": "half"}}, "'allocation.b' is str, not a number"),
])
def test_a_value_of_the_wrong_type_is_refused(extra: object, words: str) -> None:
    with pytest.raises((TypeError, ValueError, KeyError), match=words):
        _row(extra)


def test_a_known_key_is_no_unknown_key() -> None:
    state = RolloutState("r1", "h1", unknown_extra={"sed": 1})  # a typo is kept as unknown,
    assert state.extra_json() == {"sed": 1}
    state.unknown_extra["seq"] = 5  # but a known key must be set through its field
    with pytest.raises(ValueError, match=r"'seq' .* is a field: set state\.seq instead"):
        state.extra_json()


def test_copy_shares_nothing_mutable() -> None:
    state = _row(json.loads(json.dumps(STORED)))
    copy = state.copy()
    assert copy == state
    assert state.approvals is not None and copy.approvals is not None
    copy.approvals.by.append("dave")
    assert copy.allocation is not None
    copy.allocation["b"] = 0.0
    copy.dropped.append("b")
    copy.audit.seq = 5
    copy.unknown_extra["from_a_newer_release"]["nested"].append(3)
    assert state.extra_json() == STORED


def test_the_seal_macs_what_earlier_releases_maced() -> None:
    """Golden MACs, computed by the release that kept the seal in an untyped ``extra``: a
    stored seal must keep verifying."""
    key = AuditKey.from_secret("golden-vector-key-0123456789abcdef")
    assert key.id == "b65dc3bcc680629b"
    state = RolloutState("r1", "h1", Phase.PAUSED, 2, version=7, created_by="ann", seq=4,
                         paused_from=Phase.RUNNING)
    seal_state(state, audit_seq=4, audit_head="ab" * 32, key=key)
    assert state.audit.mac == "716a6762b26fc84c11b1c7b5cad853c36af306fa0da58b5356737720480f6777"
    state = RolloutState("r1", "h1")
    seal_state(state, audit_seq=4, audit_head="ab" * 32, key=key)
    assert state.audit.mac == "bd2ef253feab071a633b45f3655b4d3bf95dde6e75cbe4f62de1f3ca1fb11352"


def test_the_sql_store_keeps_unknown_keys_and_refuses_a_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLStore(sqlite_url(path))
    state = store.create_rollout({}, RolloutState("r1", "h1", created_by="ann"))
    stored = {**state.extra_json(), "from_a_newer_release": [1, {"x": None}]}
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE rollouts SET extra = ?", (json.dumps(stored),))
    state = store.get_state("r1")
    assert state.unknown_extra == {"from_a_newer_release": [1, {"x": None}]}
    state.seq = 1
    store.commit(state, expected_version=state.version)
    with sqlite3.connect(path) as conn:
        ((text,),) = conn.execute("SELECT extra FROM rollouts").fetchall()
    extra = json.loads(text)
    assert extra["from_a_newer_release"] == [1, {"x": None}]
    assert (extra["created_by"], extra["seq"], extra["audit_seq"]) == ("ann", 1, 0)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE rollouts SET extra = ?", (json.dumps({**extra, "seq": "1"}),))
    with pytest.raises(DamagedStoreError, match="the state of rollout 'r1' in the store cannot "
                                                r"be read .*'seq' is str, not int"):
        store.get_state("r1")
    store.close()
