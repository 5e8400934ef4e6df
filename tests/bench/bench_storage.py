"""Benchmark of the storage service (its own process, real auth, real SeaweedFS), every figure beside a baseline of
the same run, rounds interleaved, medians:

* objects: encrypted upload and download of BENCH_STORAGE_MIB (default 256) MiB of random bytes, against raw S3
  put and get of the same bytes (``minio`` SDK, same server, same part size) and against the transport floor: the
  same bytes through the same service with its content cipher replaced by a copy (tests/bench/storage_floor.py),
  so the cost of encryption itself shows. Goals: upload >= 0.9x raw put, download >= 0.6x raw get. Beside them, the
  ceiling of any download through a Python gRPC service here: the same bytes streamed from memory by a bare gRPC
  server process in messages of a download's size (tests/bench/grpc_stream.py).
* ranged read: the last 1 MiB of a BENCH_STORAGE_RANGE_MIB (default 1024) MiB object, against a full download of
  it. Goal: < 5 % of the full download's time.
* text validation: a BENCH_STORAGE_CSV_MIB (default 256) MiB CSV uploaded as a validated text dataset, against the
  same file uploaded as an artifact. Goal: >= 0.5x.
* small objects: BENCH_STORAGE_SMALL_COUNT (default 256) objects of 64 KiB downloaded one after another and
  BENCH_STORAGE_SMALL_CONCURRENCY (default 16) at a time over one channel, against raw S3 gets on as many threads.
* the ciphers alone, one thread, in memory: the segment cipher the service uses and Tink's Python streams.

Run with `make bench` (or `python -m tests.bench.bench_storage`); BENCH_STORAGE_ROUNDS sets the repetitions
(default 3), BENCH_STORAGE_ONLY a comma-separated choice of sections (objects, range, text, small); AIDC_STORAGE_*
variables of this shell reach both services.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from minio import Minio

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh.memory import tune_allocator
from services.mesh.segments import AES_GCM_HKDF, TAG_BYTES
from services.storage.client import StorageClient
from services.storage.core.crypto import DataKey
from tests.bench import grpc_stream
from tests.conftest import free_port, start_auth_process, stop_process
from tests.storage.conftest import StorageProcess, process_client, start_storage_process
from tests.storage.seaweed import SeaweedFS

MiB = 1024 * 1024
ARTIFACT = pb.OBJECT_KIND_ARTIFACT
_SMALL = 64 * 1024


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


class _Keep(io.BytesIO):
    """Keeps its content readable after Tink closes it."""

    def close(self) -> None:
        pass


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def _atimed(coro: object) -> float:
    start = time.perf_counter()
    await coro  # type: ignore[misc]
    return time.perf_counter() - start


# -- objects -------------------------------------------------------------------------------------------------


def raw_put(client: Minio, bucket: str, data: bytes, part_size: int) -> float:
    return _timed(lambda: client.put_object(bucket, "raw/object", io.BytesIO(data), len(data), part_size=part_size))


def raw_get(client: Minio, bucket: str, key: str = "raw/object", offset: int = 0, length: int = 0) -> int:
    response = client.get_object(bucket, key, offset=offset, length=length)
    size = 0
    try:
        while block := response.read(MiB):
            size += len(block)
    finally:
        response.close()
        response.release_conn()
    return size


async def _drain(client: StorageClient, tenant: str, name: str, **kwargs: object) -> int:
    size = 0
    async for chunk in client.download(tenant, name, **kwargs):  # type: ignore[arg-type]
        size += len(chunk)
    return size


async def upload_and_download(client: StorageClient, tenant: str, data: bytes, sha256: str) -> tuple[float, float]:
    start = time.perf_counter()
    info = await client.upload(tenant, "bench/object", data, kind=ARTIFACT, timeout=3600)
    up = time.perf_counter() - start
    assert info.sha256 == sha256
    start = time.perf_counter()
    size = await _drain(client, tenant, "bench/object", kind=ARTIFACT, version=info.version)
    down = time.perf_counter() - start
    assert size == len(data)
    await client.delete(tenant, "bench/object", kind=ARTIFACT, version=info.version)
    return up, down


# -- ranged read ---------------------------------------------------------------------------------------------


async def _blocks(total: int) -> AsyncIterator[bytes]:
    seed = hashlib.sha256(b"aidc").digest() * (MiB // 32)
    for i in range(total // MiB):
        yield i.to_bytes(8, "big") + seed[8:]


async def ranged_read(client: StorageClient, tenant: str, size: int, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of full downloads and of reads of the last MiB, interleaved."""
    info = await client.upload(tenant, "bench/big", _blocks(size), kind=ARTIFACT, timeout=3600)
    full, tail = [], []
    for _ in range(rounds):
        full.append(await _atimed(_drain(client, tenant, "bench/big", kind=ARTIFACT, version=info.version)))
        start = time.perf_counter()
        got = await _drain(client, tenant, "bench/big", kind=ARTIFACT, version=info.version, offset=size - MiB)
        tail.append(time.perf_counter() - start)
        assert got == MiB
    await client.delete(tenant, "bench/big", kind=ARTIFACT, version=info.version)
    return full, tail


