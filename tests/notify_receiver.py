"""A real webhook receiver for the notification tests: an HTTP server on 127.0.0.1 in a
thread that records every request (path, headers, exact body) and answers as told.

(A plain module, not a test file: ``tests/test_notify.py`` and the gateway tests share it.)"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True, slots=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int = 0  # what the receiver answered

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Bound at once (so its URL is known), listening from :meth:`up`: before that the port
    refuses connections, as a receiver that is down does.

    ``statuses``: the statuses to answer next (then 200). ``confirm``: the JSON answers of
    ``POST /confirm`` in turn (the last one repeats; an int answers that status instead)."""

    def __init__(self, *, listening: bool = True) -> None:
        self.requests: list[Received] = []
        self.statuses: list[int] = []
        self.confirm: list[Any] = [{"go": True}]
        self.delay = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if receiver.delay:
                    time.sleep(receiver.delay)
                status, answer = receiver._answer(  # the path without its query
                    self.path.split("?", 1)[0], {k.lower(): v for k, v in self.headers.items()},
                    body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.server_bind()
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        if listening:
            self.up()

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        with self._lock:
            if path == "/confirm":
                answer = self.confirm[0] if len(self.confirm) == 1 else self.confirm.pop(0)
                status, text = ((answer, b"{}") if isinstance(answer, int)
                                else (200, json.dumps(answer).encode()))
            else:
                status = self.statuses.pop(0) if self.statuses else 200
                text = b'{"ok":true}' if status < 300 else b'{"error":"try later"}'
            self.requests.append(Received(path, headers, body, status))
            return status, text

    def up(self) -> None:
        """Start listening (the receiver comes back)."""
        self.server.server_activate()
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def on(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def accepted(self, path: str = "/hook") -> list[Received]:
        """The requests to ``path`` it answered 2xx: the deliveries that counted."""
        return [r for r in self.on(path) if 200 <= r.status < 300]

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(5)
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
