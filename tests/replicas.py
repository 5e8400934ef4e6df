"""Replicas of one service as OS processes on one database, for the replica tests (tests/<svc>/test_replicas.py).

Each replica is its own process with its own data directory and address, as a Kubernetes pod is; they share the
database (a fresh one on the session's private PostgreSQL cluster, tests/postgres.py) and the master keys (from the
environment, as the cluster's Secrets give them). ``leader_of`` reads the lease row to tell which replica leads.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

from services.auth.client import AuthClient
from services.mesh.channels import create_channel
from services.mesh.errors import AlreadyExists
from services.mesh.metrics import scrape
from tests.conftest import (
    AuthProcess,
    _with_token,
    free_port,
    service_env,
    start_service_process,
    stop_process,
    wait_serving,
)

__all__ = [
    "Replica",
    "start_replicas",
    "stop_replicas",
    "kill",
    "kill_leader",
    "leader_of",
    "master_keys",
    "scrape_leader_gauge",
    "admin_token",
    "user_token",
]

PASSWORD = "correct horse battery"


@dataclass
class Replica:
    """One replica process of a service."""

    service: str
    process: subprocess.Popen[bytes]
    address: str
    data_dir: Path
    log: Path
    metrics_address: str
    #: The mesh's certificates (None: plaintext).
    certs: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def master_keys() -> dict[str, str]:
    """One set of master keys for every replica (each would otherwise make its own in its data directory)."""
    return {
        f"AIDC_{name}_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()
        for name in ("AUTH", "STORAGE", "TRAINING", "SCHEDULER")
    }


def start_replicas(
    service: str, count: int, tmp_path: Path, env: dict[str, str], *, timeout: float = 90.0
) -> list[Replica]:
    """Starts ``count`` processes of ``service`` at once (``env``: the settings they share, the database URL
    included), then waits until every one is SERVING."""
    replicas = []
    for n in range(count):
        directory = tmp_path / f"{service}-{n}"
        directory.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{free_port()}"
        metrics = f"127.0.0.1:{free_port()}"
        # Each replica's listeners on ports of its own, as pods have addresses of their own: ``env`` (often an auth
        # process's) names a tenant address too, which a second replica could not bind.
        tenant = f"127.0.0.1:{free_port()}"
        listeners = {f"AIDC_{service.upper()}_ADDR": address, f"AIDC_{service.upper()}_TENANT_ADDR": tenant}
        extra = {**env, **listeners, "AIDC_METRICS_ADDR": metrics}
        replica_env = service_env(directory / "data", **extra)
        log = directory / f"{service}.log"
        process = start_service_process(service, replica_env, log)
        certs = Path(env["AIDC_CERTS_DIR"]) if env.get("AIDC_CERTS_DIR") else None
        replicas.append(Replica(service, process, address, directory / "data", log, metrics, certs))
    try:
        for replica in replicas:
            wait_serving(replica.address, timeout, replica.process, env.get("AIDC_CERTS_DIR"))
    except BaseException:
        for replica in replicas:
            print(f"--- {replica.log}:\n{replica.log_text()[-4000:]}")
        stop_replicas(replicas)
        raise
    return replicas


def stop_replicas(replicas: Iterable[Replica]) -> None:
    for replica in replicas:
        stop_process(replica.process)


def kill(replica: Replica) -> None:
    """SIGKILL: the process dies without releasing anything (a crashed pod or machine)."""
    os.kill(replica.pid, signal.SIGKILL)
    replica.process.wait(10)


async def kill_leader(
    database_url: str, replicas: list[Replica], service: str, leader: Replica, lease_seconds: float
) -> Replica:
    """SIGKILLs ``leader`` and waits until another replica holds ``service``'s lease; that replica. The failover
    must take at most 4/3 of the lease (services/mesh/leader.py's bound after a death), plus 1 s for this machine."""
    kill(leader)
    killed = time.monotonic()
    while (new := leader_of(database_url, replicas, service)) in (None, leader):
        assert time.monotonic() - killed < lease_seconds * 4 / 3 + 10, f"no other {service} replica took over"
        await asyncio.sleep(0.05)
    assert new is not None
    failover = time.monotonic() - killed
    print(f"\n{service} leader failover after SIGKILL: {failover:.2f} s (lease {lease_seconds:g} s)")
    assert failover <= lease_seconds * 4 / 3 + 1.0
    return new


def leader_of(database_url: str, replicas: Iterable[Replica], service: str) -> Replica | None:
    """The replica holding ``service``'s lease now (by the pid in the holder's name), or None."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT holder FROM leader_leases WHERE name = :name AND expires_at > :now"),
                {"name": service, "now": time.time()},
            ).first()
    finally:
        engine.dispose()
    if row is None:
        return None
    pid = int(str(row.holder).split(":")[1])
    return next((r for r in replicas if r.pid == pid), None)


def scrape_leader_gauge(replica: Replica, loop: str) -> float:
    """The replica's ``aidc_leader{loop=...}`` from its /metrics (over the mesh's TLS when it has certificates)."""
    scheme = "https" if replica.certs else "http"
    found = scrape(f"{scheme}://{replica.metrics_address}/metrics", replica.certs).series("aidc_leader")
    values = [value for labels, value in found if labels.get("loop") == loop]
    assert values, f"no aidc_leader gauge for loop {loop!r} on {replica.service} pid {replica.pid}"
    return values[0]


async def admin_token(auth: AuthProcess) -> str:
    """A platform admin's token from the auth process (over its TLS with the CLI's certificate, when it has one)."""
    client = AuthClient(create_channel(auth.address, auth.settings))
    try:
        return (await client.login("platform", "admin", auth.admin_password)).access_token
    finally:
        await client.close()


async def user_token(auth: AuthProcess, tenant: str, name: str, role: str = "developer") -> str:
    """The token of ``name`` in ``tenant`` with ``role`` (tenant and user created if missing)."""
    admin = AuthClient(create_channel(auth.address, auth.settings))
    admin.stub = _with_token(admin.stub, await admin_token(auth))  # type: ignore[assignment]
    try:
        for create in (lambda: admin.create_tenant(tenant), lambda: admin.create_user(tenant, name, PASSWORD, [role])):
            try:
                await create()
            except AlreadyExists:
                pass
        return (await admin.login(tenant, name, PASSWORD)).access_token
    finally:
        await admin.close()
