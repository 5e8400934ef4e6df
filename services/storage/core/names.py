"""Validation of tenant and object names, and the object-store keys they map to (always under the tenant's
prefix: a name can never climb out of it)."""

from __future__ import annotations

import enum
import re

from services.mesh.errors import InvalidArgument

__all__ = ["ObjectKind", "MAX_NAME_BYTES", "validate_tenant", "validate_object_name", "object_key", "tenant_prefix"]

#: Longest object name, in UTF-8 bytes.
MAX_NAME_BYTES = 512
_MAX_SEGMENT_BYTES = 128
_TENANT = re.compile(r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ObjectKind(enum.Enum):
    """What an object is; the value is its folder in the tenant's prefix."""

    DATASET = "datasets"
    ARTIFACT = "artifacts"


def validate_tenant(tenant: str) -> str:
    """The tenant name, or InvalidArgument (the same rule as the auth service's, plus "platform")."""
    if not _TENANT.match(tenant):
        raise InvalidArgument(
            "tenant must be 3-40 characters of lowercase letters, digits and '-', starting with a letter"
        )
    return tenant


def validate_object_name(name: str, kind: ObjectKind) -> str:
    """An object name: '/'-separated segments of letters, digits, '.', '_' and '-'; datasets one segment only.

    Rejects (InvalidArgument) empty names, absolute paths, '.' and '..' segments, empty segments, control
    characters, backslashes and anything longer than MAX_NAME_BYTES.
    """
    what = "dataset name" if kind is ObjectKind.DATASET else "artifact name"
    if not name:
        raise InvalidArgument(f"{what} is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(name):
        raise InvalidArgument(f"{what} contains control characters")
    if name.startswith("/"):
        raise InvalidArgument(f"{what} must be relative, not start with '/'")
    if "\\" in name:
        raise InvalidArgument(f"{what} must use '/' as separator, not '\\'")
    segments = name.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise InvalidArgument(f"{what} has an empty, '.' or '..' segment")
    if kind is ObjectKind.DATASET and len(segments) > 1:
        raise InvalidArgument("dataset name must be a single segment (no '/')")
    for segment in segments:
        if len(segment) > _MAX_SEGMENT_BYTES:
            raise InvalidArgument(f"{what} has a segment longer than {_MAX_SEGMENT_BYTES} bytes")
        if not _SEGMENT.match(segment):
            raise InvalidArgument(f"{what} may only contain letters, digits, '.', '_', '-' and '/' between segments")
    return name


def tenant_prefix(tenant: str) -> str:
    """Every object of ``tenant`` lives under this key prefix."""
    return f"tenants/{validate_tenant(tenant)}/"


def object_key(tenant: str, kind: ObjectKind, name: str, object_id: str) -> str:
    """The object-store key of one stored version: ``tenants/<tenant>/<kind>/<name>/<object_id>``.

    ``object_id`` is a fresh random hex id per upload, so a retried or concurrent upload never overwrites
    another's bytes, and the last segment always tells versions apart from names.
    """
    if not re.fullmatch(r"[0-9a-f]{32}", object_id):
        raise ValueError("object ids are 32 lowercase hex digits")
    return f"{tenant_prefix(tenant)}{kind.value}/{validate_object_name(name, kind)}/{object_id}"
