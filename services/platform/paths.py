"""Paths of the platform's components that must stay short: a unix socket's path holds at most 107 bytes."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

__all__ = ["socket_path", "short_path"]

#: Unix socket paths longer than this don't fit in sockaddr_un (108 bytes with the terminator).
_MAX_SOCKET_PATH = 100


def socket_path(directory: Path, name: str) -> Path:
    """``directory``/``name``, or a short stand-in for it when that is too long for a unix socket."""
    path = directory / name
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    return short_path(directory, name)


def short_path(directory: Path, name: str) -> Path:
    """A short path in the system's temp directory standing for ``directory``/``name`` (one per directory)."""
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"aidc-{digest}-{name}"
