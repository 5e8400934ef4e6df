"""Structured logs: one JSON object per line on stderr, carrying the current trace and span ids.

A line looks like::

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "services.auth.core", "message": "...",
     "service": "auth", "trace_id": "4bf9...", "span_id": "00f0..."}

Fields passed with ``extra={...}`` are added as they are (values JSON-encoded, or ``str()`` when they aren't
JSON); an exception becomes an ``exc`` field with the formatted traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

__all__ = ["JsonLogFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_RESERVED = ("time", "level", "logger", "message", "service", "trace_id", "span_id", "exc")


class JsonLogFormatter(logging.Formatter):
    """Formats a record as one line of JSON with the service name and the active span's ids."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (without the newline)."""
        created = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service_name,
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when writing, so test capture and redirection work."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(service_name: str, level: str = "INFO") -> None:
    """Sends every log record of the process to stderr as JSON lines; raises ValueError on an unknown level.

    Idempotent: calling it again replaces the service name and level rather than adding a second handler.
    """
    numeric = logging.getLevelNamesMapping().get(level.strip().upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(JsonLogFormatter(service_name))
    root.setLevel(numeric)
