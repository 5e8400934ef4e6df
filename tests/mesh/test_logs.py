"""configure_logging: JSON lines on stderr with the service name and the current span's ids."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.mesh.logs import configure_logging

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]


def test_lines_carry_service_and_current_span_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("auth")
    log = logging.getLogger("services.auth.core")
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
    with trace.use_span(span):
        log.info("issued token for %s", "alice", extra={"tenant": "acme"})
    log.warning("outside any span")

    inside, outside = _lines(capsys)
    assert inside["message"] == "issued token for alice"
    assert (inside["level"], inside["logger"], inside["service"]) == ("INFO", "services.auth.core", "auth")
    assert (inside["trace_id"], inside["span_id"]) == (format(TRACE_ID, "032x"), format(SPAN_ID, "016x"))
    assert inside["tenant"] == "acme"
    assert inside["time"].endswith("Z")
    assert "trace_id" not in outside and outside["level"] == "WARNING"


def test_exceptions_become_an_exc_field(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("billing")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("x").exception("charge failed")
    (line,) = _lines(capsys)
    assert line["message"] == "charge failed"
    assert "ZeroDivisionError" in line["exc"] and "Traceback" in line["exc"]


def test_idempotent_and_level_applies(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("first", "INFO")
    configure_logging("second", "WARNING")
    log = logging.getLogger("y")
    log.info("dropped")
    log.warning("kept")
    lines = _lines(capsys)
    assert [(line["message"], line["service"]) for line in lines] == [("kept", "second")]


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("svc", "chatty")
