"""Conversions every servicer makes between domain values and protobuf messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["timestamp"]


def timestamp(value: datetime | None) -> Timestamp | None:
    """A Timestamp message, or None (the field stays unset) for no time."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
