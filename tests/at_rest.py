"""What a service keeps at rest, read from its own files: whether a secret sits there in any of the forms it could."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path

__all__ = ["stored_bytes", "stored_in_clear"]


def stored_bytes(directory: Path) -> bytes:
    """Every byte the service keeps in ``directory`` (its database, with SQLite's write-ahead log), its master key
    file aside."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "master.key")


def _forms(secret: bytes) -> list[bytes]:
    """The ways a secret could sit in a file: as it is, hex, base64 (both alphabets)."""
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def stored_in_clear(directory: Path, secrets: Iterable[bytes]) -> bool:
    """Whether any of ``secrets`` is in ``directory``'s files as it is, in hex or in base64."""
    stored = stored_bytes(directory)
    return any(form in stored for secret in secrets for form in _forms(secret))
