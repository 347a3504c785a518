"""Prometheus metrics of one gateway, in its own :class:`CollectorRegistry` (two apps in one
process never mix their figures). Label children used on the request path are bound once per
endpoint, so a request costs a few attribute look-ups, not a label-dict search.

=======================================  ===========  =====================================
name                                     type         labels
=======================================  ===========  =====================================
safeshift_requests_total                 counter      endpoint, arm, protocol (v1 | oip)
safeshift_request_duration_seconds       histogram    endpoint, arm
safeshift_model_duration_seconds         histogram    endpoint, arm
safeshift_fallbacks_total                counter      endpoint, reason (error | timeout |
                                                      invalid | breaker_open | saturated)
safeshift_request_faults_total           counter      endpoint, arm (requests that failed
                                                      through their own fault: 422)
safeshift_candidate_hung_calls           gauge        endpoint, variant (calls past their
                                                      timeout still running)
safeshift_breaker_state                  gauge        endpoint, variant (0 closed, 1 half-open,
                                                      2 open)
safeshift_breaker_opened_total           counter      endpoint, variant
safeshift_shadow_copies_total            counter      endpoint, outcome (ok | error | dropped)
safeshift_shadow_queue_depth             gauge        endpoint
safeshift_unflushed_records              gauge        endpoint (request records waiting for
                                                      the store)
safeshift_records_dropped                gauge        endpoint (lost to a long store outage)
safeshift_stage_index                    gauge        endpoint, rollout
safeshift_stage_info                     gauge        endpoint, rollout, stage, phase (=1)
safeshift_traffic_share                  gauge        endpoint, arm (0..1; an arm is baseline
                                                      or a candidate variant)
safeshift_shadow_share                   gauge        endpoint (0..1)
safeshift_feedback_total                 counter      endpoint, arm, kind (label | outcome)
safeshift_reports_total                  counter      endpoint, arm
safeshift_decisions_total                counter      endpoint, action
safeshift_http_errors_total              counter      route, status
safeshift_store_errors_total             counter      operation
safeshift_auth_denied_total              counter      status (401 | 403)
safeshift_denials_dropped_total          counter      (refusals not written to the store)
safeshift_notifications_total            counter      outcome (delivered | failed | dead)
safeshift_notifications_pending          gauge        (outbox entries not yet delivered)
safeshift_notifications_dead_letter      gauge        (outbox entries given up on)
=======================================  ===========  =====================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from safeshift._units import BASIS_POINTS
from safeshift.assign import BASELINE, CANDIDATE, Split

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
FALLBACK_REASONS = ("error", "timeout", "invalid", "breaker_open", "saturated")


class GatewayMetrics:
    """Every metric of one gateway app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("safeshift_requests", "Predictions served, by the arm that "
                                "was assigned and the protocol", ["endpoint", "arm", "protocol"],
                                registry=r)
        self.duration = Histogram("safeshift_request_duration_seconds", "Time from request "
                                  "to answer on the prediction path", ["endpoint", "arm"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.model_duration = Histogram("safeshift_model_duration_seconds", "Time of one model "
                                        "call", ["endpoint", "arm"], buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.fallbacks = Counter("safeshift_fallbacks", "Candidate calls that failed (error, "
                                 "timeout, invalid output) or were refused by the open "
                                 "breaker or a saturated pool; the baseline answered",
                                 ["endpoint", "reason"], registry=r)
        self.request_faults = Counter("safeshift_request_faults", "Requests that failed "
                                      "through their own fault (inputs the baseline rejects), "
                                      "counted against neither model, by the assigned arm",
                                      ["endpoint", "arm"], registry=r)
        self.hung_calls = Gauge("safeshift_candidate_hung_calls", "Candidate calls past their "
                                "timeout whose thread still runs them", ["endpoint", "variant"],
                                registry=r)
        self.breaker_state = Gauge("safeshift_breaker_state", "Candidate circuit breaker: 0 "
                                   "closed, 1 half-open, 2 open", ["endpoint", "variant"],
                                   registry=r)
        self.breaker_opened = Counter("safeshift_breaker_opened", "Times the candidate breaker "
                                      "opened", ["endpoint", "variant"], registry=r)
        self.shadow = Counter("safeshift_shadow_copies", "Shadow copies of requests sent to "
                              "the candidate, by outcome", ["endpoint", "outcome"], registry=r)
        self.shadow_depth = Gauge("safeshift_shadow_queue_depth", "Shadow copies waiting",
                                  ["endpoint"], registry=r)
        self.unflushed = Gauge("safeshift_unflushed_records", "Request records waiting to be "
                               "written to the store", ["endpoint"], registry=r)
        self.records_dropped = Gauge("safeshift_records_dropped", "Request records dropped "
                                     "because the store was unreachable too long", ["endpoint"],
                                     registry=r)
        self.stage_index = Gauge("safeshift_stage_index", "Index of the rollout's current "
                                 "stage (-1 before the first)", ["endpoint", "rollout"],
                                 registry=r)
        self.stage_info = Gauge("safeshift_stage_info", "1 for the rollout's current stage and "
                                "phase", ["endpoint", "rollout", "stage", "phase"], registry=r)
        self.traffic = Gauge("safeshift_traffic_share", "Share of units served by each arm",
                             ["endpoint", "arm"], registry=r)
        self.shadow_share = Gauge("safeshift_shadow_share", "Share of baseline requests "
                                  "mirrored to the candidate", ["endpoint"], registry=r)
        self.feedback = Counter("safeshift_feedback", "Feedback joined to served requests",
                                ["endpoint", "arm", "kind"], registry=r)
        self.reports = Counter("safeshift_reports", "User issue reports joined to served "
                               "requests", ["endpoint", "arm"], registry=r)
        self.decisions = Counter("safeshift_decisions", "Controller decisions taken in this "
                                 "process", ["endpoint", "action"], registry=r)
        self.http_errors = Counter("safeshift_http_errors", "Requests answered with an error "
                                   "status", ["route", "status"], registry=r)
        self.auth_denied = Counter("safeshift_auth_denied", "Requests refused for want of a "
                                   "valid token (401) or of the role (403)", ["status"],
                                   registry=r)
        for status in ("401", "403"):
            self.auth_denied.labels(status)
        self.denials_dropped = Counter("safeshift_denials_dropped", "Refused requests not written "
                                       "to the store's denial log (more than it keeps a flush)",
                                       registry=r)
        self.store_errors = Counter("safeshift_store_errors", "Failed store operations of the "
                                    "background tasks", ["operation"], registry=r)
        self.notifications = Counter("safeshift_notifications", "Webhook delivery attempts by "
                                     "this process: delivered, failed (to be retried) or dead "
                                     "(the last attempt failed)", ["outcome"], registry=r)
        for outcome in ("delivered", "failed", "dead"):
            self.notifications.labels(outcome)
        self.notifications_pending = Gauge("safeshift_notifications_pending", "Notifications "
                                           "in the store's outbox not yet delivered", registry=r)
        self.notifications_dead = Gauge("safeshift_notifications_dead_letter", "Notifications "
                                        "given up on after their last attempt (safeshift notify "
                                        "retry-dead requeues them)", registry=r)

    def endpoint(self, name: str, variants: tuple[str, ...] = (CANDIDATE,)) -> EndpointMetrics:
        return EndpointMetrics(self, name, variants)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def error(self, route: str, status: int) -> None:
        self.http_errors.labels(route, str(status)).inc()


class EndpointMetrics:
    """The children one endpoint's request path touches, bound once. Arms are ``baseline``
    and each candidate variant (``candidate``, and challengers in an experiment)."""

    def __init__(self, m: GatewayMetrics, endpoint: str,
                 variants: tuple[str, ...] = (CANDIDATE,)) -> None:
        self.endpoint = endpoint
        self._m = m
        arms = (BASELINE, *variants)
        self.requests = {(arm, proto): m.requests.labels(endpoint, arm, proto)
                         for arm in arms for proto in ("v1", "oip")}
        self.duration = {arm: m.duration.labels(endpoint, arm) for arm in arms}
        self.model_duration = {arm: m.model_duration.labels(endpoint, arm) for arm in arms}
        self.fallbacks = {reason: m.fallbacks.labels(endpoint, reason)
                          for reason in FALLBACK_REASONS}
        self.request_faults = {arm: m.request_faults.labels(endpoint, arm) for arm in arms}
        self.shadow = {o: m.shadow.labels(endpoint, o) for o in ("ok", "error", "dropped")}
        self._info: tuple[str, ...] | None = None

    def served(self, arm: str, protocol: str, seconds: float) -> None:
        self.requests[arm, protocol].inc()
        self.duration[arm].observe(seconds)

    def request_fault(self, arm: str) -> None:
        self.request_faults[arm].inc()

    def hung(self, variant: str, fn: Callable[[], float]) -> None:
        self._m.hung_calls.labels(self.endpoint, variant).set_function(fn)

    def breaker_watcher(self, variant: str) -> Callable[[int], None]:
        """The callback a candidate's breaker reports its state changes to."""
        gauge = self._m.breaker_state.labels(self.endpoint, variant)
        gauge.set(0)
        opened = self._m.breaker_opened.labels(self.endpoint, variant)

        def changed(state: int) -> None:
            gauge.set(state)
            if state == 2:
                opened.inc()

        return changed

    def shadow_depth(self, fn: Callable[[], float]) -> None:
        self._m.shadow_depth.labels(self.endpoint).set_function(fn)

    def records(self, waiting: Callable[[], float], dropped: Callable[[], float]) -> None:
        self._m.unflushed.labels(self.endpoint).set_function(waiting)
        self._m.records_dropped.labels(self.endpoint).set_function(dropped)

    def split(self, rollout: str, split: Split, phase: str) -> None:
        """Publish the stage and traffic shares after a refresh."""
        m, e = self._m, self.endpoint
        m.stage_index.labels(e, rollout).set(split.stage_index)
        info = (e, rollout, split.stage, phase)
        if info != self._info:
            if self._info is not None:
                m.stage_info.remove(*self._info)
            m.stage_info.labels(*info).set(1)
            self._info = info
        cand = split.traffic / BASIS_POINTS if split.active else 0.0
        if split.serve_candidate_to_all:
            cand = 1.0
        m.traffic.labels(e, BASELINE).set(1.0 - cand)
        previous = 0
        for name, _, upper in split.variants or ((split.primary[0], "", BASIS_POINTS),):
            m.traffic.labels(e, name).set(cand * (upper - previous) / BASIS_POINTS)
            previous = upper
        m.shadow_share.labels(e).set(split.shadow / BASIS_POINTS if split.active else 0.0)

    def feedback(self, arm: str, kind: str) -> None:
        self._m.feedback.labels(self.endpoint, arm, kind).inc()

    def report(self, arm: str) -> None:
        self._m.reports.labels(self.endpoint, arm).inc()

    def decision(self, action: Any) -> None:
        self._m.decisions.labels(self.endpoint, str(action)).inc()