# -- text validation -----------------------------------------------------------------------------------------

_WORDS_ZH = (
    "我们 今天 订单 已经 发货 客服 回复 非常 满意 质量 不错 物流 太慢 退款 申请 产品 包装 价格 优惠 服务".split()
)
_WORDS_EN = "the order arrived late but support was helpful and the price was fair quality great will buy again".split()


def write_csv(path: Path, size: int) -> int:
    """A CSV of customer messages (Chinese, English, mixed; some quoted with commas, quotes or line breaks) with an
    id, a text and a label column; returns its row count."""
    rng = random.Random(19)
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("id,text,label\n")
        block: list[str] = []
        written = 0
        while written < size:
            words = rng.choices(_WORDS_ZH if rng.random() < 0.5 else _WORDS_EN, k=rng.randint(6, 30))
            text = (" " if words[0].isascii() else "").join(words)
            if rng.random() < 0.2:
                text = '"' + text.replace("的", '""的""') + ", " + rng.choice(["真的", "really", "好\n评"]) + '"'
            line = f"{rows},{text},{rng.choice(('positive', 'negative', 'neutral'))}\n"
            block.append(line)
            rows += 1
            written += len(line.encode())
            if len(block) == 10_000:
                out.write("".join(block))
                block.clear()
        out.write("".join(block))
    return rows


async def text_validation(
    client: StorageClient, tenant: str, path: Path, rows: int, rounds: int
) -> list[tuple[float, float]]:
    spec = pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV)
    await client.create_dataset(tenant, "bench-csv")
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        info = await client.upload(tenant, "bench-csv", path, text_dataset=spec, timeout=3600)
        validated = time.perf_counter() - start
        assert info.text_dataset.row_count == rows, (info.text_dataset.row_count, rows)
        start = time.perf_counter()
        await client.upload(tenant, "bench/csv-as-artifact", path, kind=ARTIFACT, timeout=3600)
        opaque = time.perf_counter() - start
        out.append((validated, opaque))
        await client.delete(tenant, "bench-csv", version=info.version)
        await client.delete(tenant, "bench/csv-as-artifact", kind=ARTIFACT, all_versions=True)
    return out


# -- small objects -------------------------------------------------------------------------------------------


async def small_objects(client: StorageClient, tenant: str, count: int, concurrency: int) -> tuple[float, float]:
    """Seconds to download ``count`` small artifacts one after another, and ``concurrency`` at a time."""
    names = [f"bench/small/{i:05d}" for i in range(count)]
    for name in names:
        await client.upload(tenant, name, os.urandom(_SMALL), kind=ARTIFACT)

    async def one(name: str) -> None:
        assert await _drain(client, tenant, name, kind=ARTIFACT) == _SMALL

    async def sequential() -> None:
        for name in names:
            await one(name)

    gate = asyncio.Semaphore(concurrency)

    async def gated(name: str) -> None:
        async with gate:
            await one(name)

    async def parallel() -> None:
        await asyncio.gather(*(gated(name) for name in names))

    return await _atimed(sequential()), await _atimed(parallel())


def raw_small(client: Minio, bucket: str, count: int, concurrency: int) -> float:
    keys = [f"small/{i:05d}" for i in range(count)]
    for key in keys:
        client.put_object(bucket, key, io.BytesIO(os.urandom(_SMALL)), _SMALL)
    with ThreadPoolExecutor(concurrency) as pool:
        return _timed(lambda: list(pool.map(lambda key: raw_get(client, bucket, key), keys)))


# -- ciphers -------------------------------------------------------------------------------------------------


