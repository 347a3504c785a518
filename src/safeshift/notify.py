"""Notifications: webhooks told of a rollout's decisions, and the confirm gate before a stage.

Why an outbox: a decision and the notifications it causes are written in one transaction
(:meth:`Store.commit` with ``outbox=``), so a process that dies after deciding still notifies,
and one that dies before never notifies of a decision that did not happen. A background loop
(the gateway's, every ``notify_interval``) calls :func:`deliver_due`, which claims due entries
in the store, posts them and records the outcome. Delivery is therefore *at least once*:
a receiver deduplicates on the ``X-Safeshift-Delivery`` header (the entry's id, never reused).

Order: the entries of one rollout for one webhook are sent in the order of the decisions; an
undelivered earlier one holds back the later ones (a dead-lettered one no longer does). A
failed attempt is retried after 1 s, 2 s, 4 s … (at most 5 min); after ``max_attempts`` the
entry is dead-lettered (``safeshift notify retry-dead`` requeues it).

Signatures: with ``secret_env`` the body is signed with HMAC-SHA256 under the secret read from
that environment variable, in ``X-Safeshift-Signature: sha256=<hex>`` (:func:`verify`).

The confirm gate (a stage's ``confirm:``) is asked by the controller's tick before the stage
starts: :func:`ask_confirm` says go only for an answer 200 with ``{"go": true}``; anything
else, an unreachable hook included, holds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from safeshift.plan import Confirm, Plan
from safeshift.state import Action, Decision, OutboxEntry, Phase
from safeshift.store.base import Store

SIGNATURE_HEADER = "X-Safeshift-Signature"
EVENT_HEADER = "X-Safeshift-Event"
DELIVERY_HEADER = "X-Safeshift-Delivery"
USER_AGENT = "safeshift-notify/1"

DEFAULT_MAX_ATTEMPTS = 12
"""Attempts before an entry is dead-lettered: with the backoff below, about 19 minutes."""
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
DEFAULT_TIMEOUT = 2.0
"""Seconds one delivery may take before it counts as failed."""
DEFAULT_LEASE = 60.0
"""Seconds a claimed entry stays claimed: longer than a batch can take (see the budget)."""

_MAX_ERROR = 500


# -- which decision is which event ------------------------------------------------------------


def event_of(decision: Decision) -> str | None:
    """The notification event of a decision (``None``: nothing to tell).

    stage_change: a stage started (start, advance, the last approval) or an experiment arm
    was dropped; awaiting_approval: a stage waits for people (and each partial approval);
    rollback; pause: paused or resumed; promotion: promoted, or the watch after it ended."""
    action = decision.action
    if action is Action.APPROVE:
        return "stage_change" if decision.phase is Phase.RUNNING else "awaiting_approval"
    return {Action.START: "stage_change", Action.ADVANCE: "stage_change",
            Action.DROP_ARM: "stage_change", Action.AWAIT_APPROVAL: "awaiting_approval",
            Action.ROLLBACK: "rollback", Action.PAUSE: "pause", Action.RESUME: "pause",
            Action.PROMOTE: "promotion", Action.END_WATCH: "promotion",
            Action.REGISTRY: "promotion"}.get(action)


# -- payloads ---------------------------------------------------------------------------------


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment, for reasons and errors: a hook's URL may
    carry a token there, and reasons end up in the store, in logs and in chat."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stage_name(plan: Plan, index: int) -> str | None:
    return plan.stages[index].name if 0 <= index < len(plan.stages) else None


def evidence_summary(evidence: dict[str, Any]) -> dict[str, Any]:
    """The few figures a receiver shows: sample sizes, each guardrail's global verdict, the
    sentences of proven harms and a sample-ratio mismatch (the full evidence is in the
    decision record: ``safeshift history``)."""
    if not evidence:
        return {}
    out: dict[str, Any] = {k: evidence[k] for k in ("stage", "n_baseline", "n_candidate")
                           if k in evidence}
    verdicts = [v for v in evidence.get("verdicts") or [] if isinstance(v, dict)]
    out["guardrails"] = [
        {k: v.get(k) for k in ("guardrail", "arm", "status", "estimate", "lower", "upper")}
        for v in verdicts if v.get("segment") is None][:20]
    harms = [str(v.get("sentence", "")) for v in verdicts if v.get("status") == "harm"][:5]
    if harms:
        out["harm"] = harms
    srm = evidence.get("srm")
    if isinstance(srm, dict) and srm.get("mismatch"):
        out["srm"] = {"mismatch": True, "p_value": srm.get("p_value")}
    if "probability_best" in evidence:
        out["probability_best"] = evidence["probability_best"]
    return out


def decision_body(plan: Plan, decision: Decision, *, event: str, from_phase: Phase) -> dict[str, Any]:
    """The JSON payload of a decision (what ``format: json`` sends)."""
    return {
        "rollout": decision.rollout, "endpoint": plan.endpoint, "seq": decision.seq,
        "event": event, "action": str(decision.action), "phase": str(decision.phase),
        "from_phase": str(from_phase),
        "from_stage": _stage_name(plan, decision.from_stage),
        "to_stage": _stage_name(plan, decision.to_stage),
        "reason": decision.reason, "actor": decision.actor, "at": _iso(decision.at),
        "baseline": plan.baseline.version, "candidate": plan.candidate.version,
        "evidence": evidence_summary(decision.evidence),
    }


def outbox_entries(plan: Plan, decision: Decision, *, from_phase: Phase) -> list[OutboxEntry]:
    """One entry per webhook of the plan that wants this decision's event (committed with
    the decision)."""
    event = event_of(decision) if plan.notifications else None
    if event is None:
        return []
    body = decision_body(plan, decision, event=event, from_phase=from_phase)
    return [OutboxEntry(decision.rollout, decision.seq, event, hook.url,
                        {"format": hook.format, "secret_env": hook.secret_env, "body": body},
                        decision.at)
            for hook in plan.notifications if event in hook.events]


_HEADLINE = {
    "start": "started in stage {to}", "advance": "advanced from stage {frm} to stage {to}",
    "approve": "approved: stage {to}", "await_approval": "stage {to} awaits approval",
    "rollback": "rolled back", "pause": "paused in stage {frm}", "resume": "resumed in stage {frm}",
    "promote": "promoted", "end_watch": "the watch after promotion ended",
    "drop_arm": "an experiment arm was dropped in stage {frm}",
    "registry": "the registry alias now points at the promoted model",
}
_EMOJI = {"stage_change": ":arrow_forward:", "awaiting_approval": ":raised_hand:",
          "rollback": ":rotating_light:", "pause": ":double_vertical_bar:",
          "promotion": ":rocket:"}


def _mrkdwn(text: str) -> str:
    """Slack's three escapes: anything else in a reason is shown as written."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def slack_message(body: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message (``text`` for notifications, ``blocks`` to show)."""
    action = str(body.get("action", ""))
    headline = _HEADLINE.get(action, action).format(frm=body.get("from_stage") or "-",
                                                    to=body.get("to_stage") or "-")
    title = f"{body.get('rollout')}: {headline}"
    emoji = _EMOJI.get(str(body.get("event")), ":information_source:")
    reason = str(body.get("reason", ""))
    fields = [("Phase", body.get("phase")), ("Endpoint", body.get("endpoint")),
              ("Candidate", body.get("candidate")), ("By", body.get("actor"))]
    return {
        "text": _cut(f"{emoji} safeshift {title}: {reason}", 3000),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": _cut(title, 150),
                                        "emoji": True}},
            {"type": "section", "text": {"type": "mrkdwn",
                                         "text": _cut(_mrkdwn(reason) or "-", 3000)}},
            {"type": "section", "fields": [
                {"type": "mrkdwn", "text": _cut(f"*{name}*\n{_mrkdwn(str(value))}", 2000)}
                for name, value in fields]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(
                f"{emoji} decision {body.get('seq')} · {body.get('event')} · {body.get('at')}",
                3000)}]},
        ],
    }


