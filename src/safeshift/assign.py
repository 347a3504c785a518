"""Sticky, monotone assignment of units to arms.

A unit's bucket is murmur3 (32-bit, unsigned) of ``"{salt}/{unit}"`` modulo 10,000, where
the salt is the plan's (:attr:`~safeshift.plan.Plan.salt`) behind a secret seed drawn when the
rollout is registered (``"{seed}:{plan salt}"``; the seed is kept in the store, never shown or
sent), so that nobody outside can choose unit ids that land on one arm. A unit
gets the candidate when its bucket is below the stage's share in basis points, so a unit that
is in at 1% stays in at 5% and at 50%. Targeting rules come before hashing. The mapping is
locked by golden vectors (``tests/data/assignment-v1.json``): changing it would move users
between arms mid-rollout, and replicas running different releases would disagree.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import mmh3

from safeshift._units import BASIS_POINTS
from safeshift.plan import Plan

ASSIGNMENT_VERSION = 1
"""Bumped only with a new golden-vector file; see the module docstring."""

BASELINE = "baseline"
CANDIDATE = "candidate"


class Reason(StrEnum):
    """Why a request went where it went."""

    HASH = "hash"  # bucket below/above the stage's share
    TARGETED = "targeted"  # always_candidate rule
    EXCLUDED = "excluded"  # never_candidate rule
    ANONYMOUS = "anonymous"  # no unit id
    INACTIVE = "inactive"  # rollout not running a stage (pending, rolled back, promoted)
    NO_CONSENT = "no_consent"  # the plan's consent attribute does not grant consent


def bucket(salt: str, unit: str) -> int:
    """The unit's bucket in ``0..9999`` for this salt."""
    return int(mmh3.hash(f"{salt}/{unit}", signed=False)) % BASIS_POINTS


