"""The conversions every servicer shares."""

from __future__ import annotations

from datetime import UTC, datetime

from services.mesh.messages import timestamp


def test_timestamp_round_trips_and_leaves_no_time_unset() -> None:
    when = datetime(2026, 11, 29, 18, 45, 1, 123456, tzinfo=UTC)
    stamp = timestamp(when)
    assert stamp is not None and stamp.ToDatetime(tzinfo=UTC) == when
    assert timestamp(None) is None