def ciphers(data: bytes) -> dict[str, float]:
    """Seconds to seal and open ``data`` in memory, one thread: the segment cipher and Tink's streams."""
    key = DataKey.generate()
    aad = b"bench"
    stream_key = key.stream_key()
    layout = stream_key.layout
    cipher = AES_GCM_HKDF.new(stream_key.key, aad)
    out = bytearray(layout.segment_bytes)
    segments: list[bytes] = []

    def seal_segments() -> None:
        segments.clear()
        view = memoryview(data)
        for index, start in enumerate(range(0, len(data), layout.plain)):
            piece = view[start : start + layout.plain]
            target = memoryview(out)[: len(piece) + TAG_BYTES]
            cipher.seal_into(index, piece, start + layout.plain >= len(data), target)
            segments.append(bytes(target))

    def open_segments() -> None:
        for index, segment in enumerate(segments):
            cipher.open_into(index, segment, index == len(segments) - 1, memoryview(out)[: len(segment) - TAG_BYTES])

    sealed = _Keep()

    def tink_seal() -> None:
        sealed.seek(0)
        sealed.truncate()
        with key.encrypting_stream(sealed, aad) as stream:
            for start in range(0, len(data), MiB):
                stream.write(data[start : start + MiB])

    def tink_open() -> None:
        stream = key.decrypting_stream(io.BytesIO(sealed.getvalue()), aad)
        while stream.read(MiB):
            pass

    return {
        "segment cipher seal": _timed(seal_segments),
        "segment cipher open": _timed(open_segments),
        "Tink stream seal": _timed(tink_seal),
        "Tink stream open": _timed(tink_open),
    }


# -- the run -------------------------------------------------------------------------------------------------


async def run(
    service: StorageProcess, floor: StorageProcess, stream_address: str, raw: Minio, bucket: str, tmp: Path
) -> tuple[dict[str, list[float]], dict[str, object]]:
    size = _env("BENCH_STORAGE_MIB", 256) * MiB
    rounds = _env("BENCH_STORAGE_ROUNDS", 3)
    data = os.urandom(size)
    sha256 = hashlib.sha256(data).hexdigest()
    part_size = service.settings.storage_part_size_bytes
    client, tenant = await process_client(service, "bench", "dev")
    floor_client, _ = await process_client(floor, "bench", "dev")
    stream = grpc.aio.insecure_channel(stream_address)
    await asyncio.wait_for(stream.channel_ready(), 30)
    times: dict[str, list[float]] = {}
    facts: dict[str, object] = {"size": size, "rounds": rounds}

    def note(what: str, seconds: float) -> None:
        times.setdefault(what, []).append(seconds)

    sections = set(os.environ.get("BENCH_STORAGE_ONLY", "objects,range,text,small").split(","))
    try:
        for _ in range(rounds if "objects" in sections else 0):
            note("raw S3 put", await asyncio.to_thread(raw_put, raw, bucket, data, part_size))
            note("raw S3 get", await asyncio.to_thread(_timed, lambda: raw_get(raw, bucket)))
            note("gRPC stream", await _atimed(grpc_stream.read(stream, size)))
            up, down = await upload_and_download(floor_client, tenant, data, sha256)
            note("floor upload", up)
            note("floor download", down)
            up, down = await upload_and_download(client, tenant, data, sha256)
            note("service upload", up)
            note("service download", down)
        if "objects" in sections:
            for what, seconds in ciphers(data[: 64 * MiB]).items():
                note(what, seconds)
        del data

        if "range" in sections:
            big = _env("BENCH_STORAGE_RANGE_MIB", 1024) * MiB
            full, tail = await ranged_read(client, tenant, big, rounds)
            times["full download (big)"], times["last MiB (big)"] = full, tail
            facts["big"] = big

        if "text" in sections:
            csv_path = tmp / "messages.csv"
            rows = write_csv(csv_path, _env("BENCH_STORAGE_CSV_MIB", 256) * MiB)
            facts["csv"] = (csv_path.stat().st_size, rows)
            for validated, opaque in await text_validation(client, tenant, csv_path, rows, rounds):
                note("csv validated", validated)
                note("csv as artifact", opaque)
            csv_path.unlink()

        if "small" in sections:
            count, concurrency = _env("BENCH_STORAGE_SMALL_COUNT", 256), _env("BENCH_STORAGE_SMALL_CONCURRENCY", 16)
            facts["small"] = (count, concurrency)
            sequential, parallel = await small_objects(client, tenant, count, concurrency)
            times["small sequential"], times["small concurrent"] = [sequential], [parallel]
            times["small raw concurrent"] = [await asyncio.to_thread(raw_small, raw, bucket, count, concurrency)]
    finally:
        await client.close()
        await floor_client.close()
        await stream.close(None)
    return times, facts


