"""``aidc up``, ``aidc down`` and ``aidc status``: run, stop and inspect the whole platform locally."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.auth.client import read_bootstrap_admin
from services.cli.credentials import Credentials, replace_one_time_password
from services.cli.session import cli_settings, open_session
from services.mesh.config import SERVICE_NAMES
from services.mesh.errors import AidcError
from services.platform.components import build_components
from services.platform.probes import Health
from services.platform.state import PlatformState
from services.platform.status import ComponentStatus, platform_status
from services.platform.supervisor import (
    AlreadyRunning,
    StartupError,
    Supervisor,
    load_platform,
    start_detached,
    stop_platform,
)

__all__ = ["register", "up", "down", "status"]

_console = Console()
_errors = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The platform's data directory (default: AIDC_DATA_DIR, else .aidc).",
        show_default=False,
    ),
]

_HEALTH_STYLE = {Health.SERVING: "green", Health.NOT_SERVING: "yellow", Health.DOWN: "red"}


def register(app: typer.Typer) -> None:
    """Adds the ``up``, ``down`` and ``status`` commands to the CLI."""
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)


def _env(data_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if data_dir is not None:
        env["AIDC_DATA_DIR"] = str(data_dir)
    return env


async def _first_login(env: Mapping[str, str], tenant: str, user: str, one_time: str) -> str:
    """Logs the operator who just started the platform in as the first-start admin, replacing its one-time
    password (which expires at first use) by a new one; stores the CLI login, returns the new password."""
    async with open_session(authenticated=False, env=env) as session:
        tokens, password = await replace_one_time_password(session.auth.login, tenant, user, one_time)
        subject = f"user:{tenant}/{user}"
        session.store.save(Credentials.from_token_pair(session.auth_addr, tokens, subject, tenant))
    return password


def _print_ready(state: PlatformState, began: float, env: Mapping[str, str]) -> None:
    table = Table(title="aidc is up", title_justify="left")
    table.add_column("component")
    table.add_column("endpoint")
    table.add_column("pid", justify="right")
    for c in state.components:
        for i, endpoint in enumerate(c.endpoints):
            table.add_row(c.name if i == 0 else "", endpoint, str(c.pid or "-") if i == 0 else "")
    if state.metrics_url:
        table.add_row("supervisor", f"metrics {state.metrics_url}", str(state.supervisor_pid))
    _console.print(table)
    _console.print(
        f"all {len(state.components)} components SERVING in {state.ready_seconds:.1f}s "
        f"({time.monotonic() - began:.1f}s for the whole command)"
    )
    _console.print(f"data in {state.data_dir}, logs in {Path(state.data_dir) / 'logs'}", highlight=False)
    _print_tenant_path(env)
    admin = read_bootstrap_admin(Path(state.data_dir))
    if admin is not None:
        try:
            password = asyncio.run(_first_login(env, admin.tenant, admin.user, admin.password))
            logged_in = True
        except AidcError as error:
            _errors.print(f"could not log the CLI in: {error.code.name}: {error.message}")
            password, logged_in = admin.password, False
        _console.print("[bold yellow]platform admin created; this password is shown once[/] (store it now):")
        _console.print(f"  tenant:   {admin.tenant}\n  user:     {admin.user}\n  password: {password}")
        admin.path.unlink(missing_ok=True)  # the one-time password on disk no longer works (or is shown above)
        if logged_in:
            _console.print(f"the CLI is logged in as {admin.tenant}/{admin.user} (`aidc logout` to end it)")
        else:
            _console.print("it works once: the first `aidc login` sets a new password")


def _print_tenant_path(env: Mapping[str, str]) -> None:
    """What a tenant's client needs: the tenant addresses, the CA file (no client certificate) and a token."""
    settings = cli_settings(env)
    addresses = {name: settings.tenant_address_of(name) for name in SERVICE_NAMES}
    listed = ", ".join(f"{name} {address}" for name, address in addresses.items() if address)
    if not listed:
        return
    tls_dir = settings.tls_dir()
    trust = f"TLS trusting the CA file {tls_dir / 'ca.pem'}" if tls_dir else "plaintext (dev mode, loopback only)"
    _console.print(
        f"tenant endpoints (the CLI, SDKs in any language, Triton clients): {listed}; {trust}, no client "
        "certificate, `authorization: Bearer <token>` on each call",
        highlight=False,
    )


