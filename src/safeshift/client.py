"""A small typed client for a running ``safeshift serve``: the control API (rollouts, actions,
tokens) and the data plane (predict, feedback, reports), over httpx.

>>> from safeshift.client import Client
>>> with Client("http://127.0.0.1:8000", token=os.environ["SAFESHIFT_TOKEN"]) as c:  # doctest: +SKIP
...     c.status("churn-v2")["phase"]
...     c.act("churn-v2", "pause", reason="checking a dashboard")

Every method returns the server's JSON; an error answer raises :class:`ClientError` carrying
the status and the server's message (:class:`~safeshift.auth.AuthError` for 401 and 403).
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import httpx

from safeshift.auth import AuthError
from safeshift.errors import SafeshiftError

__all__ = ["Client", "ClientError"]


class ClientError(SafeshiftError):
    """The server answered with an error (``status``; ``body`` is its JSON)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Client:
    """One connection pool to one server; ``token`` defaults to ``$SAFESHIFT_TOKEN``."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        token = token if token is not None else os.environ.get("SAFESHIFT_TOKEN")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SafeshiftError(f"cannot reach {self.url}: {exc}; check --url and that "
                                 "safeshift serve runs there") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            return body
        message = body.get("error") if isinstance(body, dict) else None
        message = str(message or f"HTTP {response.status_code}")
        if isinstance(body, dict) and isinstance(body.get("problems"), list):
            message += "".join(f"\n  - {p.get('field') or '(plan)'}: {p.get('message')}"
                               for p in body["problems"] if isinstance(p, dict))
        if response.status_code in (401, 403):
            raise AuthError(response.status_code, message)
        raise ClientError(response.status_code, message, body)

    # -- control ----------------------------------------------------------------------------

    def rollouts(self, phase: str | None = None) -> list[dict[str, Any]]:
        params = {"phase": phase} if phase else None
        result: list[dict[str, Any]] = self._call("GET", "/v1/rollouts", params=params)
        return result

    def status(self, rollout: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/rollouts/{_seg(rollout)}")
        return result

    def history(self, rollout: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/v1/rollouts/{_seg(rollout)}/history")
        return result

    def release_notes(self, rollout: str) -> str:
        """The rollout's release notes, Markdown."""
        result: dict[str, Any] = self._call("GET", f"/v1/rollouts/{_seg(rollout)}/notes")
        return str(result["markdown"])

    def audit(self, rollout: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/rollouts/{_seg(rollout)}/audit")
        return result

    def create(self, plan: dict[str, Any], *, start: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/rollouts", json=plan,
                                            params={"start": str(start).lower()})
        return result

    def act(self, rollout: str, action: str, *, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/rollouts/{_seg(rollout)}/{action}",
                                            json={"reason": reason})
        return result

    def review(self, rollout: str, role: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/v1/rollouts/{_seg(rollout)}/reviews/{_seg(role)}", json={"reason": reason})
        return result

    def tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/tokens")
        return result

    def create_token(self, name: str, role: str, *, expires: str | None = None,
                     attributes: list[str] | None = None, labels: bool = False,
                     reviews: list[str] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/tokens", json={
            "name": name, "role": role, "expires": expires, "attributes": attributes or [],
            "labels": labels, "reviews": reviews or []})
        return result

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/tokens/{_seg(token_id)}")
        return result

    def denials(self, limit: int = 100) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/denials", params={"limit": limit})
        return result

    # -- data plane -------------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: the server's endpoints, their stages and breakers (ClientError 503
        while it starts)."""
        result: dict[str, Any] = self._call("GET", "/readyz")
        return result

    def predict(self, endpoint: str, inputs: Any, *, unit: str | None = None,
                context: dict[str, Any] | None = None,
                request_id: str | None = None) -> dict[str, Any]:
        """One row (a mapping) or a list of rows; ``request_id`` names the request for its
        feedback (fresh for each request: a taken one is a 409), else the server makes one.
        The answer: ``id``, ``outputs``, ``version``, ``arm``, ``stage``, ``fallback``."""
        body: dict[str, Any] = {"inputs": inputs}
        if unit is not None:
            body["unit"] = unit
        if context:
            body["context"] = context
        if request_id is not None:
            body["id"] = request_id
        result: dict[str, Any] = self._call("POST", f"/v1/endpoints/{_seg(endpoint)}/predict",
                                            json=body)
        return result

    def feedback(self, items: dict[str, Any] | list[dict[str, Any]]) -> Any:
        """``{"id", "label"}`` or ``{"id", "outcome": {metric: value}}``, or a list of them
        (the token needs the labels right)."""
        return self._call("POST", "/v1/feedback", json=items)

    def label(self, request_id: str, label: Any) -> dict[str, Any]:
        """The label of one request: ``feedback({"id": request_id, "label": label})``."""
        result: dict[str, Any] = self.feedback({"id": request_id, "label": label})
        return result

    def report(self, items: dict[str, Any] | list[dict[str, Any]]) -> Any:
        """A user's issue report ``{"id", "kind", "text"}``, or a list of them."""
        return self._call("POST", "/v1/reports", json=items)


def _seg(value: str) -> str:
    """One path segment, escaped."""
    from urllib.parse import quote

    return quote(value, safe="")
