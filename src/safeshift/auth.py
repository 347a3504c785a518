"""Who may do what: roles, bearer tokens and the authenticated principal.

Roles, for people and tools steering rollouts, each allowing what the one below allows::

    viewer < operator < approver < admin

- *viewer* reads: status, history, the audit log;
- *operator* also creates rollouts and pauses, resumes and rolls back;
- *approver* also approves stages and promotes;
- *admin* also manages tokens and reads the access-denial log; an admin may do anything.

and one role for the data plane, outside that ladder: *client* (predict, infer, feedback,
reports). A client token cannot steer a rollout and a control token cannot send traffic or
labels (except an admin's), so a leaked application credential cannot approve a stage.

A token is ``ss_<id>_<secret>``: the id finds its record, the secret is kept only as its
SHA-256 digest (the secret is 256 random bits, so a fast digest is enough; nothing short of the
token itself reproduces it). Tokens expire when told to and can be revoked; the gateway
re-reads a cached token every :data:`TOKEN_CACHE_SECONDS`, so a revocation takes effect within
that time on every replica.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from safeshift.errors import SafeshiftError

if TYPE_CHECKING:
    from safeshift.store.base import Store

__all__ = ["LOCAL", "TOKEN_CACHE_SECONDS", "AuthError", "Authenticator", "Denial", "Principal",
           "Role", "TokenRecord", "allows", "check_token_name", "new_token", "parse_role",
           "parse_token"]

TOKEN_CACHE_SECONDS = 5.0
"""How long a gateway trusts a token it has checked before reading its record again."""

_TOKEN = re.compile(r"ss_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


class Role(StrEnum):
    CLIENT = "client"
    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.APPROVER: 3, Role.ADMIN: 4}


def allows(have: Role, need: Role) -> bool:
    """Whether a principal holding ``have`` may do what needs ``need``."""
    if have is Role.ADMIN or have is need:
        return True
    if Role.CLIENT in (have, need):
        return False
    return _RANK[have] >= _RANK[need]


def parse_role(text: str) -> Role:
    try:
        return Role(text.strip().lower())
    except ValueError:
        raise SafeshiftError(f"unknown role {text!r}; roles are "
                             f"{', '.join(r.value for r in Role)}") from None


def check_token_name(name: str) -> str:
    """A token's name is who holds it, shown in every audit event: short and plain."""
    if not _NAME.fullmatch(name):
        raise SafeshiftError(
            f"token name {name[:80]!r} is not allowed; use 1 to 64 letters, digits and . _ @ + - "
            "starting with a letter or digit, e.g. alice or ci-deployer")
    return name


class AuthError(SafeshiftError):
    """Authentication failed (``status`` 401) or the role does not allow it (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request or a command acts as."""

    name: str
    role: Role
    token_id: str = ""  # empty when not authenticated by a token (local access, --no-auth)
    # the context attributes whose values this principal may assert for targeting (e.g. an
    # internal app saying plan=internal); None: every attribute (admins, local access)
    attributes: frozenset[str] | None = None
    # whether its labels and outcomes count (a labelling pipeline's token; not an app's)
    labels: bool = True
    # the review roles it may sign off (privacy, product, ...); None: every one (local access)
    reviews: frozenset[str] | None = None

    def may_review(self, role: str) -> bool:
        return self.reviews is None or role in self.reviews

    @property
    def actor(self) -> str:
        """The name recorded in decisions and audit events."""
        return self.name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": str(self.role), "token": self.token_id or None}


LOCAL = Principal("local", Role.ADMIN)
"""Whoever can open the store directly (its file or its database password): in charge."""