def up(
    detach: Annotated[
        bool,
        typer.Option("--detach", "-d", help="Run the supervisor in the background and return when SERVING."),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=1, help="Seconds to wait for SERVING (default AIDC_STARTUP_TIMEOUT_SECONDS)."),
    ] = None,
    data_dir: DataDirOption = None,
    monitoring: Annotated[
        bool,
        typer.Option(
            "--monitoring",
            help="Also run a local Prometheus scraping every component, with the alert rules loaded "
            "(Debian's prometheus package: `make prometheus-server`). Same as AIDC_MONITORING=true.",
        ),
    ] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Also run a local Ray head and give the scheduler a Ray pool on it (multi-worker fine-tunes). "
            "Same as AIDC_RAY=true.",
        ),
    ] = False,
) -> None:
    """Start every service, Triton, the S3 server and the trace collector; supervise them until Ctrl-C."""
    began = time.monotonic()
    env = _env(data_dir)
    if monitoring:
        env["AIDC_MONITORING"] = "true"
    if ray:
        env["AIDC_RAY"] = "true"
    try:
        platform = load_platform(env)
    except ValueError as exc:
        _errors.print(f"[red]bad configuration:[/] {exc}")
        raise typer.Exit(code=2) from None
    try:
        if detach:
            state = start_detached(platform, timeout, env)
            _print_ready(state, began, env)
            _console.print("supervisor runs in the background; `aidc status` to check, `aidc down` to stop.")
            return
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        supervisor = Supervisor(
            platform,
            build_components(platform, env),
            startup_timeout=timeout,
            on_ready=lambda state: _print_ready(state, began, env),
        )
        asyncio.run(supervisor.run())
        _console.print("aidc stopped.")
    except AlreadyRunning as exc:
        _console.print(f"{exc}; `aidc status` to check it, `aidc down` to stop it.")
        # Idempotent for scripts (`make up` twice); a second foreground supervisor can't attach, though.
        raise typer.Exit(code=0 if detach else 1) from None
    except StartupError as exc:
        _errors.print(f"[red]aidc up failed:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(code=1) from None


def down(data_dir: DataDirOption = None) -> None:
    """Stop the platform started by `aidc up` and make sure none of its processes is left."""
    platform = load_platform(_env(data_dir), create_credentials=False)
    report = stop_platform(platform.run_dir, platform.platform.stop_grace_seconds)
    if report.supervisor_pid is None and not report.stragglers:
        _console.print("aidc is not running.")
    elif report.supervisor_pid is not None:
        _console.print(f"stopped the supervisor (pid {report.supervisor_pid}) and its components.")
    for name, pids in report.stragglers.items():
        _console.print(f"[yellow]killed leftover {name} processes:[/] {', '.join(map(str, pids))}")
    if report.left:
        _errors.print(f"[red]still alive:[/] {', '.join(map(str, report.left))}")
        raise typer.Exit(code=1)


def _print_figures(components: list[ComponentStatus]) -> None:
    """The second table: what each component's /metrics says (since it started)."""
    measured = [c for c in components if c.figures is not None]
    if not measured:
        return
    table = Table(title="since each component started, from its /metrics", title_justify="left")
    for column in ("component", "RPCs", "errors", "p50", "in flight", "figures"):
        table.add_column(column, justify="left" if column in ("component", "figures") else "right")
    for c in measured:
        f = c.figures
        assert f is not None
        if f.error:
            table.add_row(c.name, "-", "-", "-", "-", f.error)
            continue
        p50 = "-" if f.p50_seconds is None else f"{f.p50_seconds * 1e3:.1f}ms"
        table.add_row(c.name, f"{f.rpcs:.0f}", f"{f.server_errors:.0f}", p50, f"{f.in_flight:.0f}", f.detail)
    _console.print(table)
    _console.print(
        "errors: RPCs that failed on the server's side (UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS, DEADLINE_EXCEEDED); "
        "p50: median latency of unary RPCs.",
        style="dim",
    )


def status(data_dir: DataDirOption = None) -> None:
    """Probe every component live; exit code 0 only if all are SERVING."""
    platform = load_platform(_env(data_dir), create_credentials=False)
    result = asyncio.run(platform_status(platform))
    if result.supervisor_pid is not None:
        _console.print(f"supervisor pid {result.supervisor_pid} ({result.phase}); data in {platform.data_dir}")
    else:
        _console.print(f"supervisor not running; data in {platform.data_dir}")
    if result.error:
        _console.print(f"[red]last start failed:[/] {result.error}", highlight=False)
    table = Table()
    for column in ("component", "status", "address", "pid", "restarts", "detail"):
        table.add_column(column, justify="right" if column in ("pid", "restarts") else "left")
    for c in result.components:
        style = _HEALTH_STYLE[c.health]
        restarts = f"{c.restarts} ({c.hung_restarts} hung)" if c.hung_restarts else str(c.restarts)
        table.add_row(c.name, f"[{style}]{c.health.value}[/]", c.address, str(c.pid or "-"), restarts, c.detail)
    _console.print(table)
    for c in result.components:
        if c.last_restart:
            _console.print(f"{c.name} last restarted: {c.last_restart}", highlight=False)
    _print_figures(result.components)
    if not result.all_serving:
        raise typer.Exit(code=1)
