"""safeshift: safe, incremental rollout of machine-learning model changes.

Release a candidate model step by step — shadow, internal testers, 1%, 5%, 50%, 100% — while
always-valid sequential tests compare it with the current model on the same traffic, promote
it only on evidence of safety, and roll it back automatically on evidence of harm.
"""

from typing import Any

from safeshift.analysis import StageAnalysis, Verdict
from safeshift.assign import Assignment
from safeshift.clock import Clock, SystemClock, VirtualClock
from safeshift.errors import (
    ConcurrencyError,
    FeedbackError,
    InvalidTransitionError,
    ModelLoadError,
    PlanError,
    PlanValidationError,
    RolloutError,
    SafeshiftError,
    StoreError,
    UnknownRequestError,
    UnknownRolloutError,
)
from safeshift.feedback import FeedbackResult
from safeshift.models import FakeModel, ModelBackend, ModelResult
from safeshift.ops import Status
from safeshift.plan import Plan
from safeshift.rollout import Prediction, Rollout
from safeshift.state import Action, Decision, Phase
from safeshift.store import MemoryStore, SQLStore, Store, open_store

__version__ = "0.1.0"


def create_app(*args: Any, **kwargs: Any) -> Any:
    """The gateway's ASGI application; see :func:`safeshift.gateway.app.create_app`."""
    from safeshift.gateway.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = [
    "Action",
    "Assignment",
    "Clock",
    "ConcurrencyError",
    "Decision",
    "FakeModel",
    "FeedbackError",
    "FeedbackResult",
    "InvalidTransitionError",
    "MemoryStore",
    "ModelBackend",
    "ModelLoadError",
    "ModelResult",
    "Phase",
    "Plan",
    "PlanError",
    "PlanValidationError",
    "Prediction",
    "Rollout",
    "RolloutError",
    "SQLStore",
    "SafeshiftError",
    "StageAnalysis",
    "Status",
    "Store",
    "StoreError",
    "SystemClock",
    "UnknownRequestError",
    "UnknownRolloutError",
    "Verdict",
    "VirtualClock",
    "__version__",
    "create_app",
    "open_store",
]
