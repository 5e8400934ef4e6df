"""The usage outbox: a local SQLite file holding usage events until the billing service acknowledged them.

An emitting service writes each event here first (one local transaction), so usage survives billing outages
and restarts of the emitter itself; a sender drains it in batches. An event leaves the outbox only when billing
answered ACCEPTED or DUPLICATE (its id de-duplicates resends), or moves to the dead-letter table when billing
REJECTED it, with the reason. This file is local to the emitting process by design, so it uses the stdlib
``sqlite3`` directly (WAL, synchronous=NORMAL: an emitter crash loses nothing; a power cut may lose the last
few milliseconds of events).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["UsageOutbox", "PendingEvent", "DeadLetter"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class PendingEvent:
    """One serialized aidc.billing.v1.UsageEvent waiting to be sent."""

    seq: int
    payload: bytes


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    payload: bytes
    reason: str


class UsageOutbox:
    """A durable FIFO of serialized usage events (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def add(self, payloads: Sequence[bytes]) -> None:
        """Appends events in one transaction: when this returns they survive a crash of this process."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO outbox(payload, enqueued_at) VALUES (?, ?)", [(p, now) for p in payloads]
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def peek(self, limit: int) -> list[PendingEvent]:
        """The oldest ``limit`` events (they stay until removed)."""
        with self._lock:
            rows = self._conn.execute("SELECT seq, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [PendingEvent(seq, payload) for seq, payload in rows]

    def settle(self, done: Sequence[int], dead: Sequence[DeadLetter] = ()) -> None:
        """Removes acknowledged events and moves rejected ones to the dead-letter table, in one transaction."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO dead_letter(seq, payload, reason, failed_at) VALUES (?, ?, ?, ?)",
                    [(d.seq, d.payload, d.reason, now) for d in dead],
                )
                gone = [(seq,) for seq in done] + [(d.seq,) for d in dead]
                self._conn.executemany("DELETE FROM outbox WHERE seq = ?", gone)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def pending(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def backlog(self) -> tuple[int, float | None, int]:
        """(events waiting, enqueue time of the oldest or None, dead letters): what the metrics report."""
        with self._lock:
            count, oldest = self._conn.execute("SELECT count(*), min(enqueued_at) FROM outbox").fetchone()
            dead = self._conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0]
        return int(count), oldest, int(dead)

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            rows = self._conn.execute("SELECT seq, payload, reason FROM dead_letter ORDER BY seq").fetchall()
        return [DeadLetter(seq, payload, reason) for seq, payload, reason in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
