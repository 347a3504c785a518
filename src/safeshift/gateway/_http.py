"""Small pure-ASGI helpers shared by the gateway's handlers and middleware."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from safeshift._json import dumps_plain

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_TYPE = b"application/json"


class HTTPError(Exception):
    """An error answered to the client as JSON ``{"error": message, "field": field}``."""

    def __init__(self, status: int, message: str, *, field: str | None = None,
                 headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = list(headers)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class BodyTooLarge(Exception):
    """Raised by the body-limit middleware's ``receive`` when a streamed body is too big."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def dumps(obj: Any) -> bytes:
    """Compact JSON; non-finite floats are refused (they are not JSON). The text is the
    standard encoder's; ``orjson`` writes it when it writes the same (most answers: a tenth
    of the cost, see :mod:`safeshift._json`)."""
    raw = dumps_plain(obj)
    if raw is not None:
        return raw
    return _ENCODER.encode(obj).encode()


def _default(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if tolist is not None:
        return tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# made once: json.dumps with arguments builds an encoder on every call
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default)


async def read_body(receive: Receive) -> bytes:
    """The whole request body (the body-limit middleware bounds it)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


async def send_bytes(send: Send, status: int, body: bytes, *,
                     content_type: bytes = JSON_TYPE,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
           *headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any, *,
                    headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await send_bytes(send, status, dumps(obj), headers=headers)


async def send_error(send: Send, error: HTTPError) -> None:
    await send_json(send, error.status, error.body(), headers=error.headers)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a (lower-case) request header, decoded as latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def request_id(scope: Scope) -> str | None:
    """The id the request-id middleware gave this request, if it ran."""
    state = scope.get("state")
    if isinstance(state, dict):
        rid = state.get("request_id")
        return rid if isinstance(rid, str) else None
    return None


def request_id_given(scope: Scope) -> bool:
    """True when :func:`request_id` is the client's own ``X-Request-ID``, not a new one."""
    state = scope.get("state")
    return isinstance(state, dict) and state.get("request_id_given") is True


def annotate(scope: Scope, **fields: Any) -> None:
    """Add fields to this request's access-log line (endpoint, arm, fallback, ...)."""
    state = scope.get("state")
    if isinstance(state, dict):
        log = state.get("log")
        if isinstance(log, dict):
            log.update(fields)
