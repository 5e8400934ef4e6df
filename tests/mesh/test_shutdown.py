"""SIGTERM drains a real service process (storage, as `aidc up` and Kubernetes stop it): an upload in flight when
the signal arrives finishes and is stored, calls made after it are refused, and the process exits cleanly; an RPC
still running when the grace period ends is cut off and the process exits all the same."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh.db import open_database
from services.mesh.errors import AidcError, Unavailable
from services.storage.client import StorageClient
from services.storage.store import StorageStore
from tests.conftest import AuthProcess, auth_process, stop_process  # noqa: F401 - fixture
from tests.storage.conftest import StorageProcess, process_client, seaweed, start_storage_process  # noqa: F401
from tests.storage.seaweed import SeaweedFS

pytestmark = pytest.mark.slow

CHUNK = b"\x5a" * (256 * 1024)


async def _refused(client: StorageClient, tenant: str, timeout: float = 60.0) -> None:
    """Waits until the service refuses new calls: it has received the signal and is draining. Refused with any status
    (UNAVAILABLE mostly; a draining server on a loaded machine may answer otherwise): an exception here would end the
    upload's request stream, and grpc would cancel the upload itself."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await client.list_all(tenant)
        except AidcError:
            return
        assert asyncio.get_running_loop().time() < deadline, f"new calls still served after {timeout}s"
        await asyncio.sleep(0.05)


async def _upload_begun(storage: StorageProcess, timeout: float = 60.0) -> None:
    """Waits until the service is storing the upload (its pending record is written): only then is the call in
    flight on the server. A signal sent as soon as the first chunk left the client could reach the process before
    the call did, and a stopping server refuses a call it has not begun (a fresh-clone run saw exactly that)."""
    store = StorageStore(open_database(storage.settings.database_url_for("storage")))
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await asyncio.to_thread(store.stale_pending, "the test", datetime.now(UTC) + timedelta(days=1)):
            assert asyncio.get_running_loop().time() < deadline, f"the upload not begun after {timeout}s"
            await asyncio.sleep(0.02)
    finally:
        store.db.dispose()


async def _exit_code(process: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    return await asyncio.to_thread(process.wait, timeout)


async def test_sigterm_lets_an_upload_in_flight_finish_and_refuses_new_calls(
    auth_process: AuthProcess,  # noqa: F811
    seaweed: SeaweedFS,  # noqa: F811
    tmp_path: Path,
) -> None:
    # A grace period far longer than the drain needs, so a loaded machine finishes within it.
    storage = start_storage_process(auth_process, seaweed, tmp_path, AIDC_SHUTDOWN_GRACE_SECONDS="60")
    try:
        client, tenant = await process_client(storage, "acme", "dev")
        other, _ = await process_client(storage, "acme", "dev")  # its own connection: refused once draining
        signalled = asyncio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            yield CHUNK
            await _upload_begun(storage)
            storage.process.send_signal(signal.SIGTERM)
            await _refused(other, tenant)
            signalled.set()
            for _ in range(3):
                yield CHUNK

        info = await client.upload(tenant, "drained.bin", chunks(), kind=pb.OBJECT_KIND_ARTIFACT)
        assert signalled.is_set() and (info.version, info.size_bytes) == (1, 4 * len(CHUNK))
        assert await _exit_code(storage.process) == 0
        await client.close()
        await other.close()
    finally:
        stop_process(storage.process)

    # What was drained is stored: a new process serves it whole.
    again = start_storage_process(auth_process, seaweed, tmp_path, **_same_place(storage.env))
    try:
        client, tenant = await process_client(again, "acme", "dev")
        data = await client.download_bytes(tenant, "drained.bin", kind=pb.OBJECT_KIND_ARTIFACT)
        assert data == CHUNK * 4
        await client.close()
    finally:
        stop_process(again.process)


async def test_an_rpc_outlasting_the_grace_period_is_cut_off_and_the_process_exits(
    auth_process: AuthProcess,  # noqa: F811
    seaweed: SeaweedFS,  # noqa: F811
    tmp_path: Path,
) -> None:
    storage = start_storage_process(auth_process, seaweed, tmp_path, AIDC_SHUTDOWN_GRACE_SECONDS="1")
    try:
        client, tenant = await process_client(storage, "acme", "dev")

        async def chunks() -> AsyncIterator[bytes]:
            yield CHUNK
            await _upload_begun(storage)
            storage.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(3600)  # a client that never finishes its upload
            yield CHUNK

        # gRPC ends a call cut off at shutdown with UNAVAILABLE or, depending on which the client learns first (the
        # stream's reset or the connection's end), CANCELLED (grpc/grpc#41785); the client raises both as Unavailable.
        with pytest.raises(Unavailable):
            await asyncio.wait_for(client.upload(tenant, "cut.bin", chunks(), kind=pb.OBJECT_KIND_ARTIFACT), 120)
        assert await _exit_code(storage.process) == 0
        await client.close()
    finally:
        stop_process(storage.process)


def _same_place(env: dict[str, str]) -> dict[str, str]:
    """The settings that make a new storage process the same service: its bucket and address."""
    return {k: env[k] for k in ("AIDC_STORAGE_BUCKET", "AIDC_STORAGE_ADDR")}
