"""Benchmark of admissions through the scheduler's RPC (goal >= 1,000 admissions/s), beside a naive baseline
measured in the same run.

- Both with a deep queue: BACKLOG jobs of a tenant whose quota is zero stay queued the whole time.
- Ours: the scheduler service as its own process (with auth, authorization on every call), SubmitJob from 64
  concurrent callers; a job counts as admitted when the cycle has placed it and the admission is stored (its
  state SCHEDULED/RUNNING). Submissions are written in group commits and the cycle is triggered by submissions
  but coalesced. Its executor here is ``HeldRuns``, a stand-in for the local executor that starts no process
  (launching thousands of processes per second would measure fork/exec, not admission); everything else is the
  service as deployed.
- Naive baseline: the same SubmitJob RPC served by a scheduler that does what the anchors' users complain about
  (kueue #14477): one database transaction per submission and, in it, a re-read and full re-sort of the queue
  with admission of what fits. It runs without auth (which only favours it).

Run with `make bench` (or `python -m tests.bench.bench_scheduler_rpc`). Shared machines are noisy: compare ratios.
For scale: Kueue's published figures are about 9.6 admissions/min for a deep queue (kueue #14477) and 60,000
workloads over 2,000 ClusterQueues in 1,404 s, ~43/s (kueue PR #11004).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import grpc

from services.auth.client import AuthClient
from services.cli.session import BearerToken
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2_grpc
from services.mesh.channels import create_channel
from services.mesh.server import serve
from services.scheduler.client import SchedulerClient, resources
from services.scheduler.config import SchedulerSettings
from services.scheduler.executors import ExitStatus, LaunchRequest, WorkerRef
from services.scheduler.server import build_server
from tests.conftest import first_admin_login, free_port, service_env, start_service_process, stop_process, wait_serving

JOBS = int(os.environ.get("BENCH_SCHEDULER_JOBS", "3000"))
NAIVE_JOBS = int(os.environ.get("BENCH_SCHEDULER_NAIVE_JOBS", "1000"))
#: Jobs that stay queued behind a zero quota the whole time: the deep queue admissions happen beside.
BACKLOG = int(os.environ.get("BENCH_SCHEDULER_BACKLOG", "10000"))
CONCURRENCY = 64
TENANTS = ("acme", "globex", "initech")


# -- the stand-in executor (in the scheduler process) ----------------------------------------------------------


class _HeldRun:
    def __init__(self, request: LaunchRequest) -> None:
        self._workers = [WorkerRef(i, node, f"held-{request.job_id}-{i}") for i, node in enumerate(request.nodes)]
        self._stopped = asyncio.Event()

    @property
    def workers(self) -> Sequence[WorkerRef]:
        return self._workers

    @property
    def ref(self) -> str:
        return "held"

    def done(self) -> bool:
        return self._stopped.is_set()

    async def wait(self) -> ExitStatus:
        await self._stopped.wait()
        return ExitStatus(143, "stopped")

    async def stop(self, grace_seconds: float) -> None:
        self._stopped.set()


class HeldRuns:
    """Stand-in for the local executor (named in the module docstring): runs hold their allocation until stopped."""

    kind = "local"

    async def launch(self, request: LaunchRequest) -> _HeldRun:
        return _HeldRun(request)

    async def adopt(self, request: LaunchRequest, workers: Sequence[WorkerRef]) -> _HeldRun | None:
        return None

    async def close(self) -> None:
        return None


def serve_ours() -> None:
    settings = SchedulerSettings.from_env()
    serve(lambda: build_server(settings, executors={"local": HeldRuns()}))


# -- the naive baseline (its own process) ----------------------------------------------------------------------


class NaiveScheduler(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    """One transaction per submission; in it the whole queue is read back, re-sorted and admitted as it fits."""

    def __init__(self, path: Path, capacity_millicores: int) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY, tenant TEXT, priority INT, cpu INT, state TEXT)"
        )
        self._capacity = capacity_millicores

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: object) -> pb.SubmitJobResponse:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        cursor = db.execute(
            "INSERT INTO jobs (tenant, priority, cpu, state) VALUES (?, ?, ?, 'queued')",
            (request.tenant, request.priority, request.resources.cpu_millicores),
        )
        rows = db.execute("SELECT seq, tenant, priority, cpu, state FROM jobs").fetchall()
        used = sum(cpu for _, _, _, cpu, state in rows if state == "admitted")
        for seq, _, _, cpu, state in sorted(rows, key=lambda r: (-r[2], r[0])):
            if state == "queued" and used + cpu <= self._capacity:
                db.execute("UPDATE jobs SET state = 'admitted' WHERE seq = ?", (seq,))
                used += cpu
        db.execute("COMMIT")
        return pb.SubmitJobResponse(job=pb.Job(job_id=str(cursor.lastrowid), state=pb.JOB_STATE_SCHEDULED))


def serve_naive(address: str, path: str) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        naive = NaiveScheduler(Path(path), 10**12)  # type: ignore[abstract]  # it serves SubmitJob only
        scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(naive, server)
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


# -- driving ---------------------------------------------------------------------------------------------------


async def _submit_all(client: SchedulerClient, count: int, tenants: Sequence[str] = TENANTS) -> float:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    command = [sys.executable, "-c", "pass"]

    async def one(i: int) -> None:
        async with semaphore:
            await client.submit_job(
                command, tenant=tenants[i % len(tenants)], resources=resources(100, 2**20), priority=i % 7
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return started


async def bench_ours(tmp: Path) -> dict[str, float]:
    data = tmp / "ours"
    auth_address = f"127.0.0.1:{free_port()}"
    env = service_env(data, AIDC_AUTH_ADDR=auth_address)
    auth = start_service_process("auth", env, tmp / "auth.log")
    scheduler = None
    try:
        wait_serving(auth_address, process=auth)
        password = first_admin_login(auth_address, data)
        address = f"127.0.0.1:{free_port()}"
        env.update(
            AIDC_SCHEDULER_ADDR=address,
            AIDC_BILLING_ADDR=f"127.0.0.1:{free_port()}",  # no billing: budget checks fail open (and are cached)
            AIDC_SCHEDULER_LOCAL_CPU_MILLICORES=str(10**9),
            AIDC_SCHEDULER_LOCAL_MEMORY_BYTES=str(2**50),
            AIDC_SCHEDULER_BUDGET_CACHE_SECONDS="60",
            AIDC_LOG_LEVEL="WARNING",
        )
        scheduler = _spawn(
            [sys.executable, "-m", "tests.bench.bench_scheduler_rpc", "--serve-ours"], env, tmp / "s.log"
        )
        wait_serving(address, timeout=60, process=scheduler)
        settings = SchedulerSettings.from_env(env)
        auth_client = AuthClient(create_channel(auth_address, settings))
        token = (await auth_client.login("platform", "admin", password)).access_token
        await auth_client.close()
        bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
        client = SchedulerClient(create_channel(address, settings, extra_interceptors=[bearer]))
        await client.set_quota("backlog", pb.Quota(pool="default", nominal=resources(0, 0)))
        await _submit_all(client, BACKLOG, ["backlog"])
        await _submit_all(client, 200)  # warm up: connections, token and decision caches
        await _until_admitted(client, 200)
        started = await _submit_all(client, JOBS)
        submitted = time.perf_counter()
        await _until_admitted(client, 200 + JOBS)
        admitted = time.perf_counter()
        await client.close()
        return {"submit_per_s": JOBS / (submitted - started), "admit_per_s": JOBS / (admitted - started)}
    finally:
        if scheduler is not None:
            stop_process(scheduler)
        stop_process(auth)


async def _until_admitted(client: SchedulerClient, count: int) -> None:
    deadline = time.monotonic() + 600
    while True:
        running = 0
        for tenant in TENANTS:
            running += sum(q.running_jobs for q in await client.get_quota(tenant))
        if running >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {running} of {count} jobs admitted")
        await asyncio.sleep(0.1)  # each poll costs the server a scan of its jobs: poll gently


async def bench_naive(tmp: Path) -> dict[str, float]:
    address = f"127.0.0.1:{free_port()}"
    NaiveScheduler(tmp / "naive.db", 0)  # type: ignore[abstract]  # creates the table
    with sqlite3.connect(tmp / "naive.db") as db:  # the backlog: never fits, re-read and re-sorted every time
        db.executemany(
            "INSERT INTO jobs (tenant, priority, cpu, state) VALUES ('backlog', ?, ?, 'queued')",
            [(i % 7, 10**15) for i in range(BACKLOG)],
        )
    process = _spawn(
        [sys.executable, "-m", "tests.bench.bench_scheduler_rpc", "--serve-naive", address, str(tmp / "naive.db")],
        service_env(tmp / "naive"),
        tmp / "naive.log",
    )
    try:
        await asyncio.sleep(0.5)
        for _ in range(100):
            try:
                with socket_connect(address):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        client = SchedulerClient(grpc.aio.insecure_channel(address))
        await _submit_all(client, 100)
        started = await _submit_all(client, NAIVE_JOBS)  # each answer comes after its admission is committed
        elapsed = time.perf_counter() - started
        await client.close()
        return {"admit_per_s": NAIVE_JOBS / elapsed}
    finally:
        stop_process(process)


def socket_connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=1)


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, cwd=Path(__file__).resolve().parents[2], stdout=out, stderr=out)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as directory:
        tmp = Path(directory)
        ours = asyncio.run(bench_ours(tmp))
        naive = asyncio.run(bench_naive(tmp))
    print(
        f"admissions through SubmitJob: {ours['admit_per_s']:,.0f}/s ({JOBS} jobs, 3 tenants, {CONCURRENCY} callers, "
        f"{BACKLOG} jobs queued behind them; submissions answered at {ours['submit_per_s']:,.0f}/s)  goal >= 1,000/s"
    )
    print(
        f"naive baseline (a transaction and a full re-sort per submission, {NAIVE_JOBS} jobs, same backlog): "
        f"{naive['admit_per_s']:,.0f}/s  -> ours is {ours['admit_per_s'] / naive['admit_per_s']:.1f}x"
    )
    print("for scale: Kueue ~9.6 admissions/min on a deep queue (kueue #14477); ~43/s in kueue PR #11004")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-ours":
        serve_ours()
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-naive":
        serve_naive(sys.argv[2], sys.argv[3])
    else:
        main()
