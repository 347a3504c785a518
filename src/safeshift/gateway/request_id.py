"""Request ids and the JSON access log, as one pure-ASGI middleware.

Each HTTP request gets an id: the client's ``X-Request-ID`` when it is a sane token, otherwise
a new one (``scope["state"]["request_id_given"]`` says which). It is echoed in the
``X-Request-ID`` response header, available to handlers through ``scope["state"]["request_id"]``
and to every log line through a context variable (an id the client chose as its HMAC, ``r:…``,
like the store keeps it), and ends up in one access-log line per request (method, path,
status, duration and what the handlers annotated: endpoint, arm, version, fallback).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from safeshift._units import client_address
from safeshift.gateway._http import ASGIApp, Message, Receive, Scope, Send
from safeshift.gateway.logs import access_log, request_id_var
from safeshift.pseudonym import request_key

_TOKEN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def sane_request_id(text: str) -> bool:
    """Whether a client's ``X-Request-ID`` is taken as the request's id (1-128 letters,
    digits or ``._:-``); another value is replaced by a fresh id."""
    return _TOKEN.match(text) is not None


class RequestIdMiddleware:
    """Assigns request ids and writes the access log."""

    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                text = bytes(value).decode("latin-1")
                if sane_request_id(text):
                    rid = text
                break
        given = rid is not None
        if rid is None:
            rid = os.urandom(16).hex()
        fields: dict[str, Any] = {}
        state = scope.get("state")
        if not isinstance(state, dict):
            state = scope["state"] = {}
        state["request_id"] = rid
        state["request_id_given"] = given  # the client's: it may repeat (see request_ids.py)
        state["log"] = fields
        # an id the client chose may carry anything (an order number, a phone number): logs
        # keep its HMAC, as the store does (safeshift.pseudonym.request_key); ours as they are
        logged = request_key(rid) if given else rid
        token = request_id_var.set(logged)
        status = 500
        start = time.perf_counter()
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log and access_log.enabled():
                client = scope.get("client")
                fields.update(
                    request_id=logged, method=scope["method"], path=scope["path"], status=status,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                    client=client_address(client[0]) if client else None)
                access_log.write(fields)
            request_id_var.reset(token)
