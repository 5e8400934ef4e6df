"""Where a job's artifacts live (checkpoints, event files, the export, result.json): the ArtifactStore Protocol
and a local-directory implementation; the service will implement it over the storage service."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

__all__ = ["ArtifactStore", "LocalArtifactStore"]


class ArtifactStore(Protocol):
    """Named blobs of one job. Names are relative POSIX paths ("checkpoints/step-00000040.pt").

    A put is atomic: a reader (or a runner restarted after SIGKILL) sees the old object or the new one, never part.
    """

    def put(self, name: str, data: bytes | BinaryIO) -> int:
        """Store bytes or a binary stream read to its end; returns the size stored."""
        ...

    def get(self, name: str) -> bytes:
        """The object's bytes; KeyError if absent."""
        ...

    def open(self, name: str) -> BinaryIO:
        """A binary stream of the object (the caller closes it); KeyError if absent."""
        ...

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def list(self, prefix: str = "") -> list[str]:
        """Names starting with prefix, sorted."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object if present."""
        ...


class LocalArtifactStore:
    """Artifacts as files under a directory (the job directory); names beginning with '.' are private scratch."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise ValueError(f"bad artifact name {name!r}")
        return self.root.joinpath(*pure.parts)

    def put(self, name: str, data: bytes | BinaryIO) -> int:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path.stat().st_size

    def get(self, name: str) -> bytes:
        path = self._path(name)
        if not path.is_file():
            raise KeyError(name)
        return path.read_bytes()

    def open(self, name: str) -> BinaryIO:
        path = self._path(name)
        if not path.is_file():
            raise KeyError(name)
        return path.open("rb")

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        path = self._path(name)
        if not path.is_file():
            raise KeyError(name)
        return path.stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._names() if n.startswith(prefix))

    def _names(self) -> Iterator[str]:
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                yield rel.as_posix()

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
