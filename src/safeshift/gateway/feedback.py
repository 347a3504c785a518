"""Feedback (labels, outcomes) and user reports, joined to the request that was served.

A batch is validated whole — schema and values first, then every id must name a live request
record — before anything is written, so a bad item never leaves the batch half-applied. Values
are checked by :func:`safeshift.feedback.check_feedback_values`, the check ``Rollout.feedback``
applies too: finite labels, outcomes finite and in their metric's range. Joins happen in a
worker thread (SQL off the event loop). Repeats are idempotent per (request, metric).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from safeshift.feedback import check_feedback_values
from safeshift.gateway._http import HTTPError
from safeshift.gateway.bodies import load_json

MAX_BATCH = 1000
MAX_TEXT = 10_000
_METRIC = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:-]{0,31}$")
_FEEDBACK_FIELDS = ("id", "label", "outcome")
_REPORT_FIELDS = ("id", "kind", "text")


@dataclass(slots=True)
class FeedbackItem:
    id: str
    label: Any
    outcome: dict[str, float] | None


@dataclass(slots=True)
class ReportItem:
    id: str
    kind: str
    text: str


def _load(body: bytes, what: str) -> tuple[list[Any], bool]:
    doc = load_json(body, f"{what} object or a list of them")
    if isinstance(doc, list):
        if not doc:
            raise HTTPError(422, "the batch is empty", field="body")
        if len(doc) > MAX_BATCH:
            raise HTTPError(422, f"at most {MAX_BATCH} items a batch", field="body")
        return doc, True
    if isinstance(doc, dict):
        return [doc], False
    raise HTTPError(422, f"the body must be {what} object or a list of them", field="body")


def _where(batch: bool, i: int, name: str) -> str:
    return f"[{i}].{name}" if batch else name


def _id(item: dict[str, Any], where: str) -> str:
    rid = item.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 128:
        raise HTTPError(422, "'id' is required: the id that predict returned", field=where)
    return rid


def _objects(body: bytes, noun: str, fields: tuple[str, ...]
             ) -> tuple[list[tuple[int, dict[str, Any], str]], bool]:
    """The body's items (one object, or a batch) with their ids, after the checks every kind
    of item shares: each is an object, has only known ``fields`` and an id."""
    docs, batch = _load(body, f"a {noun}")
    known = ", ".join(fields[:-1]) + f" and {fields[-1]}"
    out = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise HTTPError(422, f"each {noun} must be an object", field=f"[{i}]")
        extra = sorted(doc.keys() - set(fields))
        if extra:
            raise HTTPError(422, f"unknown field {extra[0]!r}; the fields are {known}",
                            field=_where(batch, i, extra[0]))
        out.append((i, doc, _id(doc, _where(batch, i, "id"))))
    return out, batch


def parse_feedback(body: bytes) -> tuple[list[FeedbackItem], bool]:
    """``{"id", "label"}`` or ``{"id", "outcome": {metric: number}}``, or a list of them."""
    docs, batch = _objects(body, "feedback", _FEEDBACK_FIELDS)
    items = []
    for i, doc, rid in docs:
        label = doc.get("label")
        outcome = doc.get("outcome")
        if outcome is not None:
            if not isinstance(outcome, dict) or not outcome:
                raise HTTPError(422, "'outcome' must be a non-empty object of metric: number",
                                field=_where(batch, i, "outcome"))
            for metric in outcome:
                if not _METRIC.match(metric):
                    raise HTTPError(422, "metric names use lower-case letters, digits, '.', "
                                         "'_' or '-'", field=_where(batch, i, f"outcome.{metric}"))
        if label is None and outcome is None:
            raise HTTPError(422, "give a 'label' or an 'outcome'", field=_where(batch, i, "label"))
        problem = check_feedback_values(label, outcome)
        if problem:
            raise HTTPError(422, problem[1], field=_where(batch, i, problem[0]))
        items.append(FeedbackItem(rid, label, {k: float(v) for k, v in outcome.items()}
                                  if outcome else None))
    return items, batch


def parse_reports(body: bytes) -> tuple[list[ReportItem], bool]:
    """``{"id", "kind", "text"}``, or a list of them."""
    docs, batch = _objects(body, "report", _REPORT_FIELDS)
    items = []
    for i, doc, rid in docs:
        kind = doc.get("kind")
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise HTTPError(422, "'kind' is required: 1-32 letters, digits, spaces or _.:-, "
                                 "e.g. 'wrong_answer'", field=_where(batch, i, "kind"))
        text = doc.get("text", "")
        if text is None:
            text = ""
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            raise HTTPError(422, f"'text' must be a string of at most {MAX_TEXT} characters",
                            field=_where(batch, i, "text"))
        items.append(ReportItem(rid, kind, text))
    return items, batch
