"""Every error safeshift raises, under one root.

::

    SafeshiftError
    ├── PlanError                  a plan file is missing, unreadable or invalid
    │   └── PlanValidationError    carries every problem, each with its field path
    ├── ModelLoadError             a model reference cannot be loaded
    │   └── RegistryError          the model registry cannot be reached, lacks what a
    │                              reference names, or refuses to move an alias
    ├── StoreError                 the store cannot be read or written
    │   ├── ConcurrencyError       another controller changed the rollout first
    │   ├── DamagedStoreError      a value safeshift cannot have written (edited by hand)
    │   └── SchemaVersionError     the store's schema is newer than this release
    ├── RolloutError               an action does not fit the rollout's state
    │   ├── UnknownRolloutError    no rollout with that name
    │   ├── InvalidTransitionError e.g. approving a rollout that is not waiting
    │   └── RejectedInputError     the model rejected a request's inputs (library predict)
    ├── FeedbackError              feedback cannot be joined
    │   └── UnknownRequestError    no live request record with that id
    ├── AuditError                 an audit log cannot be checked or exported
    │   └── AuditKeyError          the audit key is missing, too short or unreadable
    ├── UnknownTokenError          no access token with that id
    └── AuthError (safeshift.auth) no valid token (status 401), or the role does not allow
                                   it (403)

Each message says what was wrong and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SafeshiftError(Exception):
    """Root of every safeshift error."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a plan: where, what, and what would be valid."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PlanError(SafeshiftError):
    """A plan file is missing, unreadable or not valid."""


class PlanValidationError(PlanError):
    """A plan has one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[Problem], source: str = "plan") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}")


class ModelLoadError(SafeshiftError):
    """A model reference cannot be resolved or loaded."""


class RegistryError(ModelLoadError):
    """The MLflow model registry cannot be reached, does not hold what a ``models:/``
    reference names, or refuses to move an alias."""


class StoreError(SafeshiftError):
    """The store cannot be read or written."""


class DamagedStoreError(StoreError):
    """The store holds a value safeshift cannot have written (e.g. edited by hand)."""


class ConcurrencyError(StoreError):
    """The rollout changed since it was read (another controller or an operator acted)."""


class SchemaVersionError(StoreError):
    """The store was written by a newer safeshift; upgrade safeshift to read it."""


class RolloutError(SafeshiftError):
    """An action does not fit the rollout's current state."""


class UnknownRolloutError(RolloutError):
    """No rollout with that name exists in the store."""


class InvalidTransitionError(RolloutError):
    """The requested action is not allowed in the rollout's current phase."""


class RejectedInputError(RolloutError, ValueError):
    """The baseline model rejected a request's inputs (a request fault, counted against
    neither model); send rows the model can read."""


class FeedbackError(SafeshiftError):
    """Feedback cannot be accepted."""


class UnknownRequestError(FeedbackError):
    """No request record with that id (never served, or past the label window)."""


class AuditError(SafeshiftError):
    """An audit log cannot be checked or exported (e.g. an unreadable checkpoint file)."""


class AuditKeyError(AuditError):
    """The audit key is missing, too short or unreadable: the audit log can be neither
    signed nor checked without it."""


class UnknownTokenError(SafeshiftError):
    """No token has that id."""
