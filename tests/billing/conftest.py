"""Fixtures of the billing tests: a BillingCore on a real SQLite file with a settable clock, and the billing
service on a real port (in-process, with the auth service of tests/conftest.py) plus typed clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.billing.client import BillingClient
from services.billing.config import BillingSettings
from services.billing.core.periods import from_datetime
from services.billing.core.service import BillingCore, BillingPolicy
from services.billing.server import build_server
from services.billing.store import BillingStore
from services.cli.session import BearerToken
from services.mesh.channels import create_channel
from services.mesh.db import open_database
from services.mesh.server import MeshServer
from tests.conftest import RunningAuth, free_port, tenant_addresses

#: A fixed "now" for core tests: 2025-03-10 12:00 UTC (so February 2025 is the last complete month).
NOW = from_datetime(datetime(2025, 3, 10, 12, 0, tzinfo=UTC))


class Clock:
    """A settable clock in nanoseconds (the core's only notion of time)."""

    def __init__(self, ns: int = NOW) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def make_core(path: Path, clock: Clock, **policy: int) -> BillingCore:
    """A started BillingCore on a fresh SQLite file (grace period 0 unless given)."""
    policy.setdefault("invoice_grace_seconds", 0)
    core = BillingCore(BillingStore(open_database(f"sqlite:///{path}")), BillingPolicy(**policy), clock=clock)  # type: ignore[arg-type]
    core.start()
    return core


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(tmp_path: Path, clock: Clock) -> Iterator[BillingCore]:
    built = make_core(tmp_path / "billing.db", clock)
    yield built
    built._store.db.dispose()


def billing_settings(auth: RunningAuth, data_dir: Path, **extra: str) -> BillingSettings:
    env = {
        "AIDC_DATA_DIR": str(data_dir),
        "AIDC_AUTH_ADDR": auth.address,
        "AIDC_BILLING_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_BILLING_INVOICE_GRACE_SECONDS": "0",
        "AIDC_BILLING_BUDGET_REFRESH_SECONDS": "0.2",
        **tenant_addresses(),
        **extra,
    }
    return BillingSettings.from_env(env)


@dataclass
class RunningBilling:
    """The billing service on a real port, and an admin token for the mesh it belongs to."""

    server: MeshServer
    settings: BillingSettings
    address: str
    admin_token: str

    def client(self, token: str | None = None) -> BillingClient:
        """A typed client sending ``token`` (default: the platform admin's)."""
        bearer = BearerToken(self.admin_token if token is None else token)
        channel = create_channel(
            self.address, self.settings, extra_interceptors=[cast(grpc.aio.ClientInterceptor, bearer)]
        )
        return BillingClient(channel)


async def start_billing(auth: RunningAuth, data_dir: Path, **extra: str) -> RunningBilling:
    settings = billing_settings(auth, data_dir, **extra)
    server = await build_server(settings)
    await server.start()
    await server.wait_ready()
    token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    return RunningBilling(server, settings, f"127.0.0.1:{server.port}", token)


@pytest.fixture
async def billing(auth: RunningAuth, tmp_path: Path) -> AsyncIterator[RunningBilling]:
    running = await start_billing(auth, tmp_path / "billing-data")
    yield running
    await running.server.stop(0)