@dataclass(frozen=True, slots=True)
class Split:
    """What a rollout's state means for traffic; computed once per state change."""

    stage: str
    stage_index: int
    traffic: int  # basis points to the candidate
    shadow: int  # basis points mirrored to the candidate
    candidate_version: str
    baseline_version: str
    active: bool  # a stage is running (hash assignment and targeting apply)
    serve_candidate_to_all: bool = False  # promoted
    variants: tuple[tuple[str, str, int], ...] = ()
    """Which candidate model serves: ``(name, version, cumulative share of the candidate
    traffic in basis points)``; several only in an experiment stage. Empty: ``candidate``."""

    @property
    def primary(self) -> tuple[str, str]:
        """The (variant, version) that serves when there is one candidate."""
        if self.variants:
            return self.variants[0][0], self.variants[0][1]
        return CANDIDATE, self.candidate_version


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where one request goes."""

    arm: str
    version: str
    stage: str
    stage_index: int
    shadow: bool
    reason: Reason
    variant: str = CANDIDATE  # which candidate model (a challenger's name in an experiment)
    unit_hash: int = -1  # the unit's 32-bit hash when it was hashed, else -1 (counts units)

    @property
    def is_candidate(self) -> bool:
        return self.arm == CANDIDATE

    @property
    def telemetry_arm(self) -> str:
        """The arm telemetry is counted under: ``baseline`` or the candidate variant."""
        return self.variant if self.arm == CANDIDATE else self.arm


class Assigner:
    """Applies a plan's targeting and hashing to (unit, context) for a given :class:`Split`."""

    __slots__ = ("_always", "_anon_random", "_consent", "_never", "_prefix", "_pseudonyms",
                 "_unit_key")

    def __init__(self, plan: Plan, *, seed: str = "") -> None:
        # rollouts registered before seeds existed have none: their units stay where they are
        self._prefix = f"{seed}:{plan.salt}/" if seed else f"{plan.salt}/"
        self._unit_key = plan.unit
        self._always = {k: frozenset(map(str, v)) for k, v in plan.targeting.always_candidate.items()}
        self._never = {k: frozenset(map(str, v)) for k, v in plan.targeting.never_candidate.items()}
        self._anon_random = plan.targeting.anonymous == "random"
        consent = plan.consent
        self._consent = None if consent is None else (
            consent.attribute, frozenset(v.lower() for v in consent.granted))
        # rules on personal attributes (and, when they list pseudonyms, on the unit) match a
        # value by its pseudonym under the current or the previous key
        hashed = set(plan.personal)
        if any(v.startswith("p:") for rules in (self._always, self._never)
               for v in rules.get(plan.unit, ())):
            hashed.add(plan.unit)
        self._pseudonyms: tuple[frozenset[str], Any] | None = None
        if hashed & (set(self._always) | set(self._never)):
            from safeshift.pseudonym import pseudonymizer

            self._pseudonyms = (frozenset(hashed), pseudonymizer())

    def _matches(self, rules: dict[str, frozenset[str]], unit: str | None,
                 context: Mapping[str, Any] | None) -> bool:
        for key, values in rules.items():
            value = unit if key == self._unit_key else (context or {}).get(key)
            if value is None:
                continue
            if self._pseudonyms is not None and key in self._pseudonyms[0]:
                if any(p in values for p in self._pseudonyms[1].candidates(key, str(value))):
                    return True
                if key != self._unit_key:  # a personal attribute matches by pseudonym only
                    continue
            if str(value) in values:
                return True
        return False

    def _candidate(self, unit: str | None, split: Split, reason: Reason,
                   unit_hash: int = -1) -> Assignment:
        variants = split.variants
        if len(variants) <= 1:
            name, version = split.primary
            return Assignment(CANDIDATE, version, split.stage, split.stage_index, False, reason,
                              name, unit_hash)
        # a second, independent hash picks the variant inside the candidate traffic
        if unit:
            position = int(mmh3.hash(f"{self._prefix}variant/{unit}", signed=False)) % BASIS_POINTS
        else:
            position = random.randrange(BASIS_POINTS)  # not for security
        for name, version, upper in variants:
            if position < upper:
                return Assignment(CANDIDATE, version, split.stage, split.stage_index, False,
                                  reason, name, unit_hash)
        name, version, _ = variants[-1]
        return Assignment(CANDIDATE, version, split.stage, split.stage_index, False, reason, name,
                          unit_hash)

    def assign(self, unit: str | None, context: Mapping[str, Any] | None, split: Split) -> Assignment:
        if not split.active and not split.serve_candidate_to_all:
            return Assignment(BASELINE, split.baseline_version, split.stage, split.stage_index,
                              False, Reason.INACTIVE)
        if self._consent is not None and split.active:
            attr, granted = self._consent
            given = (context or {}).get(attr)
            if given is None or str(given).lower() not in granted:
                return Assignment(BASELINE, split.baseline_version, split.stage,
                                  split.stage_index, False, Reason.NO_CONSENT)
        if self._never and self._matches(self._never, unit, context):
            return Assignment(BASELINE, split.baseline_version, split.stage, split.stage_index,
                              False, Reason.EXCLUDED)
        if split.serve_candidate_to_all:
            return self._candidate(unit, split, Reason.INACTIVE)
        if self._always and split.traffic > 0 and self._matches(self._always, unit, context):
            return self._candidate(unit, split, Reason.TARGETED)
        if unit is None or unit == "":
            if self._anon_random:
                h = -1
                b = random.randrange(BASIS_POINTS)
            else:
                return Assignment(BASELINE, split.baseline_version, split.stage, split.stage_index,
                                  False, Reason.ANONYMOUS)
        else:
            h = mmh3.hash(self._prefix + unit, signed=False)
            b = h % BASIS_POINTS
        if b < split.traffic:
            if split.variants:
                return self._candidate(unit, split, Reason.HASH, h)
            return Assignment(CANDIDATE, split.candidate_version, split.stage, split.stage_index,
                              False, Reason.HASH, CANDIDATE, h)
        return Assignment(BASELINE, split.baseline_version, split.stage, split.stage_index,
                          b < split.shadow, Reason.HASH, CANDIDATE, h)
