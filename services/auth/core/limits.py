"""Limits on password and API-key checks: each costs an Argon2id hash, and guessing must not be cheap.

Two things are limited, each per client address ("source") and per account (a user, or an API key id):

- attempts: a token bucket per source bounds how many hashes one address can make the service compute;
- failures: after a few free failures, every further failure blocks the source or the account for a time that
  doubles with each failure (up to a maximum); a success clears the account's streak (not the source's, so one
  valid account cannot launder a guessing source), and a streak is forgotten after a quiet hour.

A blocked attempt is refused before any hash is computed, with QuotaExceeded (RESOURCE_EXHAUSTED) and the seconds
until it may be tried again. Memory is bounded: at most ``max_keys`` sources and accounts are remembered.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.mesh.errors import QuotaExceeded
from services.mesh.ratelimit import TokenBuckets

__all__ = ["LoginLimits", "LoginThrottle", "Block"]


@dataclass(frozen=True)
class LoginLimits:
    """The thresholds (defaults: far above what a person or a well-behaved client ever does)."""

    attempts_per_second: float = 2.0
    attempt_burst: int = 20
    account_free_failures: int = 5
    source_free_failures: int = 20
    first_block_seconds: float = 1.0
    max_block_seconds: float = 900.0
    forget_after_seconds: float = 3600.0


@dataclass(frozen=True)
class Block:
    """A block that a failure has just started: on what ("source" or "account") and for how long."""

    on: str
    key: str
    seconds: float


@dataclass
class _Streak:
    failures: int = 0
    last_failure: float = 0.0
    blocked_until: float = 0.0


class _Streaks:
    """Failure streaks by key, least recently failed first out."""

    def __init__(self, free: int, limits: LoginLimits, max_keys: int) -> None:
        self._free = free
        self._limits = limits
        self._max_keys = max_keys
        self._streaks: OrderedDict[str, _Streak] = OrderedDict()

    def blocked_for(self, key: str, now: float) -> float:
        streak = self._streaks.get(key)
        return max(streak.blocked_until - now, 0.0) if streak is not None else 0.0

    def fail(self, key: str, now: float) -> float:
        """Counts a failure; the seconds of the block it starts (0.0: none)."""
        streak = self._streaks.pop(key, None) or _Streak()
        self._streaks[key] = streak
        if len(self._streaks) > self._max_keys:
            self._streaks.popitem(last=False)
        if now - streak.last_failure > self._limits.forget_after_seconds:
            streak.failures = 0
        streak.failures += 1
        streak.last_failure = now
        excess = streak.failures - self._free
        if excess <= 0:
            return 0.0
        seconds = min(self._limits.first_block_seconds * 2 ** min(excess - 1, 30), self._limits.max_block_seconds)
        streak.blocked_until = now + seconds
        return seconds

    def clear(self, key: str) -> None:
        self._streaks.pop(key, None)


class LoginThrottle:
    """Decides whether a password or API-key check may run now (see the module docstring)."""

    def __init__(
        self,
        limits: LoginLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.limits = limits or LoginLimits()
        self._clock = clock
        self._attempts = TokenBuckets(self.limits.attempts_per_second, self.limits.attempt_burst, clock, max_keys)
        self._sources = _Streaks(self.limits.source_free_failures, self.limits, max_keys)
        self._accounts = _Streaks(self.limits.account_free_failures, self.limits, max_keys)

    def admit(self, source: str, account: str) -> None:
        """Returns when the check may run; QuotaExceeded with a retry hint when the source or the account is
        blocked, or the source has made too many attempts."""
        now = self._clock()
        for streaks, what in ((self._sources, "this address"), (self._accounts, "this account")):
            wait = streaks.blocked_for(account if streaks is self._accounts else source, now)
            if wait:
                raise QuotaExceeded(
                    f"too many failed attempts from {what}; retry in {wait:.0f}s", retry_after_seconds=wait
                )
        wait = self._attempts.take(source)
        if wait:
            raise QuotaExceeded(
                f"too many attempts from this address (more than {self._attempts.rate:g}/s); retry in {wait:.1f}s",
                retry_after_seconds=wait,
            )

    def failed(self, source: str, account: str) -> list[Block]:
        """Counts a failed check; the blocks it starts (for the audit log: one event per block, not per attempt)."""
        now = self._clock()
        blocks = []
        for streaks, on, key in ((self._sources, "source", source), (self._accounts, "account", account)):
            seconds = streaks.fail(key, now)
            if seconds:
                blocks.append(Block(on, key, seconds))
        return blocks

    def succeeded(self, account: str) -> None:
        """A successful check clears the account's streak."""
        self._accounts.clear(account)