def report(times: dict[str, list[float]], facts: dict[str, object], part_size: int, parallel: int) -> None:
    med = {what: statistics.median(seconds) for what, seconds in times.items()}
    size = int(facts["size"])  # type: ignore[call-overload]

    def rate(what: str, nbytes: int = size) -> float:
        return nbytes / MiB / med[what]

    if "raw S3 put" in med:
        _report_objects(med, size, facts, part_size, parallel)
    if "last MiB (big)" in med:
        big = int(facts["big"])  # type: ignore[call-overload]
        print(
            f"ranged read: last 1 MiB of a {big // MiB} MiB object {med['last MiB (big)'] * 1000:.0f} ms, full "
            f"download {med['full download (big)']:.2f} s ({rate('full download (big)', big):.0f} MiB/s): "
            f"{100 * med['last MiB (big)'] / med['full download (big)']:.2f} % of it"
        )
    if "csv validated" in med:
        csv_bytes, rows_count = facts["csv"]  # type: ignore[misc]
        print(
            f"text validation: {csv_bytes / MiB:.0f} MiB CSV ({rows_count} rows) as a validated dataset "
            f"{rate('csv validated', csv_bytes):.0f} MiB/s, as an artifact {rate('csv as artifact', csv_bytes):.0f} "
            f"MiB/s: {med['csv as artifact'] / med['csv validated']:.2f}x"
        )
    if "small sequential" in med:
        count, concurrency = facts["small"]  # type: ignore[misc]
        print(
            f"small objects: {count} x 64 KiB downloads, one after another {count / med['small sequential']:.0f}/s, "
            f"{concurrency} at a time {count / med['small concurrent']:.0f}/s "
            f"({med['small sequential'] / med['small concurrent']:.1f}x); raw S3 gets on {concurrency} threads "
            f"{count / med['small raw concurrent']:.0f}/s"
        )


def _report_objects(med: dict[str, float], size: int, facts: dict[str, object], part_size: int, parallel: int) -> None:
    def rate(what: str, nbytes: int = size) -> float:
        return nbytes / MiB / med[what]

    print(
        f"objects: {size // MiB} MiB of random bytes, {facts['rounds']} rounds interleaved, medians; parts of "
        f"{part_size // MiB} MiB, {parallel} in flight"
    )
    print(f"{'':34}{'MiB/s':>8}{'vs raw S3':>11}{'vs floor':>10}")
    rows = [
        ("raw S3 put (minio SDK)", "raw S3 put", None, None),
        ("raw S3 get (minio SDK)", "raw S3 get", None, None),
        ("gRPC stream alone (from memory)", "gRPC stream", "raw S3 get", None),
        ("floor upload (no encryption)", "floor upload", "raw S3 put", None),
        ("floor download (no encryption)", "floor download", "raw S3 get", None),
        ("service upload (encrypted)", "service upload", "raw S3 put", "floor upload"),
        ("service download (decrypted)", "service download", "raw S3 get", "floor download"),
    ]
    for label, what, raw, floor in rows:
        line = f"{label:34}{rate(what):8.0f}"
        line += f"{med[raw] / med[what]:11.2f}" if raw else ""
        line += f"{med[floor] / med[what]:10.2f}" if floor else ""
        print(line)
    for what in ("segment cipher seal", "segment cipher open", "Tink stream seal", "Tink stream open"):
        print(f"{what + ' (1 thread)':34}{rate(what, 64 * MiB):8.0f}")


def main() -> None:
    # Clients of the service tune their allocator (the CLI, every service: services.mesh.memory); so does this one,
    # rather than inheriting glibc's thresholds from whichever large buffer it happened to free first.
    tune_allocator()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp_name:
        tmp = Path(tmp_name)
        s3 = SeaweedFS(tmp / "s3")
        s3.start()
        auth = start_auth_process(tmp)
        tuning = {k: v for k, v in os.environ.items() if k.startswith("AIDC_STORAGE_")}
        service = start_storage_process(auth, s3, tmp, **tuning)
        floor_dir = {"AIDC_DATA_DIR": str(tmp / "floor")}  # its own database and keys
        floor = start_storage_process(auth, s3, tmp, module="tests.bench.storage_floor", **tuning, **floor_dir)
        stream_address = f"127.0.0.1:{free_port()}"
        stream = subprocess.Popen([sys.executable, "-m", "tests.bench.grpc_stream", stream_address.rsplit(":", 1)[1]])
        try:
            raw = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
            raw.make_bucket("bench-raw")
            times, facts = asyncio.run(run(service, floor, stream_address, raw, "bench-raw", tmp))
        finally:
            stop_process(stream)
            stop_process(service.process)
            stop_process(floor.process)
            stop_process(auth.process)
            s3.stop()
    settings = service.settings
    report(times, facts, settings.storage_part_size_bytes, settings.storage_parallel_parts)


if __name__ == "__main__":
    main()
