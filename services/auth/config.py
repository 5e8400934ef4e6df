"""Settings of the auth service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import MeshSettings, check_master_key, load_settings, master_key, setting

__all__ = ["AuthSettings"]


@dataclass(frozen=True)
class AuthSettings(MeshSettings):
    """MeshSettings plus token lifetimes and the key that protects signing keys at rest."""

    auth_access_token_ttl_seconds: int = setting(900, "Lifetime of access tokens (JWT).")
    auth_refresh_token_ttl_seconds: int = setting(7 * 24 * 3600, "Lifetime of refresh tokens.")
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
        if self.auth_access_token_ttl_seconds <= 0 or self.auth_refresh_token_ttl_seconds <= 0:
            raise ValueError("token lifetimes must be positive")
        check_master_key(self.auth_master_key, "AIDC_AUTH_MASTER_KEY")

    @property
    def auth_dir(self) -> Path:
        return self.data_dir / "auth"

    @property
    def bootstrap_file(self) -> Path:
        return self.auth_dir / "bootstrap-admin.json"

    def master_key(self) -> bytes:
        """The configured master key, or the one in <data_dir>/auth/master.key (created 0600 on first use)."""
        return master_key(self.auth_master_key, self.auth_dir / "master.key")
