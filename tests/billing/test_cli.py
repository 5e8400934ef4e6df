"""``aidc usage``, ``aidc budget`` and ``aidc invoice`` end to end: typer's CliRunner against real auth and
billing service processes. The commands are registered on a fresh root app here (the lead wires
``billing_cmd.register`` into services/cli/main.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
import pytest
import typer
from typer.testing import CliRunner, Result

from services.billing.client import BillingClient, usage_event
from services.billing.config import BillingSettings
from services.cli import billing_cmd
from services.cli.main import _AidcGroup
from services.cli.session import BearerToken
from services.mesh.channels import create_channel
from tests.cli.conftest import AuthServer, Cli, cli_for, start_auth_server  # noqa: F401 - fixture
from tests.conftest import free_port, service_env, start_service_process, stop_process, wait_serving

pytestmark = pytest.mark.slow

app = typer.Typer(cls=_AidcGroup, no_args_is_help=True)
billing_cmd.register(app)


class BillingCli:
    """Runs billing commands (and `aidc login` through the real root app)."""

    def __init__(self, cli: Cli, address: str) -> None:
        self.cli = cli
        self.address = address
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(app, list(args))

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.exit_code == 0, f"aidc {' '.join(args)}: {result.output}"
        return result

    def record(self, events: list[object]) -> None:
        token = json.loads(self.cli.credentials_file.read_text())["access_token"]

        async def send() -> None:
            settings = BillingSettings.from_env()  # the CLI's environment (plaintext loopback here)
            bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
            client = BillingClient(create_channel(self.address, settings, extra_interceptors=[bearer]))
            await client.record_usage(events)  # type: ignore[arg-type]
            await client.close()

        asyncio.run(send())


@pytest.fixture
def billing_cli(
    start_auth_server: Callable[..., AuthServer],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[BillingCli]:
    server = start_auth_server()
    cli = cli_for(server, tmp_path, monkeypatch)
    address = f"127.0.0.1:{free_port()}"
    env = service_env(
        server.data_dir,
        AIDC_AUTH_ADDR=server.address,
        AIDC_BILLING_ADDR=address,
        AIDC_BILLING_INVOICE_GRACE_SECONDS="0",
        AIDC_LOG_LEVEL="WARNING",
    )
    process = start_service_process("billing", env, tmp_path / "billing.log")
    try:
        wait_serving(address, process=process)
        monkeypatch.setenv("AIDC_BILLING_TENANT_ADDR", env["AIDC_BILLING_TENANT_ADDR"])
        cli.login_admin()
        yield BillingCli(cli, address)
    finally:
        stop_process(process)


def _ns(moment: datetime) -> int:
    return int(moment.timestamp()) * 10**9


def test_usage_budget_and_invoice_commands(billing_cli: BillingCli, tmp_path: Path) -> None:
    this_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    events = [
        usage_event(
            source="training",
            id=f"gpu-{day}",
            tenant="acme",
            meter="gpu_seconds",
            quantity=str(1800 * (day + 1)),
            time_ns=_ns(last_month + timedelta(days=day, hours=3)),
            attributes={"gpu_type": "nvidia-a100-80gb", "trace_id": f"{day:032x}"},
        )
        for day in range(5)
    ] + [
        usage_event(
            source="training",
            id="gpu-now",
            tenant="acme",
            meter="gpu_seconds",
            quantity="3600",
            time_ns=_ns(datetime.now(UTC) - timedelta(minutes=1)),
        )
    ]
    billing_cli.record(events)
    since = last_month.strftime("%Y-%m-%d")

    table = billing_cli.ok("usage", "--tenant", "acme", "--meter", "gpu_seconds", "--window", "month", "--since", since)
    assert "gpu_seconds" in table.stdout and "27000" in table.stdout and "3600" in table.stdout
    grouped = billing_cli.ok(
        "usage", "-t", "acme", "-m", "gpu_seconds", "-w", "all", "-g", "gpu_type", "--since", since
    )
    assert "nvidia-a100-80gb" in grouped.stdout and "27000" in grouped.stdout

    png = tmp_path / "charts" / "usage.png"
    chart = billing_cli.ok("usage", "chart", "-t", "acme", "-m", "gpu_seconds", "--since", since, "--png", str(png))
    assert "gpu_seconds (GPU-seconds per day)" in chart.stdout and "█" in chart.stdout and "9000" in chart.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert "1.00 USD per month" in billing_cli.ok("budget", "set", "-t", "acme", "--limit", "1.00", "--enforce").stdout
    shown = billing_cli.ok("budget", "show", "--tenant", "acme").stdout
    assert "2.00 USD" in shown and "yes" in shown  # this month's GPU-hour at the catch-all 2.00, enforced
    alerts = billing_cli.ok("budget", "alerts", "--tenant", "acme").stdout
    assert "80% of budget" in alerts and "100% of budget" in alerts
    assert "credit balance 10.00 USD" in billing_cli.ok("budget", "grant", "10", "-t", "acme", "--id", "welcome").stdout

    created = billing_cli.ok("invoice", "create", "--tenant", "acme").stdout
    invoice_id = f"inv_{last_month:%Y-%m}_acme"
    assert f"draft invoice {invoice_id}" in created and "total 18.75 USD" in created  # 7.5 GPU-hours at 2.50
    assert invoice_id in billing_cli.ok("invoice", "list", "--tenant", "acme").stdout
    shown = billing_cli.ok("invoice", "show", invoice_id, "--tenant", "acme").stdout
    assert "nvidia-a100-80gb" in shown and "18.75 USD" in shown

    exported = tmp_path / "invoice.csv"
    billing_cli.ok("invoice", "export", invoice_id, "-t", "acme", "-f", "csv", "-o", str(exported))
    assert exported.read_text().startswith("invoice_id,line_id,kind")
    as_json = billing_cli.ok("invoice", "export", invoice_id, "-t", "acme", "-f", "json", "-o", "-").stdout
    assert json.loads(as_json)["total"]["micros"] == "18750000"

    finalized = billing_cli.ok("invoice", "finalize", invoice_id, "--tenant", "acme").stdout
    assert "total 8.75 USD" in finalized  # 10.00 of credit applied
    event = billing_cli.ok("usage", "event", "training", "gpu-2", "--tenant", "acme").stdout
    assert f"invoice:   {invoice_id} line L001, cost 3.75 USD" in event and f"{2:032x}" in event

    missing = billing_cli("invoice", "show", "inv_nope", "--tenant", "acme")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: NOT_FOUND")
    bad = billing_cli("usage", "--tenant", "acme", "--meter", "gpu_hours")
    assert bad.exit_code == 2 and "unknown meter" in bad.output
