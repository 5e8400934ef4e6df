"""Settings of the auth service."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import MeshSettings, load_settings, setting

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
        if self.auth_master_key:
            try:
                key = base64.b64decode(self.auth_master_key, validate=True)
            except ValueError:
                raise ValueError("AIDC_AUTH_MASTER_KEY is not valid base64") from None
            if len(key) != 32:
                raise ValueError("AIDC_AUTH_MASTER_KEY must decode to 32 bytes")

    @property
    def auth_dir(self) -> Path:
        return self.data_dir / "auth"

    @property
    def bootstrap_file(self) -> Path:
        return self.auth_dir / "bootstrap-admin.json"

    def master_key(self) -> bytes:
        """The configured master key, or the one in <data_dir>/auth/master.key (created 0600 on first use)."""
        if self.auth_master_key:
            return base64.b64decode(self.auth_master_key)
        path = self.auth_dir / "master.key"
        if not path.exists():
            self.auth_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path} must hold exactly 32 bytes")
        return key