def _dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def render(entry: OutboxEntry) -> bytes:
    """The exact bytes posted (and signed) for an entry: the same on every attempt."""
    body = entry.payload.get("body", {})
    if entry.payload.get("format") == "slack":
        return _dumps(slack_message(body))
    return _dumps(body)


# -- signatures -------------------------------------------------------------------------------


def signature(secret: str | bytes, body: bytes) -> str:
    """The ``X-Safeshift-Signature`` value: ``sha256=`` and the HMAC-SHA256 of the body."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` under ``secret`` (constant time)."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)


class _NoSecret(Exception):
    pass


def _headers(event: str, body: bytes, secret_env: str | None,
             delivery: int | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json", "user-agent": USER_AGENT,
               EVENT_HEADER: event}
    if delivery is not None:
        headers[DELIVERY_HEADER] = str(delivery)
    if secret_env:
        secret = os.environ.get(secret_env)
        if not secret:
            # never send unsigned what the receiver expects signed
            raise _NoSecret(f"environment variable {secret_env} (the signing secret) is not set "
                            "in this process; set it where the controller and gateway run")
        headers[SIGNATURE_HEADER] = signature(secret, body)
    return headers


# -- delivery ---------------------------------------------------------------------------------


def backoff(attempts: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 1, 2, 4 … at most cap."""
    return float(min(cap, base * 2 ** max(attempts - 1, 0)))


