"""The platform's files are its user's alone: data directories 0700, files 0600 (keys, databases, exports, job
directories, base models, the live model repository Triton reads as the same user), and their SHA-256 digests.

``use_private_umask()`` at the start of every platform process (services, the supervisor, fine-tune runners) makes
everything the process and its children create private, whichever library creates it (SQLite, torch.save,
TensorBoard, Triton); the helpers below cover what a umask does not: directories that already exist, modes
carried in from elsewhere (tar members), and files that must be private from their first byte.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from pathlib import Path

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "PRIVATE_UMASK",
    "private_dir",
    "private_tar_member",
    "sha256_file",
    "use_private_umask",
    "write_private",
]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077
_READ_CHUNK = 1 << 20


def use_private_umask() -> None:
    """New files 0600 and directories 0700 in this process and the processes it starts."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """``path`` as a directory of mode 0700, missing parents too (``mkdir -p`` would give them the default mode);
    an existing one this user owns is made 0700 as well (data directories of earlier versions)."""
    missing = []
    parent = path
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Replaces ``path`` atomically with ``data``, mode 0600 from the first byte (its directory made private)."""
    private_dir(path.parent)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def private_tar_member(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
    """A tarfile extraction filter: the "data" filter's safety (no links out, no absolute or '..' paths, no
    devices), and private modes whatever the archive says."""
    safe = tarfile.data_filter(member, destination)
    if safe is None:
        return None
    return safe.replace(mode=PRIVATE_DIR_MODE if safe.isdir() else PRIVATE_FILE_MODE, deep=False)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
