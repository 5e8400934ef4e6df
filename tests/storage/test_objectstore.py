"""Reading stored objects from the real S3 server: straight into the caller's buffer, and a cut connection told
apart from a short object."""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import pytest

from services.mesh.errors import Unavailable
from services.storage.config import StorageSettings
from services.storage.objectstore import S3ObjectStore
from tests.storage.conftest import storage_env
from tests.storage.seaweed import SeaweedFS

MiB = 1024 * 1024


def _store(s3: SeaweedFS, tmp_path: Path) -> S3ObjectStore:
    objects = S3ObjectStore(StorageSettings.from_env(storage_env(tmp_path / "data", "127.0.0.1:1", s3)))
    objects.ensure_bucket()
    return objects


def test_a_read_fills_the_callers_buffer_from_the_socket_and_is_short_only_at_the_end(
    seaweed: SeaweedFS, tmp_path: Path
) -> None:
    objects = _store(seaweed, tmp_path)
    content = os.urandom(3 * MiB + 100)
    objects.put("object", content, "application/octet-stream")
    source = objects.open("object")
    try:
        # The standard library's response reads into the buffer itself; falling back to urllib3's copying read (a
        # urllib3 change) would go unnoticed but for the speed.
        assert isinstance(source._body, http.client.HTTPResponse)
        head = source.read_exact(100)
        first = memoryview(bytearray(2 * MiB))
        assert source.readinto_exact(first) == 2 * MiB
        rest = memoryview(bytearray(2 * MiB))
        assert source.readinto_exact(rest) == MiB
        assert source.read_exact(1) == b""
    finally:
        source.close()
    assert head + bytes(first) + bytes(rest[:MiB]) == content
    ranged = objects.open("object", 2 * MiB, MiB)
    try:
        assert ranged.read_exact(2 * MiB) == content[2 * MiB : 3 * MiB]
    finally:
        ranged.close()


def test_a_connection_cut_mid_object_is_unavailable_not_a_short_object(tmp_path: Path) -> None:
    s3 = SeaweedFS(tmp_path / "s3")
    s3.start()
    try:
        objects = _store(s3, tmp_path)
        objects.put("object", os.urandom(64 * MiB), "application/octet-stream")
        source = objects.open("object")
        buffer = memoryview(bytearray(MiB))
        assert source.readinto_exact(buffer) == MiB
        assert s3.process is not None
        s3.process.kill()  # what it had sent arrives, then the connection ends long before the object does
        s3.process.wait()
        with pytest.raises(Unavailable, match="failed mid-transfer"):
            while source.readinto_exact(buffer) == MiB:
                pass
        assert source.error is not None
        source.close()
    finally:
        s3.stop()
