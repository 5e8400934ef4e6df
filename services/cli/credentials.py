"""The CLI's stored login: a token pair in a 0600 file, refreshed (and written back) before it expires."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.mesh.config import Setting
from services.mesh.errors import Unauthenticated

__all__ = [
    "CLI_SETTINGS",
    "CREDENTIALS_ENV",
    "REFRESH_MARGIN_SECONDS",
    "Credentials",
    "CredentialsStore",
    "credentials_path",
    "replace_one_time_password",
]

#: Overrides where the credentials file lives.
CREDENTIALS_ENV = "AIDC_CREDENTIALS_FILE"

#: The variables only the CLI reads (listed by ``aidc config``).
CLI_SETTINGS: tuple[Setting, ...] = (
    Setting(
        CREDENTIALS_ENV,
        "",
        "Where `aidc login` keeps its tokens; empty means <data_dir>/cli/credentials.json.",
    ),
)

#: An access token this close to its expiry is refreshed before use, so it can't expire in flight.
REFRESH_MARGIN_SECONDS = 30.0

_RELOGIN = "run `aidc login`"


def credentials_path(data_dir: Path, env: Mapping[str, str] | None = None) -> Path:
    """``$AIDC_CREDENTIALS_FILE``, or ``<data_dir>/cli/credentials.json``."""
    env = os.environ if env is None else env
    override = env.get(CREDENTIALS_ENV, "").strip()
    return Path(override) if override else data_dir / "cli" / "credentials.json"


@dataclass(frozen=True)
class Credentials:
    """One login: where it was made, its tokens, and when they expire (epoch seconds; 0 = unknown)."""

    auth_addr: str
    access_token: str
    access_expires_at: float
    refresh_token: str = ""
    refresh_expires_at: float = 0.0
    subject: str = ""
    tenant: str = ""

    @classmethod
    def from_token_pair(cls, auth_addr: str, tokens: pb.TokenPair, subject: str = "", tenant: str = "") -> Credentials:
        return cls(
            auth_addr=auth_addr,
            access_token=tokens.access_token,
            access_expires_at=_epoch(tokens, "access_token_expire_time"),
            refresh_token=tokens.refresh_token,
            refresh_expires_at=_epoch(tokens, "refresh_token_expire_time"),
            subject=subject,
            tenant=tenant,
        )

    def needs_refresh(self, now: float, margin: float = REFRESH_MARGIN_SECONDS) -> bool:
        """True when the access token has expired or will within ``margin`` seconds."""
        return self.access_expires_at - margin <= now

    def can_refresh(self, now: float) -> bool:
        """True when there is a refresh token (API-key logins have none) that has not expired."""
        return bool(self.refresh_token) and (self.refresh_expires_at == 0 or self.refresh_expires_at > now)


def _epoch(tokens: pb.TokenPair, field: str) -> float:
    if not tokens.HasField(field):  # type: ignore[arg-type]
        return 0.0
    stamp = getattr(tokens, field)
    return float(stamp.seconds) + stamp.nanos / 1e9


class CredentialsStore:
    """Loads, saves and refreshes the credentials file; concurrent CLI runs refresh under a file lock, so a
    refresh token is never spent twice (which the auth service would treat as theft and revoke the login)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock

    def load(self) -> Credentials | None:
        """The stored credentials, or None when there is no file."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data: Any = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return Credentials(**data)
        except (ValueError, TypeError) as exc:
            raise Unauthenticated(f"credentials file {self.path} is unreadable ({exc}): {_RELOGIN}") from None

    def save(self, credentials: Credentials) -> None:
        """Writes the file atomically with mode 0600 (its folder 0700 when created here)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(credentials), f, indent=2)
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def delete(self) -> bool:
        """Removes the file; False when there was none."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    async def access_token(self, auth_addr: str, refresh: Callable[[str], Awaitable[pb.TokenPair]]) -> str:
        """A valid access token for ``auth_addr``, refreshed through ``refresh`` (the RefreshToken RPC)
        when it is expired or about to expire; the rotated pair is written back."""
        credentials = self._require(auth_addr)
        if not credentials.needs_refresh(self._clock()):
            return credentials.access_token
        with self._locked():
            # Another aidc process may have refreshed while this one waited for the lock.
            credentials = self._require(auth_addr)
            now = self._clock()
            if not credentials.needs_refresh(now):
                return credentials.access_token
            if not credentials.can_refresh(now):
                if credentials.access_expires_at > now:
                    return credentials.access_token  # still valid for a moment; nothing to refresh it with
                raise Unauthenticated(f"the login has expired: {_RELOGIN}")
            try:
                tokens = await refresh(credentials.refresh_token)
            except Unauthenticated as exc:
                raise Unauthenticated(f"{exc.message}: {_RELOGIN}") from None
            refreshed = Credentials.from_token_pair(auth_addr, tokens)
            self.save(replace(refreshed, subject=credentials.subject, tenant=credentials.tenant))
            return refreshed.access_token

    def _require(self, auth_addr: str) -> Credentials:
        credentials = self.load()
        if credentials is None:
            raise Unauthenticated(f"not logged in: {_RELOGIN}")
        if credentials.auth_addr != auth_addr:
            raise Unauthenticated(f"logged in to {credentials.auth_addr}, not {auth_addr}: {_RELOGIN}")
        return credentials

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(f"{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


async def replace_one_time_password(
    login: Callable[..., Awaitable[pb.TokenPair]], tenant: str, user: str, one_time: str
) -> tuple[pb.TokenPair, str]:
    """The first login of the first-start admin, which must set a new password (the one-time password auth wrote to
    disk expires at first use): sets a fresh random one. (tokens, the new password) — show it to the operator once,
    it is stored nowhere. ``login`` is AuthClient.login."""
    password = secrets.token_urlsafe(18)
    return await login(tenant, user, one_time, new_password=password), password
