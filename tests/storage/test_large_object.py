"""A 1 GiB object streamed through a storage service running as its own process, in bounded memory."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.storage.conftest import StorageProcess, process_client

MiB = 1024 * 1024
GiB = 1024 * MiB


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class _RssSampler:
    """Samples a process's resident set size every few milliseconds on a thread, keeping the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._pid = pid
        self._interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes(self._pid))
            self.samples += 1
            time.sleep(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _blocks(total: int, digest: hashlib._Hash) -> Iterator[bytes]:
    """``total`` bytes of varied content in 1 MiB blocks, hashed as they are produced."""
    seed = hashlib.sha256(b"aidc").digest() * (MiB // 32)
    for i in range(total // MiB):
        block = i.to_bytes(8, "big") + seed[8:]
        digest.update(block)
        yield block


async def _agen(blocks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for block in blocks:
        yield block


@pytest.mark.slow
async def test_one_gib_round_trip_in_bounded_memory(storage_process: StorageProcess) -> None:
    client, token_tenant = await process_client(storage_process, "acme", "dev")
    await client.create_dataset(token_tenant, "big")
    await client.upload(token_tenant, "big", b"warm-up" * 1000)  # loads every code path before the baseline
    pid = storage_process.process.pid
    baseline = _rss_bytes(pid)

    sent = hashlib.sha256()
    started = time.monotonic()
    with _RssSampler(pid) as upload_rss:
        info = await client.upload(token_tenant, "big", _agen(_blocks(GiB, sent)))
    upload_seconds = time.monotonic() - started
    assert (info.version, info.size_bytes, info.sha256) == (2, GiB, sent.hexdigest())

    received = hashlib.sha256()
    size = 0
    started = time.monotonic()
    with _RssSampler(pid) as download_rss:
        async for chunk in client.download(token_tenant, "big"):
            received.update(chunk)
            size += len(chunk)
    download_seconds = time.monotonic() - started
    assert (size, received.hexdigest()) == (GiB, sent.hexdigest())

    growth = max(upload_rss.peak, download_rss.peak) - baseline
    print(
        f"\n1 GiB: upload {GiB / MiB / upload_seconds:.0f} MiB/s, download {GiB / MiB / download_seconds:.0f} MiB/s; "
        f"RSS baseline {baseline / MiB:.0f} MiB, peak growth upload {(upload_rss.peak - baseline) / MiB:.0f} MiB, "
        f"download {(download_rss.peak - baseline) / MiB:.0f} MiB ({upload_rss.samples + download_rss.samples} samples)"
    )
    assert upload_rss.samples > 10 and download_rss.samples > 10
    assert growth < 100 * MiB, f"storage RSS grew by {growth / MiB:.0f} MiB"
    await client.close()
