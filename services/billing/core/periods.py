"""UTC time arithmetic on integer nanoseconds: hours, days and calendar months (billing periods)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = [
    "SECOND_NS",
    "HOUR_NS",
    "DAY_NS",
    "hour_of",
    "day_start",
    "month_start",
    "next_month",
    "month_label",
    "is_month_start",
    "to_datetime",
    "from_datetime",
]

SECOND_NS = 10**9
HOUR_NS = 3600 * SECOND_NS
DAY_NS = 24 * HOUR_NS
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_datetime(ns: int) -> datetime:
    """An aware UTC datetime (microsecond precision) for a time in nanoseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def from_datetime(value: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * SECOND_NS + delta.microseconds * 1000


def hour_of(ns: int) -> int:
    """Start of the UTC hour holding ``ns``."""
    return ns - ns % HOUR_NS


def day_start(ns: int) -> int:
    """Start of the UTC day holding ``ns``."""
    return ns - ns % DAY_NS


def month_start(ns: int) -> int:
    """Start of the calendar month (UTC) holding ``ns``."""
    moment = to_datetime(ns)
    return from_datetime(datetime(moment.year, moment.month, 1, tzinfo=UTC))


def next_month(start_ns: int) -> int:
    """Start of the calendar month after the one holding ``start_ns``."""
    moment = to_datetime(start_ns)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return from_datetime(datetime(year, month, 1, tzinfo=UTC))


def is_month_start(ns: int) -> bool:
    """Whether ``ns`` is the first instant of a calendar month (UTC)."""
    return month_start(ns) == ns


def month_label(start_ns: int) -> str:
    """ "2025-01" for a time in January 2025."""
    return to_datetime(start_ns).strftime("%Y-%m")
