"""Settings of the auth service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.auth.client import bootstrap_admin_file
from services.mesh.config import MeshSettings, check_master_key, load_settings, master_key, setting
from services.mesh.peers import parse_proxies

__all__ = ["AuthSettings"]


@dataclass(frozen=True)
class AuthSettings(MeshSettings):
    """MeshSettings plus token lifetimes, login limits and the key that protects signing keys at rest."""

    auth_access_token_ttl_seconds: int = setting(
        900,
        "Lifetime of access tokens (JWT); a retired signing key stays published this long plus 10 s after its "
        "retirement.",
    )
    auth_refresh_token_ttl_seconds: int = setting(
        7 * 24 * 3600, "Lifetime of a refresh token (each refresh issues a new one): a login unused this long ends."
    )
    auth_login_max_age_seconds: int = setting(
        30 * 24 * 3600,
        "Absolute lifetime of a login: its refresh tokens stop working this long after the password was given, "
        "however often they were rotated.",
    )
    auth_delegation_ttl_seconds: int = setting(
        30 * 24 * 3600,
        "Longest lifetime of a job delegation (how long a training job may act for its submitter; revoked earlier "
        "when the job ends).",
    )
    auth_login_rate_per_second: float = setting(
        2.0,
        "Password and API-key checks each client address may make per second, on average (token bucket). Counted "
        "per replica: with N auth replicas an address spreading its calls gets up to N times this (and the failure "
        "limits below likewise); divide by N to keep the total.",
    )
    auth_login_burst: int = setting(20, "Password and API-key checks a client address may make at once.")
    auth_sync_seconds: float = setting(
        1.0,
        "How often each auth replica reloads what other replicas changed in the shared database (roles and policy, "
        "signing keys, revocations): a change made through one replica applies in the others within this.",
    )
    auth_login_account_free_failures: int = setting(
        5,
        "Failed checks of one account (a user, an API key) before each further failure blocks it, for "
        "AIDC_AUTH_LOGIN_FIRST_BLOCK_SECONDS doubling with every further failure.",
    )
    auth_login_source_free_failures: int = setting(
        20, "Failed checks from one client address before each further failure blocks the address likewise."
    )
    auth_login_first_block_seconds: float = setting(1.0, "The first block after the free failures.")
    auth_login_max_block_seconds: float = setting(900.0, "Longest block after repeated failed checks.")
    auth_trusted_proxies: str = setting(
        "",
        "Comma-separated addresses or CIDR networks of proxies in front of auth (the tenant-path gateway): for "
        "calls from them the login limits key on the client address they append to x-forwarded-for.",
    )
    auth_master_key: str = setting(
        "", "Base64 of 32 bytes encrypting the token-signing keys at rest; empty: <data_dir>/auth/master.key."
    )
    auth_argon2_time_cost: int = setting(2, "Argon2id time cost for password and API-key hashes.")
    auth_argon2_memory_kib: int = setting(19 * 1024, "Argon2id memory cost in KiB.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuthSettings:
        return load_settings(cls, env)

    def validate(self) -> None:
        super().validate()
        lifetimes = (
            self.auth_access_token_ttl_seconds,
            self.auth_refresh_token_ttl_seconds,
            self.auth_login_max_age_seconds,
            self.auth_delegation_ttl_seconds,
        )
        if min(lifetimes) <= 0:
            raise ValueError("token, login and delegation lifetimes must be positive")
        if self.auth_sync_seconds <= 0:
            raise ValueError("AIDC_AUTH_SYNC_SECONDS must be positive")
        if self.auth_login_rate_per_second < 0 or self.auth_login_burst < 1:
            raise ValueError("AIDC_AUTH_LOGIN_RATE_PER_SECOND must be >= 0 and AIDC_AUTH_LOGIN_BURST >= 1")
        if min(self.auth_login_account_free_failures, self.auth_login_source_free_failures) < 1:
            raise ValueError("the free failures of AIDC_AUTH_LOGIN_*_FREE_FAILURES must be at least 1")
        if not 0 < self.auth_login_first_block_seconds <= self.auth_login_max_block_seconds:
            raise ValueError("AIDC_AUTH_LOGIN_FIRST_BLOCK_SECONDS must be > 0 and <= AIDC_AUTH_LOGIN_MAX_BLOCK_SECONDS")
        self.trusted_proxies()
        check_master_key(self.auth_master_key, "AIDC_AUTH_MASTER_KEY")

    def trusted_proxies(self) -> list[Any]:
        """AIDC_AUTH_TRUSTED_PROXIES as networks."""
        try:
            return parse_proxies(self.auth_trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"AIDC_AUTH_TRUSTED_PROXIES: {exc}") from None

    @property
    def auth_dir(self) -> Path:
        return self.data_dir / "auth"

    @property
    def bootstrap_file(self) -> Path:
        return bootstrap_admin_file(self.data_dir)

    def master_key(self) -> bytes:
        """The configured master key, or the one in <data_dir>/auth/master.key (created 0600 on first use)."""
        return master_key(self.auth_master_key, self.auth_dir / "master.key")
