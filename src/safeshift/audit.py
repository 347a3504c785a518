"""The audit log: one keyed, hash-chained event per decision, sealed by the store as it commits
the decision, and the checks that find an event altered, removed, reordered or missing.

A plain hash chain only proves that nobody *without write access to the store* changed it:
whoever can write the store can rewrite an event and recompute every hash after it. So each
event's ``hash`` is an HMAC-SHA256 under a key held outside the store (:func:`audit_key`), and
at every commit the store binds the chain's length and head into the rollout's state with a
second MAC (:func:`seal_commit`), so that removing events from the end, or every event, shows
even when the counter is "fixed" too. What neither can catch is the whole store put back to an
older copy; a signed :class:`Checkpoint` exported and kept elsewhere catches that.

The controller asks :func:`decision_event` for the event of each decision it commits; nothing
else builds audit events, so what the chain covers is decided here. Both stores seal through
:func:`seal_commit` and :func:`seal_state`, so they cannot disagree on what is covered.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safeshift.errors import AuditError, AuditKeyError

if TYPE_CHECKING:
    from safeshift.state import Decision, Phase, RolloutState

__all__ = ["GENESIS", "KEY_ENV", "KEY_FILE_ENV", "MIN_KEY_CHARS", "AuditEvent", "AuditKey",
           "AuditReport", "Checkpoint", "audit_key", "decision_event", "default_key_path",
           "evidence_digest", "export_lines", "read_checkpoint", "reset_audit_key",
           "seal_commit", "seal_state", "verify_chain", "verify_rollout"]


GENESIS = "0" * 64
_DRILL = "~drill-"  # safeshift.plan.DRILL_MARK (audit imports nothing of the plan)

KEY_FILE_ENV = "SAFESHIFT_AUDIT_KEY_FILE"
"""A file holding the audit key (the same file on every replica that writes or verifies)."""
KEY_ENV = "SAFESHIFT_AUDIT_KEY"
"""The audit key itself, at least :data:`MIN_KEY_CHARS` characters."""
MIN_KEY_CHARS = 32

# every MAC names what it seals, so that one kind can never be passed off as another
_EVENT = "safeshift-audit-event-v1"
_STATE = "safeshift-audit-state-v1"
_CHECKPOINT = "safeshift-audit-checkpoint-v1"

# exit codes of a verification (the CLI's): intact, tampered with, cannot tell
INTACT, TAMPERED, UNVERIFIABLE = 0, 1, 2

_HOW_TO_GIVE = (f"give the key the rollouts were written with in ${KEY_FILE_ENV} (a file) or "
                f"${KEY_ENV} (the key itself)")


def _canonical(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)


def _as_stored(value: Any) -> Any:
    """``value`` as it reads back from the store's JSON (tuples become lists, keys strings,
    unknown objects their ``str``), so that a MAC or digest computed now matches the value
    recomputed from the store later."""
    return json.loads(json.dumps(value, default=str))


# -- the key ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditKey:
    """The secret the audit log is signed with, and where it came from (for messages)."""

    secret: bytes = field(repr=False)
    source: str = "given"

    @classmethod
    def from_secret(cls, secret: str | bytes, source: str = "given") -> AuditKey:
        """A key from its text, refusing one short enough to guess."""
        raw = (secret.encode() if isinstance(secret, str) else bytes(secret)).strip()
        if len(raw) < MIN_KEY_CHARS:
            raise AuditKeyError(
                f"the audit key from {source} is {len(raw)} characters; it needs at least "
                f"{MIN_KEY_CHARS} (a guessable key lets whoever can write the store forge the "
                "audit log): make one with python -c 'import secrets; print(secrets.token_hex(32))'")
        return cls(raw, source)

    @property
    def id(self) -> str:
        """A public name for the key (first 16 hex of its SHA-256): events record it, so a
        verifier holding another key can say so instead of calling every event altered."""
        return hashlib.sha256(self.secret).hexdigest()[:16]

    def mac(self, domain: str, body: Mapping[str, Any]) -> str:
        """HMAC-SHA256 (64 hex, what the store's hash column holds) of ``body`` for ``domain``."""
        message = domain.encode() + b"\n" + _canonical(body).encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def default_key_path() -> Path:
    """Where the key lives when neither variable is set: ``$XDG_CONFIG_HOME/safeshift/audit.key``
    or ``~/.config/safeshift/audit.key`` (a relative ``XDG_CONFIG_HOME`` is ignored, as the XDG
    specification says)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if base and os.path.isabs(base):
        return Path(base) / "safeshift" / "audit.key"
    try:
        home = Path.home()
    except RuntimeError:  # no $HOME and no passwd entry (some containers)
        raise AuditKeyError(f"no home directory to keep the audit key in; set ${KEY_FILE_ENV} "
                            f"to a key file or ${KEY_ENV} to a key") from None
    return home / ".config" / "safeshift" / "audit.key"


_keys: dict[tuple[str, str, str], AuditKey] = {}
_keys_lock = threading.Lock()


def audit_key(*, create: bool = True) -> AuditKey:
    """The process's audit key: from ``$SAFESHIFT_AUDIT_KEY_FILE`` or ``$SAFESHIFT_AUDIT_KEY``
    (one of them: both is an error), else from :func:`default_key_path` — created there
    (0600, 32 random bytes as hex) when absent and ``create``, so that a single-machine setup
    works out of the box. Writers create it;
    verifiers pass ``create=False`` (a new key could only say that nothing verifies).

    Cached per process and per setting of the variables; :func:`reset_audit_key` forgets it.
    Raises :class:`~safeshift.errors.AuditKeyError` naming the problem and the fix."""
    file_env = os.environ.get(KEY_FILE_ENV, "")
    secret_env = os.environ.get(KEY_ENV, "")
    where = (file_env, hashlib.sha256(secret_env.encode()).hexdigest() if secret_env else "",
             "" if file_env or secret_env else str(default_key_path()))
    with _keys_lock:
        key = _keys.get(where)
        if key is None:
            key = _resolve_key(file_env, secret_env, create=create)
            _keys[where] = key
        return key


def reset_audit_key() -> None:
    """Forget the cached key (tests; a process whose key file was replaced)."""
    with _keys_lock:
        _keys.clear()


def _resolve_key(file_env: str, secret_env: str, *, create: bool) -> AuditKey:
    if file_env and secret_env:
        raise AuditKeyError(f"both ${KEY_FILE_ENV} and ${KEY_ENV} are set; set only one (the "
                            "same on every replica)")
    if secret_env:
        return AuditKey.from_secret(secret_env, f"${KEY_ENV}")
    if file_env:
        return _read_key_file(Path(file_env).expanduser(), f"${KEY_FILE_ENV} ({file_env})")
    path = default_key_path()
    if create:
        _create_key_file(path)
    return _read_key_file(path, str(path))


def _read_key_file(path: Path, source: str) -> AuditKey:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AuditKeyError(f"no audit key at {source}: {_HOW_TO_GIVE}") from None
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit key {source}: {exc.strerror or exc}; make "
                            f"it readable by this user, or {_HOW_TO_GIVE}") from None
    return AuditKey.from_secret(raw, source)


def _create_key_file(path: Path) -> None:
    """Create the default key file if absent, atomically: replicas starting together on one
    machine must all end up with the one key that was written first, never a half-written
    one (the key is written to a private temporary file, then linked into place)."""
    if path.exists():
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".audit.key.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: its
                os.link(tmp, path)                       # key is the key
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise AuditKeyError(f"cannot create the audit key {path}: {exc.strerror or exc}; set "
                            f"${KEY_FILE_ENV} to a key file or ${KEY_ENV} to a key") from None


def _resolve_or_why(key: AuditKey | None) -> tuple[AuditKey | None, str]:
    """The key to verify with, or why there is none (reported only if a signed item needs it:
    a log written entirely by an older release can be checked without one)."""
    if key is not None:
        return key, ""
    try:
        return audit_key(create=False), ""
    except AuditKeyError as exc:
        return None, str(exc)


@dataclass(slots=True)
class AuditEvent:
    """One entry of a rollout's hash-chained audit log."""

    rollout: str
    seq: int
    at: float
    actor: str
    action: str
    detail: dict[str, Any]
    prev_hash: str = GENESIS
    hash: str = ""

    def body(self) -> dict[str, Any]:
        """What the event's hash covers: all of it, and the previous event's hash."""
        return {"rollout": self.rollout, "seq": self.seq, "at": round(self.at, 6),
                "actor": self.actor, "action": self.action, "detail": self.detail,
                "prev": self.prev_hash}

    @property
    def key_id(self) -> str | None:
        """The id of the key that signed the event; None for an event of an older release,
        hashed with plain SHA-256."""
        kid = self.detail.get("key_id")
        return kid if isinstance(kid, str) else None

    def compute_hash(self, key: AuditKey) -> str:
        """The event's MAC under ``key``."""
        return key.mac(_EVENT, self.body())

    def legacy_hash(self) -> str:
        """The plain SHA-256 that releases before the keyed chain wrote (anyone can compute
        it, so it proves nothing against someone who could write the store)."""
        return hashlib.sha256(_canonical(self.body()).encode()).hexdigest()

    def seal(self, prev_hash: str, key: AuditKey) -> AuditEvent:
        """Link the event after ``prev_hash`` and sign it, recording the key's id (covered by
        the MAC). The detail is normalised to what the store reads back, so that the MAC
        recomputed from the store matches."""
        self.prev_hash = prev_hash
        self.detail = _as_stored({**self.detail, "key_id": key.id})
        self.hash = self.compute_hash(key)
        return self

    def to_json(self) -> dict[str, Any]:
        return {"rollout": self.rollout, "seq": self.seq, "at": self.at, "actor": self.actor,
                "action": self.action, "detail": self.detail, "prev_hash": self.prev_hash,
                "hash": self.hash}


# -- sealing (the stores call these inside their commit transaction) ----------------------------


def seal_commit(state: RolloutState, events: Sequence[AuditEvent], *, last_seq: int,
                last_hash: str, key: AuditKey | None = None) -> None:
    """Number, link and sign ``events`` after the stored chain's last event (``last_seq``,
    ``last_hash``, read in the commit's transaction), then :func:`seal_state` ``state`` (the
    new state, its version already set) with the chain's new length and head. Every commit
    calls it, with or without events, so that a state is never written unsealed."""
    key = key or audit_key()
    seq, prev = last_seq, last_hash
    for event in events:
        seq += 1
        event.seq = seq
        event.seal(prev, key)
        prev = event.hash
    seal_state(state, audit_seq=seq, audit_head=prev, key=key)


def seal_state(state: RolloutState, *, audit_seq: int, audit_head: str,
               key: AuditKey | None = None) -> None:
    """Record the chain's length and head in ``state.audit`` with a MAC over them and the
    state's name, version, phase, stage and plan: an attacker without the key who removes
    events from the end (or all of them) cannot make the state agree again."""
    key = key or audit_key()
    state.audit.seq = audit_seq
    state.audit.head = audit_head
    state.audit.key_id = key.id
    state.audit.mac = key.mac(_STATE, _state_body(state))


def _state_body(state: RolloutState) -> dict[str, Any]:
    """What the state's MAC covers. Its canonical JSON must stay byte for byte what earlier
    releases MACed (the seal's fields under their stored names, None when absent), or stored
    seals would stop verifying."""
    return {"rollout": state.name, "version": state.version, "phase": str(state.phase),
            "stage_index": state.stage_index, "plan_hash": state.plan_hash,
            "audit_seq": state.audit.seq, "audit_head": state.audit.head,
            "key_id": state.audit.key_id}


def evidence_digest(evidence: Mapping[str, Any]) -> str:
    """SHA-256 of a decision's evidence as the store keeps it (canonical JSON): the event
    carries it, so the evidence cannot be changed without the event's MAC failing."""
    return hashlib.sha256(_canonical(_as_stored(dict(evidence))).encode()).hexdigest()


# -- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement "rollout R's chain had ``seq`` events ending in ``head`` at ``at``",
    kept outside the store: a store put back to an older copy (state and chain alike, so
    everything in it agrees) no longer holds that head at that sequence number."""

    rollout: str
    seq: int
    head: str
    at: float
    key_id: str
    mac: str

    @classmethod
    def sign(cls, rollout: str, seq: int, head: str, at: float, key: AuditKey) -> Checkpoint:
        body = {"rollout": rollout, "seq": seq, "head": head, "at": round(at, 6),
                "key_id": key.id}
        return cls(rollout, seq, head, at, key.id, key.mac(_CHECKPOINT, body))

    def expected_mac(self, key: AuditKey) -> str:
        return key.mac(_CHECKPOINT, {"rollout": self.rollout, "seq": self.seq, "head": self.head,
                                     "at": round(self.at, 6), "key_id": self.key_id})

    def to_json(self) -> dict[str, Any]:
        return {"rollout": self.rollout, "seq": self.seq, "head": self.head, "at": self.at,
                "key_id": self.key_id, "mac": self.mac}

    @classmethod
    def from_json(cls, data: Any, source: str = "checkpoint") -> Checkpoint:
        """A checkpoint from its JSON, or :class:`~safeshift.errors.AuditError` saying what is
        wrong with it."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a checkpoint is an object, not {type(data).__name__}")
            seq = data["seq"]
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise TypeError("seq is not an integer")
            return cls(str(data["rollout"]), seq, str(data["head"]), float(data["at"]),
                       str(data["key_id"]), str(data["mac"]))
        except (KeyError, TypeError, ValueError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise AuditError(f"{source} is not a safeshift audit checkpoint ({what}); give the "
                             "file `safeshift audit export` wrote") from None


def export_lines(events: Sequence[AuditEvent], checkpoint: Checkpoint) -> list[str]:
    """An export: one JSON line per event, then the checkpoint as the last line."""
    return [json.dumps(e.to_json(), sort_keys=True, default=str) for e in events] + [
        json.dumps(checkpoint.to_json(), sort_keys=True)]


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint of an export file (its last line)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AuditError(f"cannot read the checkpoint file {path}: {why}") from None
    if not lines:
        raise AuditError(f"the checkpoint file {path} is empty; give the file `safeshift audit "
                         "export` wrote")
    try:
        data = json.loads(lines[-1])
    except ValueError:
        raise AuditError(f"the last line of {path} is not JSON; give the file `safeshift audit "
                         "export` wrote") from None
    return Checkpoint.from_json(data, f"the last line of {path}")


# -- verification -------------------------------------------------------------------------------


class AuditReport(tuple[bool, str]):
    """What verifying an audit log found. ``code`` is the CLI's exit code: 0 intact, 1
    tampered with (``message`` names the first bad event), 2 cannot be verified (no key, or
    another key: ``message`` says which to give); ``unkeyed`` counts the events of an older
    release accepted with ``allow_unkeyed``.

    It is still the ``(ok, message)`` pair verification returned before the key, so callers
    that unpack it keep working."""

    code: int
    events: int
    unkeyed: int
    key_id: str | None

    def __new__(cls, ok: bool, message: str, code: int = INTACT, *, events: int = 0,
                unkeyed: int = 0, key_id: str | None = None) -> AuditReport:
        self = super().__new__(cls, (ok, message))
        self.code, self.events, self.unkeyed, self.key_id = code, events, unkeyed, key_id
        return self

    @property
    def ok(self) -> bool:
        return self[0]

    @property
    def message(self) -> str:
        return self[1]

    def __repr__(self) -> str:
        return (f"AuditReport(ok={self.ok!r}, message={self.message!r}, code={self.code}, "
                f"events={self.events}, unkeyed={self.unkeyed}, key_id={self.key_id!r})")


def _tampered(message: str) -> AuditReport:
    return AuditReport(False, message, TAMPERED)


def _unverifiable(message: str) -> AuditReport:
    return AuditReport(False, message, UNVERIFIABLE)


def _other_key(what: str, key_id: object, key: AuditKey) -> AuditReport:
    return _unverifiable(f"{what} signed with another key (id {key_id}), not the one given "
                         f"(id {key.id}, from {key.source}); {_HOW_TO_GIVE}")


def verify_chain(events: Sequence[AuditEvent], *, key: AuditKey | None = None,
                 allow_unkeyed: bool = False) -> AuditReport:
    """Check that a rollout's audit events are numbered 1, 2, ..., link up and carry a valid
    MAC under ``key`` (by default :func:`audit_key`, never created here); names the first
    event that does not. Events of an older release (plain SHA-256, no key id) prove nothing
    against someone who could write the store, so they fail unless ``allow_unkeyed``."""
    resolved, why = _resolve_or_why(key)
    return _verify_chain(events, resolved, why, allow_unkeyed)


def _verify_chain(events: Sequence[AuditEvent], key: AuditKey | None, why: str,
                  allow_unkeyed: bool) -> AuditReport:
    prev, unkeyed, keyed = GENESIS, 0, False
    for n, e in enumerate(events, start=1):
        if e.seq != n:
            return _tampered(f"event {n}: missing: the next event stored is number {e.seq} "
                             "(an event was removed, or the sequence numbers changed)")
        if e.prev_hash != prev:
            return _tampered(f"event {n}: does not link to the event before it (events were "
                             "removed, inserted or reordered)")
        kid = e.key_id
        if kid is None:
            if keyed:
                return _tampered(f"event {n}: unkeyed (plain SHA-256) after signed events: the "
                                 "chain was rewritten by someone without the key")
            if e.legacy_hash() != e.hash:
                return _tampered(f"event {n}: content does not match its hash (altered)")
            unkeyed += 1
        elif key is None:
            return _unverifiable(f"event {n}: cannot be checked: {why}")
        elif kid != key.id:
            return _other_key(f"event {n}:", kid, key)
        elif not hmac.compare_digest(e.compute_hash(key), e.hash):
            return _tampered(f"event {n}: content does not match its MAC (altered, or "
                             "rewritten by someone without the key)")
        else:
            keyed = True
        prev = e.hash
    if unkeyed and not allow_unkeyed:
        return _tampered(
            f"event 1: unkeyed: {unkeyed} event(s) carry a plain SHA-256 hash, written by a "
            "release before the keyed audit log (or rewritten by someone without the key), "
            "which anyone who can write the store can recompute; pass --allow-unkeyed to "
            "accept them")
    return AuditReport(True, _intact(len(events), unkeyed, key if keyed else None),
                       events=len(events), unkeyed=unkeyed, key_id=key.id if keyed and key else None)


def _intact(n: int, unkeyed: int, key: AuditKey | None) -> str:
    message = f"{n} events, chain intact"
    if key is not None:
        message += f", signed with key id {key.id}"
    if unkeyed:
        message += (f"; {unkeyed} unkeyed event(s) of an older release accepted "
                    "(--allow-unkeyed): they prove nothing against someone who could write "
                    "the store")
    return message


def verify_rollout(state: RolloutState, events: Sequence[AuditEvent],
                   decisions: Sequence[Decision], *, key: AuditKey | None = None,
                   allow_unkeyed: bool = False,
                   checkpoint: Checkpoint | None = None) -> AuditReport:
    """Everything that can be checked about a rollout's audit log: the chain itself
    (:func:`verify_chain`), the state's seal over the chain's length and head (events removed
    from the end, or all of them), every decision record against the event that sealed it
    (evidence included), and, given an exported ``checkpoint``, that the chain still holds
    the checkpoint's head at its sequence number (the store put back to an older copy)."""
    resolved, why = _resolve_or_why(key)
    report = _verify_chain(events, resolved, why, allow_unkeyed)
    if not report.ok:
        return report
    problem = (_state_problem(state, events, resolved, why, allow_unkeyed)
               or _decision_problem(state, events, decisions)
               or (_checkpoint_problem(checkpoint, state.name, events, resolved, why)
                   if checkpoint is not None else None))
    if problem is not None:
        return problem
    signed = resolved if (report.key_id or state.audit.mac is not None) else None
    return AuditReport(True, _intact(len(events), report.unkeyed, signed), events=len(events),
                       unkeyed=report.unkeyed, key_id=signed.id if signed else None)


def _state_problem(state: RolloutState, events: Sequence[AuditEvent], key: AuditKey | None,
                   why: str, allow_unkeyed: bool) -> AuditReport | None:
    n = len(events)
    head = events[-1].hash if events else GENESIS
    decisions_made = state.seq
    if n < decisions_made:
        return _tampered(f"event {n + 1}: missing: the rollout has made {decisions_made} "
                         f"decisions and the store holds {n} events (removed from the end)")
    mac = state.audit.mac
    if mac is None:
        if any(e.key_id for e in events):
            return _tampered("the rollout's state carries no audit seal although its events "
                             "are signed: the seal was removed from the state outside safeshift")
        if not allow_unkeyed:
            return _tampered("the rollout's state carries no audit seal: last written by a "
                             "release before the keyed audit log, or the seal was removed; "
                             "pass --allow-unkeyed to accept it")
        return None
    if key is None:
        return _unverifiable(f"the rollout's state cannot be checked: {why}")
    kid = state.audit.key_id
    if kid != key.id:
        return _other_key("the rollout's state is", kid, key)
    sealed_seq, sealed_head = state.audit.seq, state.audit.head
    if sealed_seq is not None and n < sealed_seq:
        return _tampered(f"event {n + 1}: missing: the rollout's state records {sealed_seq} "
                         f"events and the store holds {n} (removed from the end)")
    if sealed_seq is not None and n > sealed_seq:
        return _tampered(f"event {sealed_seq + 1}: not in the chain the state was sealed with "
                         f"({sealed_seq} events): added outside safeshift, or the state was put "
                         "back to an older copy")
    if sealed_head != head:
        return _tampered(f"event {n}: not the event the state was sealed with (replaced)")
    if not hmac.compare_digest(key.mac(_STATE, _state_body(state)), mac):
        return _tampered(
            f"the rollout's state (version {state.version}, sealed after event {n}) does not "
            f"match its seal: it was changed outside safeshift — event {n + 1} and later "
            "removed with the counter and head rewritten to hide it, or the head, phase, stage "
            "or plan edited")
    return None


_LEGACY_FIELDS = ("reason", "from_stage", "to_stage", "phase", "plan_hash")


def _decision_fields(decision: Decision, plan_hash: str) -> dict[str, Any]:
    """What an event records of its decision (and the plan it was made under)."""
    return {"decision": decision.seq, "reason": decision.reason,
            "from_stage": decision.from_stage, "to_stage": decision.to_stage,
            "to_phase": str(decision.phase), "plan_hash": plan_hash,
            "evidence_sha256": evidence_digest(decision.evidence)}


def _decision_problem(state: RolloutState, events: Sequence[AuditEvent],
                      decisions: Sequence[Decision]) -> AuditReport | None:
    """The first event (by number) whose decision record is missing or differs from it."""
    by_seq = {e.seq: e for e in events}
    found: list[tuple[int, str]] = []
    for d in decisions:
        e = by_seq.get(d.seq)
        if e is None:
            found.append((d.seq, f"event {d.seq}: missing: decision {d.seq} has no audit event"))
            continue
        expected = _decision_fields(d, state.plan_hash)
        if e.key_id is None:  # an older release's event records less
            expected = {"phase": str(d.phase), **expected}
            names = [k for k in _LEGACY_FIELDS if k in e.detail]
        else:
            names = list(expected)
        wrong = [k for k in names if e.detail.get(k) != expected[k]]
        wrong += [k for k, mine, theirs in (("actor", e.actor, d.actor),
                                            ("action", e.action, str(d.action)),
                                            ("time", round(e.at, 6), round(d.at, 6)))
                  if mine != theirs]
        if wrong:
            what = ", ".join("evidence" if k == "evidence_sha256" else k for k in wrong)
            found.append((e.seq, f"event {e.seq}: decision {d.seq} does not match its audit "
                                 f"event ({what} altered in the decision record)"))
    recorded = {d.seq for d in decisions}
    found += [(e.seq, f"event {e.seq}: its decision record ({e.detail['decision']}) is missing "
                      "from the store (deleted)")
              for e in events if e.key_id and "decision" in e.detail
              and e.detail["decision"] not in recorded]
    return _tampered(min(found)[1]) if found else None


def _checkpoint_problem(cp: Checkpoint, rollout: str, events: Sequence[AuditEvent],
                        key: AuditKey | None, why: str) -> AuditReport | None:
    if cp.rollout != rollout:
        return _unverifiable(f"the checkpoint is of rollout {cp.rollout!r}, not {rollout!r}; "
                             "give that rollout's checkpoint")
    if key is None:
        return _unverifiable(f"the checkpoint cannot be checked: {why}")
    if cp.key_id != key.id:
        return _other_key("the checkpoint is", cp.key_id, key)
    if not hmac.compare_digest(cp.expected_mac(key), cp.mac):
        return _tampered("the checkpoint does not match its MAC: the checkpoint file was "
                         "altered; use an unaltered copy")
    n = len(events)
    if n < cp.seq:
        return _tampered(f"event {n + 1}: missing: the checkpoint exported at {_when(cp.at)} "
                         f"records {cp.seq} events and the chain now ends at event {n}: the "
                         "store was put back to an older copy (or truncated)")
    if cp.seq and events[cp.seq - 1].hash != cp.head:
        return _tampered(f"event {cp.seq}: differs from the checkpoint exported at "
                         f"{_when(cp.at)}: the chain was rewritten since")
    return None


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def decision_event(decision: Decision, *, plan_hash: str, from_phase: Phase) -> AuditEvent:
    """The audit event that records ``decision`` (sealed by the store when it commits): who
    decided what and when, the phase and stage it moved from and to, why, under which plan,
    and a digest of the evidence, so that the decision record can be checked against it."""
    detail = _decision_fields(decision, plan_hash)
    detail["from_phase"] = str(from_phase)
    if _DRILL in decision.rollout:  # a drill's sandboxed copy (safeshift drill): say so
        detail["drill"] = True
    return AuditEvent(decision.rollout, 0, decision.at, decision.actor, str(decision.action),
                      detail)
