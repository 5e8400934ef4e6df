"""Benchmark of the tenant path against the mesh path: the same RPC (storage's ListDatasets as a developer: token
verification, a permission decision from auth, a database read) on the same storage process, called through its
mesh listener (mutual TLS with a client certificate) and through its tenant listener (TLS with the CA only), in one
run, interleaved, so the machine's load affects both alike. The tenant path adds no hop: it is a second listener of
the same server.

Run with `make bench` (or `python -m tests.bench.bench_edge`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from services.gen.aidc.auth.v1 import auth_service_pb2 as apb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.gen.aidc.storage.v1 import storage_service_pb2 as spb
from services.gen.aidc.storage.v1 import storage_service_pb2_grpc
from services.mesh.certs import init_certificates
from tests.conftest import free_port, service_env, start_service_process, stop_process
from tests.storage.seaweed import SeaweedFS

CALLS, ROUNDS, CONCURRENCY = 400, 5, 8
PASSWORD = "correct horse battery"


def _credentials(certs: Path, client: str | None) -> grpc.ChannelCredentials:
    key = (certs / f"{client}-key.pem").read_bytes() if client else None
    chain = (certs / f"{client}.pem").read_bytes() if client else None
    return grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), key, chain)


async def _wait(call: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call()  # type: ignore[operator]
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _latencies(
    stub: storage_service_pb2_grpc.StorageServiceStub, metadata: tuple[tuple[str, str]]
) -> list[float]:
    out = []
    for _ in range(CALLS):
        began = time.perf_counter()
        await stub.ListDatasets(spb.ListDatasetsRequest(tenant="acme"), metadata=metadata, timeout=30)
        out.append(time.perf_counter() - began)
    return out


async def _throughput(stub: storage_service_pb2_grpc.StorageServiceStub, metadata: tuple[tuple[str, str]]) -> float:
    async def worker() -> None:
        for _ in range(CALLS // CONCURRENCY):
            await stub.ListDatasets(spb.ListDatasetsRequest(tenant="acme"), metadata=metadata, timeout=30)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return (CALLS // CONCURRENCY) * CONCURRENCY / (time.perf_counter() - began)


async def measure(env: dict[str, str], certs: Path) -> None:
    mesh = grpc.aio.secure_channel(env["AIDC_STORAGE_ADDR"], _credentials(certs, "cli"))
    tenant = grpc.aio.secure_channel(env["AIDC_STORAGE_TENANT_ADDR"], _credentials(certs, None))
    auth = grpc.aio.secure_channel(env["AIDC_AUTH_TENANT_ADDR"], _credentials(certs, None))
    auth_stub = auth_service_pb2_grpc.AuthServiceStub(auth)
    await _wait(lambda: auth_stub.GetJwks(apb.GetJwksRequest(), timeout=5))
    one_time = json.loads((Path(env["AIDC_DATA_DIR"]) / "auth" / "bootstrap-admin.json").read_text())["password"]
    login = apb.LoginRequest(tenant="platform", name="admin", password=one_time)
    login.new_password = PASSWORD
    admin = (await auth_stub.Login(login, timeout=30)).tokens.access_token
    admin_md = (("authorization", f"Bearer {admin}"),)
    await auth_stub.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=admin_md, timeout=30)
    await auth_stub.CreateUser(
        apb.CreateUserRequest(tenant="acme", name="dev", password=PASSWORD, roles=["developer"]), metadata=admin_md
    )
    token = (await auth_stub.Login(apb.LoginRequest(tenant="acme", name="dev", password=PASSWORD))).tokens.access_token
    metadata = (("authorization", f"Bearer {token}"),)
    stubs = {
        "mesh": storage_service_pb2_grpc.StorageServiceStub(mesh),
        "tenant": storage_service_pb2_grpc.StorageServiceStub(tenant),
    }
    for stub in stubs.values():
        await _wait(
            lambda stub=stub: stub.ListDatasets(spb.ListDatasetsRequest(tenant="acme"), metadata=metadata, timeout=5)
        )
        await _latencies(stub, metadata)  # warm-up: connections, caches
    samples: dict[str, list[float]] = {"mesh": [], "tenant": []}
    rates: dict[str, list[float]] = {"mesh": [], "tenant": []}
    for _ in range(ROUNDS):
        for path, stub in stubs.items():
            samples[path] += await _latencies(stub, metadata)
            rates[path].append(await _throughput(stub, metadata))
    print(f"storage ListDatasets as a developer, {ROUNDS} x {CALLS} calls per path, interleaved")
    print(f"{'path':<44} {'p50':>8} {'p99':>8} {f'calls/s at {CONCURRENCY}':>16}")
    for path, label in (
        ("mesh", "mesh (mutual TLS, client certificate)"),
        ("tenant", "tenant (TLS, CA file only, token)"),
    ):
        ordered = sorted(samples[path])
        p50, p99 = statistics.median(ordered) * 1e3, ordered[int(len(ordered) * 0.99)] * 1e3
        print(f"{label:<44} {p50:>6.2f}ms {p99:>6.2f}ms {statistics.median(rates[path]):>16.0f}")
    mesh_p50, tenant_p50 = statistics.median(samples["mesh"]), statistics.median(samples["tenant"])
    print(
        f"tenant / mesh: p50 x{tenant_p50 / mesh_p50:.2f}, throughput x"
        f"{statistics.median(rates['tenant']) / statistics.median(rates['mesh']):.2f}"
    )
    for channel in (mesh, tenant, auth):
        await channel.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        certs = root / "certs"
        init_certificates(certs)
        s3 = SeaweedFS(root / "s3")
        s3.start()
        env = service_env(
            root / "data",
            AIDC_CERTS_DIR=str(certs),
            AIDC_AUTH_ADDR=f"127.0.0.1:{free_port()}",
            AIDC_STORAGE_ADDR=f"127.0.0.1:{free_port()}",
            AIDC_BILLING_ADDR=f"127.0.0.1:{free_port()}",
            AIDC_LOG_LEVEL="WARNING",
            **s3.env(),
        )
        processes = []
        try:
            processes.append(start_service_process("auth", env, root / "auth.log"))
            processes.append(start_service_process("storage", env, root / "storage.log"))
            asyncio.run(measure(env, certs))
        finally:
            for process in processes:
                stop_process(process)
            s3.stop()


if __name__ == "__main__":
    sys.exit(main())