@dataclass(slots=True)
class TokenRecord:
    """A token as stored: everything but its secret."""

    id: str
    name: str
    role: Role
    secret_sha256: str
    created_at: float
    created_by: str
    expires_at: float | None = None
    revoked_at: float | None = None
    rights: dict[str, Any] = field(default_factory=dict)

    def problem(self, now: float) -> str | None:
        """Why the token cannot be used now, or None."""
        if self.revoked_at is not None:
            return f"token {self.id} ({self.name}) was revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return f"token {self.id} ({self.name}) has expired; ask an admin for a new one"
        return None

    def principal(self) -> Principal:
        attributes = None if self.role is Role.ADMIN else frozenset(
            str(a) for a in self.rights.get("attributes", []))
        labels = self.role is Role.ADMIN or bool(self.rights.get("labels", False))
        reviews = frozenset(str(r) for r in self.rights.get("reviews", []))
        return Principal(self.name, self.role, self.id, attributes, labels, reviews)

    def to_json(self) -> dict[str, Any]:
        """Public fields (never the digest)."""
        return {"id": self.id, "name": self.name, "role": str(self.role),
                "created_at": self.created_at, "created_by": self.created_by,
                "expires_at": self.expires_at, "revoked_at": self.revoked_at,
                "rights": self.rights}


@dataclass(slots=True)
class Denial:
    """A request refused for want of a valid token (401) or of the role (403)."""

    at: float
    status: int
    method: str
    path: str
    principal: str  # the token's holder, or "-" when none was valid
    peer: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "status": self.status, "method": self.method, "path": self.path,
                "principal": self.principal, "peer": self.peer, "reason": self.reason}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(name: str, role: Role, *, created_by: str, now: float,
              expires_in: float | None = None,
              rights: dict[str, Any] | None = None) -> tuple[str, TokenRecord]:
    """A fresh token and its record; the token itself is shown once and never stored."""
    if expires_in is not None and expires_in <= 0:
        raise SafeshiftError("a token's expiry must be in the future, e.g. --expires 30d")
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = TokenRecord(token_id, check_token_name(name), role, _digest(secret), now,
                         created_by, None if expires_in is None else now + expires_in,
                         rights=dict(rights or {}))
    return f"ss_{token_id}_{secret}", record


def parse_token(token: str) -> tuple[str, str]:
    """``(id, secret)`` of a well-formed token, else :class:`AuthError` (401)."""
    match = _TOKEN.fullmatch(token.strip())
    if match is None:
        raise AuthError(401, "malformed token: a safeshift token looks like ss_<12 hex>_<secret>"
                             "; create one with safeshift token create")
    return match.group(1), match.group(2)


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, reading token records from the store
    and keeping each (valid or not) for :data:`TOKEN_CACHE_SECONDS`, at most ``max_entries``.

    :meth:`cached` answers without touching the store (the gateway's hot path calls it first);
    :meth:`authenticate` reads the store when the cache cannot answer."""

    def __init__(self, store: Store, *, ttl: float = TOKEN_CACHE_SECONDS,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Principal | AuthError]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, token: str) -> Principal | None:
        """The principal of ``token`` if checked within the TTL; raises the cached refusal."""
        entry = self._cache.get(token)
        if entry is None:
            return None
        checked, result = entry
        if self.clock() - checked > self.ttl:
            return None
        if isinstance(result, AuthError):
            raise AuthError(result.status, str(result))
        return result

    def authenticate(self, token: str) -> Principal:
        """The principal of ``token``, or :class:`AuthError` (401) saying why not."""
        cached = self.cached(token)
        if cached is not None:
            return cached
        now = self.clock()
        result: Principal | AuthError
        try:
            result = self._check(token, now)
        except AuthError as exc:
            result = exc
        with self._lock:
            self._cache[token] = (now, result)
            self._cache.move_to_end(token)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if isinstance(result, AuthError):
            raise result
        return result

    def _check(self, token: str, now: float) -> Principal:
        token_id, secret = parse_token(token)
        record = self.store.get_token(token_id)
        if record is None or not hmac.compare_digest(record.secret_sha256, _digest(secret)):
            raise AuthError(401, "unknown token: it was never issued here, or mistyped")
        problem = record.problem(now)
        if problem is not None:
            raise AuthError(401, problem)
        return record.principal()
