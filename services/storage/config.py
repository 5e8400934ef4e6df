"""Settings of the storage service: the object store (S3 API), the master key of the local keyring, transfer
sizes, the clean-up of interrupted uploads and the metering interval."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import ObjectStoreSettings, check_master_key, load_settings, master_key, setting

__all__ = ["StorageSettings", "MIN_PART_SIZE"]

#: The smallest multipart part S3 accepts (except for the last part).
MIN_PART_SIZE = 5 * 1024 * 1024
_SSE_MODES = ("none", "s3")


@dataclass(frozen=True)
class StorageSettings(ObjectStoreSettings):
    """ObjectStoreSettings plus the bucket, the keyring's master key and the transfer limits."""

    storage_bucket: str = setting("aidc-storage", "Bucket holding every tenant's objects (created if missing).")
    storage_s3_sse: str = setting(
        "none", "Also ask the object store to encrypt at rest (defence in depth): 'none' or 's3' (SSE-S3)."
    )
    storage_master_key: str = setting(
        "", "Base64 of 32 bytes encrypting tenant keys at rest; empty: <data_dir>/storage/master.key (0600)."
    )
    storage_part_size_bytes: int = setting(
        8 * 1024 * 1024,
        "Multipart part size of uploads to the object store (at least 5 MiB; rounded up to whole 1 MiB segments).",
    )
    storage_parallel_parts: int = setting(
        3, "Parts of one upload sent to the object store at the same time (each holds a part in memory)."
    )
    storage_max_object_bytes: int = setting(1024**4, "Largest object accepted by Upload (plaintext bytes).")
    storage_max_concurrent_transfers: int = setting(
        16, "Uploads and downloads in progress at once; more wait (memory is bounded per transfer)."
    )
    storage_orphan_grace_seconds: float = setting(
        3600.0,
        "Age after which an upload left unfinished by a stopped instance is cleaned from the object store at start.",
    )
    storage_verify_uploads: bool = setting(
        False, "Read back and decrypt every upload before making it visible (doubles the cost of an upload)."
    )
    storage_metering_interval_seconds: float = setting(
        3600.0,
        "Seconds between the ticks that report every tenant's storage_gib_hours to billing (aligned to multiples "
        "of it since the epoch); uploads and deletes report the span they end as well.",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        return load_settings(cls, env)

    def validate(self) -> None:
        super().validate()
        if self.storage_s3_sse not in _SSE_MODES:
            raise ValueError(f"AIDC_STORAGE_S3_SSE must be one of {', '.join(_SSE_MODES)}, not {self.storage_s3_sse!r}")
        if not 3 <= len(self.storage_bucket) <= 63:
            raise ValueError("AIDC_STORAGE_BUCKET must be 3-63 characters")
        if self.storage_part_size_bytes < MIN_PART_SIZE:
            raise ValueError(f"AIDC_STORAGE_PART_SIZE_BYTES must be at least {MIN_PART_SIZE}")
        for name in (
            "storage_parallel_parts",
            "storage_max_object_bytes",
            "storage_max_concurrent_transfers",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"AIDC_{name.upper()} must be positive")
        if self.max_message_bytes < 4 * 1024 * 1024:
            raise ValueError("AIDC_MAX_MESSAGE_BYTES must be at least 4 MiB (Download sends messages of up to 3 MiB)")
        if self.storage_metering_interval_seconds <= 0:
            raise ValueError("AIDC_STORAGE_METERING_INTERVAL_SECONDS must be positive")
        if self.storage_orphan_grace_seconds < 0:
            raise ValueError("AIDC_STORAGE_ORPHAN_GRACE_SECONDS must not be negative")
        check_master_key(self.storage_master_key, "AIDC_STORAGE_MASTER_KEY")

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    def master_key(self) -> bytes:
        """The configured master key, or the one in <data_dir>/storage/master.key (created 0600 on first use)."""
        return master_key(self.storage_master_key, self.storage_dir / "master.key")
