"""Benchmark of personal-data masking: the same mixed-language CSV uploaded as a text dataset through the storage
service (its own process, real auth, real SeaweedFS) without masking, with placeholder masking and with
pseudonymization, in the same run, rounds interleaved; MiB/s of each and the ratios to the unmasked upload.

The CSV holds customer messages in Chinese, English and mixed text: every row some text without numbers, a share of
rows also an order number, date, price or other number that must stay (BENCH_MASKING_NUMBER_ROWS, default 0.25),
and a share personal data besides (BENCH_MASKING_PII_ROWS, default 0.05): rows of tests/storage/pii_corpus.py, never
repeated, so no cache could help. BENCH_MASKING_MIB sets the size (default 100), BENCH_MASKING_ROUNDS the
repetitions (default 3, medians reported). The goal is a ratio of at least 0.5 for masking.

Run with `make bench` or `python -m tests.bench.bench_masking`.
"""

from __future__ import annotations

import asyncio
import csv
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.storage.client import StorageClient
from tests.conftest import start_auth_process, stop_process
from tests.storage.conftest import StorageProcess, process_client, start_storage_process
from tests.storage.pii_corpus import clean_sentence, evaluation_set
from tests.storage.seaweed import SeaweedFS

MiB = 1024 * 1024
MODES = {
    "unmasked": None,
    "masked ([PHONE])": pb.MaskingOptions(enabled=True),
    "pseudonymized": pb.MaskingOptions(enabled=True, mode=pb.MASKING_MODE_PSEUDONYMIZE),
}


def write_csv(path: Path, size: int, number_rows: float, pii_rows: float) -> dict[str, int]:
    """Writes the benchmark CSV; returns how many rows of each sort it holds."""
    rng = random.Random(18)
    counts = {"rows": 0, "with numbers": 0, "with personal data": 0}
    labelled: list[str] = []
    numbers: list[str] = []
    seed = 1000
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", "text", "label"])
        while out.tell() < size:
            if not labelled or not numbers:
                seed += 1
                for row in evaluation_set(seed, 3000):
                    (labelled if row.spans else numbers).append(row.text)
            language = rng.choice(["zh", "en", "mixed"])
            text = clean_sentence(rng, "en" if language == "en" else "zh")
            pick = rng.random()
            if pick < pii_rows:
                text += "，" + labelled.pop()
                counts["with personal data"] += 1
            elif pick < pii_rows + number_rows:
                text += "，" + numbers.pop()
                counts["with numbers"] += 1
            writer.writerow([counts["rows"], text, rng.choice(["positive", "negative", "neutral"])])
            counts["rows"] += 1
    return counts


async def bench(storage: StorageProcess, path: Path, rounds: int) -> tuple[dict[str, list[float]], pb.MaskingReport]:
    client, tenant = await process_client(storage, "bench", "dev")
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    report = pb.MaskingReport()
    try:
        for mode in MODES:
            await client.create_dataset(tenant, _name(mode))
        for _ in range(rounds):
            for mode, masking in MODES.items():
                start = time.perf_counter()
                info = await _upload(client, tenant, _name(mode), path, masking)
                seconds[mode].append(time.perf_counter() - start)
                if masking is not None:
                    report = info.masking
    finally:
        await client.close()
    return seconds, report


async def _upload(
    client: StorageClient, tenant: str, name: str, path: Path, masking: pb.MaskingOptions | None
) -> pb.ObjectInfo:
    spec = pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV)
    return await client.upload(tenant, name, path, text_dataset=spec, masking=masking, timeout=3600)


def _name(mode: str) -> str:
    return "bench-" + mode.split()[0]


def main() -> None:
    size = int(os.environ.get("BENCH_MASKING_MIB", "100")) * MiB
    rounds = int(os.environ.get("BENCH_MASKING_ROUNDS", "3"))
    number_rows = float(os.environ.get("BENCH_MASKING_NUMBER_ROWS", "0.25"))
    pii_rows = float(os.environ.get("BENCH_MASKING_PII_ROWS", "0.05"))
    with tempfile.TemporaryDirectory(prefix="bench-masking-") as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "messages.csv"
        counts = write_csv(path, size, number_rows, pii_rows)
        actual = path.stat().st_size
        s3 = SeaweedFS(tmp / "s3")
        s3.start()
        auth = start_auth_process(tmp)
        storage = start_storage_process(auth, s3, tmp)
        try:
            seconds, report = asyncio.run(bench(storage, path, rounds))
        finally:
            stop_process(storage.process)
            stop_process(auth.process)
            s3.stop()

    medians = {mode: statistics.median(times) for mode, times in seconds.items()}
    print(
        f"CSV: {actual / MiB:.0f} MiB, {counts['rows']} rows ({counts['with numbers']} with numbers that must stay, "
        f"{counts['with personal data']} with personal data); {rounds} rounds, medians; through the storage service "
        "(own process, real SeaweedFS)"
    )
    masked = ", ".join(f"{pb.PiiKind.Name(c.kind).removeprefix('PII_KIND_').lower()}={c.count}" for c in report.counts)
    print(f"masked: {report.masked_total} spans in {report.rows_affected} rows ({masked})")
    print(f"{'upload':24}{'MiB/s':>10}{'vs unmasked':>14}")
    base = medians["unmasked"]
    for mode, median in medians.items():
        print(f"{mode:24}{actual / MiB / median:10.1f}{base / median:14.2f}")


if __name__ == "__main__":
    main()
