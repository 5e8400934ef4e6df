"""Failures around the service: killed mid-upload, and the object store going away and coming back."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.mesh import errors
from services.storage.config import StorageSettings
from tests.conftest import AuthProcess, RunningAuth, stop_process
from tests.storage.conftest import (
    RunningStorage,
    process_client,
    start_storage,
    start_storage_process,
    storage_env,
)
from tests.storage.seaweed import SeaweedFS

MiB = 1024 * 1024


def _incomplete_uploads(settings: StorageSettings, prefix: str) -> int:
    from services.storage.objectstore import S3ObjectStore

    objects = S3ObjectStore(settings)
    return len(objects.client._list_multipart_uploads(objects.bucket, prefix=prefix).uploads)


@pytest.mark.slow
async def test_killing_the_service_mid_upload_leaves_no_visible_version(
    auth_process: AuthProcess, seaweed: SeaweedFS, tmp_path: Path
) -> None:
    first = start_storage_process(auth_process, seaweed, tmp_path)
    client, tenant = await process_client(first, "acme", "dev")
    await client.create_dataset(tenant, "interrupted")
    await client.upload(tenant, "interrupted", b"version one")
    sent = 0
    killed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        block = os.urandom(MiB)
        while True:
            yield block
            sent += len(block)
            if sent >= 40 * MiB and not killed.is_set():
                # Several multipart parts are in the object store by now; the process dies without a word.
                first.process.send_signal(signal.SIGKILL)
                first.process.wait()
                killed.set()
            await asyncio.sleep(0)

    with pytest.raises((errors.Unavailable, errors.AidcError)):
        await client.upload(tenant, "interrupted", endless())
    await client.close()
    assert killed.is_set()
    prefix = f"tenants/{tenant}/datasets/interrupted/"
    settings = first.settings
    assert len(list(_keys(settings, prefix))) == 1  # only version one's object
    assert _incomplete_uploads(settings, prefix) == 1  # the killed upload's parts

    # Restarted on the same database and bucket: still only version one, and the orphaned parts are gone.
    second = start_storage_process(auth_process, seaweed, tmp_path, **_same_place(first.env))
    try:
        client, _ = await process_client(second, "acme", "dev")
        listed = await client.list_all(tenant, all_versions=True)
        assert [(o.name, o.version) for o in listed] == [("interrupted", 1)]
        with pytest.raises(errors.NotFound):
            await client.stat(tenant, "interrupted", version=2)
        assert await client.download_bytes(tenant, "interrupted") == b"version one"
        assert _incomplete_uploads(settings, prefix) == 0
        assert len(list(_keys(settings, prefix))) == 1
        info = await client.upload(tenant, "interrupted", b"version two")
        assert info.version == 2
        await client.close()
    finally:
        stop_process(second.process)


async def _wait_readable(storage: RunningStorage, key: str, timeout: float = 30.0) -> None:
    objects = storage.objects
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            response = objects.client.get_object(objects.bucket, key)
            response.read()
            response.release_conn()
            return
        except Exception:  # noqa: BLE001 - not back yet
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def _keys(settings: StorageSettings, prefix: str) -> list[str]:
    from services.storage.objectstore import S3ObjectStore

    return list(S3ObjectStore(settings).keys(prefix))


def _same_place(env: dict[str, str]) -> dict[str, str]:
    return {k: env[k] for k in ("AIDC_STORAGE_BUCKET", "AIDC_STORAGE_ADDR")}


async def test_object_store_down_is_unavailable_and_calls_recover_when_it_is_back(
    auth: RunningAuth, tokens: dict[str, str], tmp_path: Path
) -> None:
    s3 = SeaweedFS(tmp_path / "s3")
    s3.start()
    settings = StorageSettings.from_env(storage_env(tmp_path / "data", auth.address, s3))
    storage = await start_storage(settings, tokens)
    try:
        client = storage.client("acme/dev")
        await client.create_dataset("acme", "weather")
        await client.upload("acme", "weather", b"sunny" * 1000)

        s3.stop()
        with pytest.raises(errors.Unavailable, match="object store at 127.0.0.1:"):
            await client.download_bytes("acme", "weather")
        with pytest.raises(errors.Unavailable, match="object store"):
            await client.upload("acme", "weather", os.urandom(3 * MiB))
        # Metadata still answers; nothing half-written became visible.
        assert [o.version for o in await client.list_all("acme", all_versions=True)] == [1]

        s3.start()  # same directory and ports; the service is not restarted
        # SeaweedFS answers 500 to object reads for a moment after a restart (its volume server rejoins): the
        # store is "back" once a raw read of the object works; from then on the service's calls work too.
        await _wait_readable(storage, storage.raw_keys()[0])
        assert await client.download_bytes("acme", "weather") == b"sunny" * 1000
        info = await client.upload("acme", "weather", b"rainy")
        assert info.version == 2
        assert await client.download_bytes("acme", "weather") == b"rainy"
    finally:
        await storage.close()
        await storage.server.stop(0)
        s3.stop()
