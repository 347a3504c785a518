"""Pseudonyms for personal values: a keyed HMAC replaces them before anything is stored.

A plan lists the context attributes whose values are personal (``personal: [email]``); the unit
always is (its id is never stored: only its salted hash). Each value of a personal attribute is
replaced, where a request's segment is computed, by ``p:`` and the first 16 hex of
HMAC-SHA256(key, attribute NUL value): telemetry cells, request records, decisions, snapshots,
reports, webhooks, logs and the dashboard only ever see the pseudonym. The same value gets the
same pseudonym on every replica holding the key, so a segment is still one segment; without the
key a pseudonym cannot be turned back into the value, nor checked against a guess.

**The key** comes from ``$SAFESHIFT_PSEUDONYM_KEY_FILE`` or ``$SAFESHIFT_PSEUDONYM_KEY`` (at
least 32 characters), and is never stored with the data. Without either, it is derived from the
audit key (:func:`safeshift.audit.audit_key`, itself kept outside the store) under a domain of
its own, so a single machine works out of the box.

**Rotation**: set the new key, and the old one in ``$SAFESHIFT_PSEUDONYM_KEY_PREVIOUS`` (or
``…_PREVIOUS_FILE``) for a grace period. New traffic is pseudonymised with the new key;
:meth:`Pseudonymizer.candidates` gives a value's pseudonyms under both keys, so targeting rules
and look-ups by a raw value keep matching records written before the rotation. Telemetry is not
rewritten: within a stage that spans the rotation a segment value appears under two
pseudonyms, judged apart — rotate between rollouts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from safeshift.errors import SafeshiftError

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "PREFIX", "PREVIOUS_ENV", "PREVIOUS_FILE_ENV",
           "REQUEST_PREFIX", "PseudonymKeyError", "Pseudonymizer", "is_pseudonym",
           "pseudonymizer", "request_key", "reset_pseudonymizer"]

KEY_ENV = "SAFESHIFT_PSEUDONYM_KEY"
KEY_FILE_ENV = "SAFESHIFT_PSEUDONYM_KEY_FILE"
PREVIOUS_ENV = "SAFESHIFT_PSEUDONYM_KEY_PREVIOUS"
PREVIOUS_FILE_ENV = "SAFESHIFT_PSEUDONYM_KEY_PREVIOUS_FILE"
PREFIX = "p:"
REQUEST_PREFIX = "r:"
MIN_KEY_CHARS = 32
_PSEUDONYM = re.compile(r"^p:[0-9a-f]{16}$")


class PseudonymKeyError(SafeshiftError):
    """The pseudonym key is missing, unreadable or too short."""


def is_pseudonym(value: str) -> bool:
    return bool(_PSEUDONYM.match(value))


@dataclass(frozen=True, slots=True)
class Pseudonymizer:
    """Pseudonyms under the current key (and a previous one, during a rotation)."""

    key: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)
    source: str = "given"

    def pseudonym(self, attribute: str, value: str, *, key: bytes | None = None) -> str:
        message = attribute.encode() + b"\0" + value.encode()
        digest = hmac.new(key or self.key, message, hashlib.sha256).hexdigest()
        return PREFIX + digest[:16]

    def request_key(self, request_id: str) -> str:
        """What the store keeps for a request id: ``r:`` and 32 hex of its HMAC. Clients choose
        ids (an order number, an e-mail), so the id itself is never stored; the client's id
        still finds its record, through the same HMAC."""
        mac = self._request_mac().copy()
        mac.update(request_id.encode())
        return REQUEST_PREFIX + mac.hexdigest()[:32]

    def _request_mac(self) -> hmac.HMAC:
        return hmac.new(self.key, b"safeshift request id\0", hashlib.sha256)

    def candidates(self, attribute: str, value: str) -> tuple[str, ...]:
        """The value's pseudonym under the current key and, during a rotation, the previous."""
        now = self.pseudonym(attribute, value)
        if self.previous is None:
            return (now,)
        return (now, self.pseudonym(attribute, value, key=self.previous))


def _secret(file_env: str, env: str, what: str) -> tuple[bytes, str] | None:
    path, text = os.environ.get(file_env, ""), os.environ.get(env, "")
    if path and text:
        raise PseudonymKeyError(f"both ${file_env} and ${env} are set; set only one (the same on "
                                "every replica)")
    if path:
        try:
            raw = Path(path).read_bytes().strip()
        except OSError as exc:
            raise PseudonymKeyError(f"cannot read the {what} from ${file_env}={path}: "
                                    f"{exc.strerror}; point it at a readable file") from None
        source = f"${file_env}"
    elif text:
        raw, source = text.encode().strip(), f"${env}"
    else:
        return None
    if len(raw) < MIN_KEY_CHARS:
        raise PseudonymKeyError(
            f"the {what} from {source} is {len(raw)} characters; it needs at least "
            f"{MIN_KEY_CHARS} (a short key lets anyone test guesses against the pseudonyms): "
            "make one with python -c 'import secrets; print(secrets.token_hex(32))'")
    return raw, source


_cache: dict[tuple[str, ...], Pseudonymizer] = {}
_lock = threading.Lock()


def pseudonymizer() -> Pseudonymizer:
    """The process's pseudonymizer, from the environment (cached per setting of it)."""
    where = tuple(os.environ.get(k, "") for k in (KEY_FILE_ENV, KEY_ENV, PREVIOUS_FILE_ENV,
                                                  PREVIOUS_ENV))
    with _lock:
        found = _cache.get(where)
        if found is not None:
            return found
    current = _secret(KEY_FILE_ENV, KEY_ENV, "pseudonym key")
    if current is None:
        from safeshift.audit import audit_key

        audit = audit_key()
        key = hmac.new(audit.secret, b"safeshift pseudonym key", hashlib.sha256).digest()
        source = f"derived from the audit key ({audit.source})"
    else:
        key, source = current
    previous = _secret(PREVIOUS_FILE_ENV, PREVIOUS_ENV, "previous pseudonym key")
    made = Pseudonymizer(key, previous[0] if previous else None, source)
    with _lock:
        _cache[where] = made
    return made


def request_key(request_id: str) -> str:
    """:meth:`Pseudonymizer.request_key` under the process's key."""
    return pseudonymizer().request_key(request_id)


def reset_pseudonymizer() -> None:
    """Forget the cached keys (tests; a process whose key file was replaced)."""
    with _lock:
        _cache.clear()
