"""Structured JSON logs: one object per line, carrying the request id of the request being
served (a context variable set by :class:`~safeshift.gateway.request_id.RequestIdMiddleware`)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii as _encode_str
from typing import Any

from safeshift._json import dumps_plain

request_id_var: ContextVar[str | None] = ContextVar("safeshift_request_id", default=None)

access_logger = logging.getLogger("safeshift.access")
gateway_logger = logging.getLogger("safeshift.gateway")

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "color_message"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...fields}`` on one line.

    Extra fields come from ``logger.info(msg, extra={...})``, or all at once from
    ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid is not None:
            out["request_id"] = rid
        fields = record.__dict__.get("fields")
        if isinstance(fields, dict):  # the access log's fast path: one dict of extras
            out.update(fields)
        else:
            for key, value in record.__dict__.items():
                if key not in _RESERVED and key not in out and not key.startswith("_"):
                    out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


_second: list[Any] = [-1, ""]  # the last second formatted, and its text


def _iso(created: float) -> str:
    whole = int(created)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int(created * 1000) % 1000:03d}Z"


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: a write and flush per line costs more than the rest of a
    gateway request. Batches go out at ``capacity`` lines, after ``interval`` seconds, on a
    warning or worse, on :func:`flush_logs` (the gateway calls it every second) and at exit."""

    def __init__(self, stream: Any = None, *, capacity: int = 256, interval: float = 1.0) -> None:
        super().__init__(stream)
        self.capacity = capacity
        self.interval = interval
        self._lines: list[str] = []
        self._last = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            due = (len(self._lines) >= self.capacity or record.levelno >= logging.WARNING
                   or time.monotonic() - self._last >= self.interval)
        if due:
            self.flush()

    def write_line(self, line: str) -> None:
        """Buffer a line formatted elsewhere (the access log's fast path)."""
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            due = (len(self._lines) >= self.capacity
                   or time.monotonic() - self._last >= self.interval)
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            self._last = time.monotonic()
            if lines and self.stream is not None:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass


class AccessLog:
    """The access log's writer. Through the ``safeshift.access`` logger by default; once
    :func:`configure_logging` has installed its handler, lines go straight into that handler's
    buffer in the same JSON shape, skipping ``LogRecord`` creation and dispatch (a third of
    the cost, on every request)."""

    def __init__(self) -> None:
        self.sink: BufferedStreamHandler | None = None

    def enabled(self) -> bool:
        return access_logger.isEnabledFor(logging.INFO)

    def write(self, fields: dict[str, Any]) -> None:
        sink = self.sink
        if sink is None:
            access_logger.handle(access_logger.makeRecord(
                access_logger.name, logging.INFO, __file__, 0, "request", (), None,
                extra={"fields": fields}))
            return
        line = {"ts": _iso(time.time()), "level": "info", "logger": access_logger.name,
                "message": "request", **fields}
        sink.write_line(_json_line(line))


def _json_line(doc: dict[str, Any]) -> str:
    """``json.dumps(doc, default=str, separators=(",", ":"))``, the same text, at a small
    fraction of the cost for the access log's flat lines.

    A line :func:`safeshift._json.dumps_plain` can write (flat strings, numbers, booleans and
    None, ASCII: the access log's lines) is written by ``orjson``. Otherwise strings, numbers,
    booleans and None are written here, any other value (and a key that is not a string) by
    ``json.dumps`` itself."""
    raw = dumps_plain(doc)
    if raw is not None:
        return raw.decode()
    parts = []
    for key, value in doc.items():
        head = _KEYS.get(key) if type(key) is str else None
        if head is None:
            if type(key) is not str:
                return json.dumps(doc, default=str, separators=(",", ":"))
            head = _encode_str(key) + ":"
            if len(_KEYS) < 1024:  # the access log's keys are a few dozen
                _KEYS[key] = head
        kind = type(value)
        if kind is str:
            text = _encode_str(value)
        elif value is None:
            text = "null"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif kind is int or (kind is float and math.isfinite(value)):
            text = repr(value)
        else:
            text = json.dumps(value, default=str, separators=(",", ":"))
        parts.append(head + text)
    return "{" + ",".join(parts) + "}"


_KEYS: dict[str, str] = {}  # a key, encoded, with its colon


access_log = AccessLog()


def flush_logs() -> None:
    """Write out lines buffered by :class:`BufferedStreamHandler` on safeshift's loggers."""
    for name in ("safeshift", "safeshift.access", "safeshift.gateway", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, BufferedStreamHandler):
                handler.flush()


def configure_logging(level: int = logging.INFO) -> None:
    """Send safeshift's and uvicorn's logs to stderr as JSON lines (used by ``safeshift serve``)."""
    handler = BufferedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("safeshift", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # our access log replaces it
    access_logger.handlers = []
    access_logger.propagate = True
    access_log.sink = handler
