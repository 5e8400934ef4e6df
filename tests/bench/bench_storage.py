"""Benchmark of the storage service: encrypted upload and download through the service (its own process, real
SeaweedFS) against raw ``minio`` put/get of the same bytes to the same server in the same run, plus the
streaming AEAD's own throughput (Tink AES256_GCM_HKDF_1MB, one thread).

Run with `make bench` (or `python -m tests.bench.bench_storage`); BENCH_STORAGE_MIB sets the object size
(default 256), BENCH_STORAGE_ROUNDS the repetitions (default 3, medians reported); AIDC_STORAGE_* variables
are passed to the service. The goal is a ratio of at
least 0.7 for upload + download together.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from minio import Minio

from services.storage.core.crypto import DataKey
from tests.conftest import start_auth_process, stop_process
from tests.storage.conftest import process_client, start_storage_process
from tests.storage.seaweed import SeaweedFS

MiB = 1024 * 1024


class _Keep(io.BytesIO):
    """Keeps its content readable after Tink closes it."""

    def close(self) -> None:
        pass


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_tink(data: bytes) -> tuple[float, float]:
    """Seconds to seal and to open ``data`` with one data key, in memory, one thread."""
    key = DataKey.generate()
    aad = b"bench"
    sealed = _Keep()

    def seal() -> None:
        with key.encrypting_stream(sealed, aad) as stream:
            for start in range(0, len(data), MiB):
                stream.write(data[start : start + MiB])

    def open_() -> None:
        stream = key.decrypting_stream(io.BytesIO(sealed.getvalue()), aad)
        while stream.read(MiB):
            pass

    seal_s = _timed(seal)
    return seal_s, _timed(open_)


def bench_raw(client: Minio, bucket: str, data: bytes, part_size: int) -> tuple[float, float]:
    """Seconds for a raw put and get of ``data`` (same part size as the service)."""

    def put() -> None:
        client.put_object(bucket, "raw/object", io.BytesIO(data), len(data), part_size=part_size)

    def get() -> None:
        response = client.get_object(bucket, "raw/object")
        try:
            while response.read(MiB):
                pass
        finally:
            response.close()
            response.release_conn()

    return _timed(put), _timed(get)


async def bench_service(storage: object, data: bytes, rounds: int) -> list[tuple[float, float]]:
    client, tenant = await process_client(storage, "bench", "dev")  # type: ignore[arg-type]
    await client.create_dataset(tenant, "bench")
    expected = hashlib.sha256(data).hexdigest()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        info = await client.upload(tenant, "bench", data)
        up = time.perf_counter() - start
        assert info.sha256 == expected
        start = time.perf_counter()
        size = 0
        async for chunk in client.download(tenant, "bench", version=info.version):
            size += len(chunk)
        down = time.perf_counter() - start
        assert size == len(data)
        out.append((up, down))
    await client.close()
    return out


def main() -> None:
    size = int(os.environ.get("BENCH_STORAGE_MIB", "256")) * MiB
    rounds = int(os.environ.get("BENCH_STORAGE_ROUNDS", "3"))
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp_name:
        tmp = Path(tmp_name)
        s3 = SeaweedFS(tmp / "s3")
        s3.start()
        auth = start_auth_process(tmp)
        # AIDC_STORAGE_* tuning variables of this shell reach the service (e.g. AIDC_STORAGE_CHUNK_BYTES).
        tuning = {k: v for k, v in os.environ.items() if k.startswith("AIDC_STORAGE_")}
        storage = start_storage_process(auth, s3, tmp, **tuning)
        try:
            part_size = storage.settings.storage_part_size_bytes
            raw = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
            raw.make_bucket("bench-raw")
            raw_times = [bench_raw(raw, "bench-raw", data, part_size) for _ in range(rounds)]
            service_times = asyncio.run(bench_service(storage, data, rounds))
            tink_times = [bench_tink(data) for _ in range(rounds)]
        finally:
            stop_process(storage.process)
            stop_process(auth.process)
            s3.stop()

    def rate(seconds: float) -> float:
        return size / MiB / seconds

    raw_put = statistics.median(t[0] for t in raw_times)
    raw_get = statistics.median(t[1] for t in raw_times)
    svc_up = statistics.median(t[0] for t in service_times)
    svc_down = statistics.median(t[1] for t in service_times)
    seal = statistics.median(t[0] for t in tink_times)
    unseal = statistics.median(t[1] for t in tink_times)
    print(f"object: {size // MiB} MiB, {rounds} rounds (medians); part size {part_size // MiB} MiB")
    print(f"{'':28}{'MiB/s':>10}{'vs raw minio':>15}")
    print(f"{'raw minio put':28}{rate(raw_put):10.0f}")
    print(f"{'raw minio get':28}{rate(raw_get):10.0f}")
    print(f"{'service upload (encrypted)':28}{rate(svc_up):10.0f}{raw_put / svc_up:15.2f}")
    print(f"{'service download (decrypted)':28}{rate(svc_down):10.0f}{raw_get / svc_down:15.2f}")
    both = (raw_put + raw_get) / (svc_up + svc_down)
    print(f"{'upload + download':28}{2 * size / MiB / (svc_up + svc_down):10.0f}{both:15.2f}")
    print(f"{'Tink seal (1 thread)':28}{rate(seal):10.0f}")
    print(f"{'Tink open (1 thread)':28}{rate(unseal):10.0f}")


if __name__ == "__main__":
    main()
