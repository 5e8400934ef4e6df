"""The storage domain's records: datasets, stored object versions, tenant keys, unfinished uploads."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from services.storage.core.names import ObjectKind

__all__ = [
    "KeyState",
    "DatasetRecord",
    "TextDatasetRecord",
    "MaskingRecord",
    "VersionRecord",
    "PendingUpload",
    "TenantKeyRecord",
    "PseudonymKeyRecord",
]


class KeyState(enum.Enum):
    """A tenant key's life: wraps new data keys (active), only opens old ones until re-wrapped (retired), gone."""

    ACTIVE = "active"
    RETIRED = "retired"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class DatasetRecord:
    tenant: str
    name: str
    description: str
    created_at: datetime
    created_by: str
    latest_version: int = 0


@dataclass(frozen=True)
class TextDatasetRecord:
    """What the training service reads about a validated text dataset."""

    format: str
    text_column: str
    label_column: str
    row_count: int
    labels: dict[str, int]


@dataclass(frozen=True)
class MaskingRecord:
    """How much personal data was masked on upload, per kind name (EMAIL, PHONE, ID_NUMBER, BANK_CARD), and how:
    the mode's value (placeholder, pseudonymize), the phone regions and the pseudonym key's id. Versions recorded
    before modes and regions existed read as placeholder masking without regions."""

    masked_total: int
    rows_affected: int
    counts: dict[str, int]
    mode: str = "placeholder"
    phone_regions: list[str] = field(default_factory=list)
    pseudonym_key_id: str = ""


@dataclass(frozen=True)
class VersionRecord:
    """One stored, visible, immutable version of an object."""

    object_id: str
    tenant: str
    kind: ObjectKind
    name: str
    version: int
    s3_key: str
    size_bytes: int
    stored_bytes: int
    sha256: str
    content_type: str
    created_at: datetime
    created_by: str
    format: str
    key_id: str
    wrapped_key: bytes
    text: TextDatasetRecord | None = None
    masking: MaskingRecord | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    key_state: KeyState = KeyState.ACTIVE


@dataclass(frozen=True)
class PendingUpload:
    """An upload whose bytes may be (partly) in the object store but which is not visible yet."""

    object_id: str
    tenant: str
    s3_key: str
    instance_id: str
    started_at: datetime


@dataclass(frozen=True)
class TenantKeyRecord:
    key_id: str
    tenant: str
    state: KeyState
    created_at: datetime


@dataclass(frozen=True)
class PseudonymKeyRecord:
    """A tenant's pseudonym key (the HMAC key of masking's tokens), wrapped by the tenant key ``key_id``."""

    tenant: str
    pseudonym_key_id: str
    key_id: str
    wrapped: bytes
    created_at: datetime
