"""Bounded request bodies, as a pure-ASGI middleware: 413 with a JSON error when a request
declares (``Content-Length``) or streams more than ``max_bytes``."""

from __future__ import annotations

from safeshift.gateway._http import (
    ASGIApp,
    BodyTooLarge,
    HTTPError,
    Message,
    Receive,
    Scope,
    Send,
    send_error,
)


class BodyLimitMiddleware:
    """Rejects oversized bodies before a handler reads them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared: int | None = None
        chunked = False
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, HTTPError(400, "invalid Content-Length header",
                                                     field="Content-Length"))
                    return
            elif key == b"transfer-encoding":
                chunked = True
        if declared is not None:
            if declared > limit:
                await send_error(send, _too_large(limit))
                return
            if not chunked:  # the server delivers no more than declared: nothing to count
                await self.app(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await send_error(send, _too_large(limit))


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body too large: the limit is {limit} bytes; send smaller "
                          "batches", field="body")
