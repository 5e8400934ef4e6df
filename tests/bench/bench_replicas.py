"""Benchmark of replicas: ListDatasets throughput through a client-side round-robin channel over two storage
replicas (OS processes on one PostgreSQL database) against the same channel over one of them, in the same run.

Run with `make bench` (or `python -m tests.bench.bench_replicas`). Both replicas run throughout; the baseline
rounds send to one, the others spread the calls over both, alternating (BENCH_REPLICAS_ROUNDS each, default 3,
medians reported), each round BENCH_REPLICAS_SECONDS long (default 5) with BENCH_REPLICAS_CONCURRENCY calls in
flight (default 16). The client, auth, PostgreSQL and SeaweedFS share the machine with the replicas: on a 2-core
machine two replicas have no spare core to scale onto, and the ratio says so.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh.metrics import scrape
from services.storage.client import StorageClient
from tests.conftest import _with_token, start_auth_process, stop_process
from tests.postgres import PostgresCluster, find_bin_dir
from tests.replicas import Replica, master_keys, start_replicas, stop_replicas, user_token
from tests.storage.conftest import storage_env
from tests.storage.seaweed import SeaweedFS

DATASETS = 20


def _round_robin(replicas: list[Replica], token: str) -> tuple[grpc.aio.Channel, StorageClient]:
    """A client whose channel spreads calls over ``replicas`` (gRPC's round_robin policy over their addresses)."""
    target = "ipv4:" + ",".join(r.address for r in replicas)
    channel = grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    client = StorageClient(channel)
    client.stub = _with_token(client.stub, token)  # type: ignore[assignment]
    return channel, client


async def _rate(client: StorageClient, tenant: str, seconds: float, concurrency: int) -> float:
    """ListDatasets calls answered per second with ``concurrency`` calls in flight for ``seconds``."""
    request = pb.ListDatasetsRequest(tenant=tenant, page=common_pb2.PageRequest(page_size=DATASETS))
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            response = await client.stub.ListDatasets(request, timeout=30)
            assert len(response.datasets) == DATASETS
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def bench(replicas: list[Replica], auth: object, rounds: int, seconds: float, concurrency: int) -> None:
    token = await user_token(auth, "bench", "dev")  # type: ignore[arg-type]
    one_channel, one = _round_robin(replicas[:1], token)
    both_channel, both = _round_robin(replicas, token)
    try:
        for n in range(DATASETS):
            await one.create_dataset("bench", f"set-{n:02d}")
        await _rate(one, "bench", 1.0, concurrency)  # warm-up: connections, caches, the decision cache
        await _rate(both, "bench", 1.0, concurrency)
        baseline, spread = [], []
        for _ in range(rounds):
            baseline.append(await _rate(one, "bench", seconds, concurrency))
            spread.append(await _rate(both, "bench", seconds, concurrency))
    finally:
        await one_channel.close(None)
        await both_channel.close(None)
    one_rate, two_rate = statistics.median(baseline), statistics.median(spread)
    served = [_served(replica) for replica in replicas]
    # The second replica serves only in the round-robin rounds: at least a third of those calls (half, ideally).
    assert served[1] >= sum(spread) * seconds / 3, f"round robin did not spread the calls: {served}"
    print(f"ListDatasets ({DATASETS} datasets a page), {concurrency} in flight, {rounds} x {seconds:g} s (medians)")
    print(f"{'':34}{'calls/s':>10}{'vs one':>10}")
    print(f"{'one replica':34}{one_rate:10.0f}")
    print(f"{'two replicas, round robin':34}{two_rate:10.0f}{two_rate / one_rate:10.2f}")
    print(f"rounds: one {[round(r) for r in baseline]}, two {[round(r) for r in spread]}; cores: {os.cpu_count()}")
    print(f"ListDatasets calls served by each replica (all rounds and warm-ups): {served}")


def _served(replica: Replica) -> int:
    """ListDatasets calls the replica completed (its grpc_server_handled_total)."""
    found = scrape(f"http://{replica.metrics_address}/metrics").series("grpc_server_handled_total")
    return int(sum(value for labels, value in found if labels.get("grpc_method") == "ListDatasets"))


def main() -> None:
    rounds = int(os.environ.get("BENCH_REPLICAS_ROUNDS", "3"))
    seconds = float(os.environ.get("BENCH_REPLICAS_SECONDS", "5"))
    concurrency = int(os.environ.get("BENCH_REPLICAS_CONCURRENCY", "16"))
    bin_dir = find_bin_dir()
    if bin_dir is None:  # the other benchmarks still run
        print("skipped: PostgreSQL server binaries not found; run `make postgres-server`")
        return
    PostgresCluster.reap_orphans(bin_dir)
    cluster = PostgresCluster(bin_dir)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp_name:
        tmp = Path(tmp_name)
        s3 = SeaweedFS(tmp / "s3")
        cluster.start()
        s3.start()
        auth = start_auth_process(tmp)
        replicas: list[Replica] = []
        try:
            url = cluster.create_database(f"bench_{uuid.uuid4().hex[:12]}")
            env = storage_env(tmp / "unused", auth.address, s3, AIDC_DATABASE_URL=url, **master_keys())
            del env["AIDC_DATA_DIR"]
            replicas = start_replicas("storage", 2, tmp, env)
            asyncio.run(bench(replicas, auth, rounds, seconds, concurrency))
        finally:
            stop_replicas(replicas)
            stop_process(auth.process)
            s3.stop()
            cluster.stop()


if __name__ == "__main__":
    main()
