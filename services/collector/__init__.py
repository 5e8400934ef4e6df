"""The local OTLP/HTTP trace receiver: spans Triton (or any OTLP exporter) sends go into the span store."""

from __future__ import annotations

__all__: list[str] = []