@dataclass(slots=True)
class DeliveryReport:
    """What one :func:`deliver_due` call did."""

    delivered: int = 0
    failed: int = 0  # failed attempts that will be retried
    dead: int = 0  # entries given up on after their last attempt

    @property
    def attempted(self) -> int:
        return self.delivered + self.failed + self.dead


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _post(entry: OutboxEntry, client: httpx.Client) -> str | None:
    """Post one entry; ``None`` on a 2xx answer, else what went wrong."""
    where = display_url(entry.target)
    try:
        body = render(entry)
        headers = _headers(entry.event, body, entry.payload.get("secret_env"), entry.id)
        response = client.post(entry.target, content=body, headers=headers)
    except _NoSecret as exc:
        return str(exc)
    except Exception as exc:  # unreachable, timed out, a URL httpx refuses: all retried
        return f"cannot reach {where}: {_short(exc)}"
    if 200 <= response.status_code < 300:
        return None
    text = " ".join(response.text.split())[:200]
    return f"{where} answered HTTP {response.status_code}" + (f": {text}" if text else "")


def deliver_due(store: Store, now: float, *, client: httpx.Client, limit: int = 100,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS, backoff_base: float = BACKOFF_BASE,
                backoff_cap: float = BACKOFF_CAP, lease: float = DEFAULT_LEASE,
                budget: float = 10.0, batch: int = 20) -> DeliveryReport:
    """Send what is due at ``now`` (at most ``limit`` attempts, for at most ``budget`` seconds
    of real time, so a gateway shutting down is not held up by slow receivers).

    Entries are claimed ``batch`` at a time (each the head of its rollout-and-webhook queue,
    see :meth:`Store.claim_outbox`) and claimed again after each batch, so a queue whose head
    was delivered moves on within the call. ``client`` carries the timeout (2 s is typical)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    report = DeliveryReport()
    started = time.monotonic()
    while report.attempted < limit and time.monotonic() - started < budget:
        claimed = store.claim_outbox(now, limit=min(batch, limit - report.attempted), lease=lease)
        if not claimed:
            break
        settled: list[OutboxEntry] = []
        for entry in claimed:
            if time.monotonic() - started >= budget:
                entry.next_attempt_at = now  # released: due again, no attempt counted
                settled.append(entry)
                continue
            error = _post(entry, client)
            if error is None:
                entry.delivered_at, entry.last_error = now, ""
                report.delivered += 1
            else:
                entry.attempts += 1
                entry.last_error = error[:_MAX_ERROR]
                if entry.attempts >= max_attempts:
                    entry.dead = True
                    report.dead += 1
                else:
                    entry.next_attempt_at = now + backoff(entry.attempts, base=backoff_base,
                                                          cap=backoff_cap)
                    report.failed += 1
            settled.append(entry)
        store.settle_outbox(settled)
    return report


# -- the confirm gate -------------------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def confirm_body(plan: Plan, *, action: Action, from_stage: int, to_stage: int, phase: Phase,
                 reason: str, at: float, evidence: dict[str, Any]) -> dict[str, Any]:
    """What the confirm hook is asked about: the transition the controller proposes."""
    return {"rollout": plan.rollout, "endpoint": plan.endpoint, "event": "confirm",
            "action": str(action), "phase": str(phase),
            "from_stage": _stage_name(plan, from_stage), "to_stage": _stage_name(plan, to_stage),
            "reason": reason, "at": _iso(at), "baseline": plan.baseline.version,
            "candidate": plan.candidate.version, "evidence": evidence_summary(evidence)}


def ask_confirm(confirm: Confirm, proposal: dict[str, Any], *,
                client: httpx.Client | None = None) -> tuple[bool, str]:
    """Ask the hook; ``(True, "go")`` only for an answer 200 with ``{"go": true}``, else
    ``(False, what it answered)``: a hook that is down, slow or says anything else holds."""
    body = _dumps(proposal)
    try:
        headers = _headers("confirm", body, confirm.secret_env)
    except _NoSecret as exc:
        return False, str(exc)
    try:
        if client is None:
            with httpx.Client(timeout=confirm.timeout) as own:
                response = own.post(confirm.url, content=body, headers=headers)
        else:
            response = client.post(confirm.url, content=body, headers=headers,
                                   timeout=confirm.timeout)
    except Exception as exc:
        return False, f"it is unreachable ({_short(exc)[:200]})"
    if response.status_code != 200:
        return False, f"it answered HTTP {response.status_code}"
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if isinstance(answer, dict) and answer.get("go") is True:
        return True, "go"
    if isinstance(answer, dict) and "go" in answer:
        said = f"it answered go: {json.dumps(answer['go'])[:50]}"
        why = answer.get("reason")
        if isinstance(why, str) and why.strip():
            said += f" ({_CONTROL.sub(' ', why.strip())[:200]})"
        return False, said
    return False, 'it answered 200 without {"go": true}'


__all__ = ["DELIVERY_HEADER", "EVENT_HEADER", "SIGNATURE_HEADER", "DeliveryReport", "ask_confirm",
           "backoff", "confirm_body", "decision_body", "deliver_due", "display_url", "event_of",
           "evidence_summary", "outbox_entries", "render", "signature", "slack_message", "verify"]
