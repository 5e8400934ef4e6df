"""``aidc usage``, ``aidc budget`` and ``aidc invoice``: metered usage (tables, charts), budgets and credit,
invoices and their exports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from services.billing.client import METER_NAMES, METERS, BillingClient, format_micros, money, parse_money
from services.cli.session import CliSession, open_session
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.gen.aidc.common.v1 import common_pb2
from services.mesh.errors import InvalidArgument

__all__ = ["register", "render_bars", "write_png"]

_T = TypeVar("_T")

usage_app = typer.Typer(help="Metered usage: aggregates per meter, charts, and one event's cost.")
budget_app = typer.Typer(help="Monthly budgets, alerts and prepaid credit.", no_args_is_help=True)
invoice_app = typer.Typer(help="Create, list, show, finalize and export invoices.", no_args_is_help=True)

_out = Console(highlight=False, soft_wrap=False)

_WINDOWS = {"hour": pb.WINDOW_HOUR, "day": pb.WINDOW_DAY, "month": pb.WINDOW_MONTH, "all": pb.WINDOW_UNSPECIFIED}
_AGGREGATIONS = {"sum": pb.AGGREGATION_SUM, "count": pb.AGGREGATION_COUNT, "max": pb.AGGREGATION_MAX}
_STATES = {"draft": pb.INVOICE_STATE_DRAFT, "finalized": pb.INVOICE_STATE_FINALIZED}
_FORMATS = {"csv": pb.EXPORT_FORMAT_CSV, "json": pb.EXPORT_FORMAT_JSON}

TenantOption = Annotated[str, typer.Option("--tenant", "-t", help="The tenant; default: your own.", show_default=False)]
MeterOption = Annotated[
    list[str] | None,
    typer.Option("--meter", "-m", help=f"A meter (repeatable); default: all ({', '.join(METER_NAMES)})."),
]
WindowOption = Annotated[str, typer.Option("--window", "-w", help="Bucket: hour, day, month or all.")]
SinceOption = Annotated[
    str, typer.Option("--since", help="Start (YYYY-MM-DD or ISO time, UTC); default: the 1st of this month.")
]
UntilOption = Annotated[str, typer.Option("--until", help="End, exclusive (YYYY-MM-DD or ISO time); default: now.")]


def register(app: typer.Typer) -> None:
    """Adds the ``usage``, ``budget`` and ``invoice`` commands to the CLI."""
    app.add_typer(usage_app, name="usage")
    app.add_typer(budget_app, name="budget")
    app.add_typer(invoice_app, name="invoice")


# -- helpers ---------------------------------------------------------------------------------------------


def _run(work: Callable[[BillingClient, CliSession], Awaitable[_T]]) -> _T:
    """Runs one command's RPCs against the billing service with the stored login."""

    async def main() -> _T:
        async with open_session() as session:
            client = BillingClient(session.channel("billing"))
            return await work(client, session)

    return asyncio.run(main())


def _parse_time(text: str, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date (YYYY-MM-DD) or ISO time", param_hint=what) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _month_start(now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _choice(value: str, choices: dict[str, Any], what: str) -> Any:
    if value not in choices:
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(choices)}", param_hint=what)
    return choices[value]


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return datetime.fromtimestamp(stamp.seconds, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _money(value: common_pb2.Money) -> str:
    return f"{format_micros(value.micros)} {value.currency}" if value.currency else ""


def _meters(meters: list[str] | None) -> list[str]:
    for meter in meters or ():
        if meter not in METERS:
            raise typer.BadParameter(f"unknown meter {meter!r} (known: {', '.join(METER_NAMES)})", param_hint="--meter")
    return list(meters or METER_NAMES)


async def _buckets(
    client: BillingClient,
    meters: Sequence[str],
    tenant: str,
    window: str,
    aggregation: str,
    group_by: Sequence[str],
    since: str,
    until: str,
) -> dict[str, list[pb.UsageBucket]]:
    start = _parse_time(since, "--since") if since else _month_start()
    end = _parse_time(until, "--until") if until else None
    found = {}
    for meter in meters:
        found[meter] = await client.all_usage_buckets(
            meter,
            tenant=tenant,
            window=_choice(window, _WINDOWS, "--window"),
            aggregation=_choice(aggregation, _AGGREGATIONS, "--aggregation"),
            group_by=list(group_by),
            start=start,
            end=end,
        )
    return found


# -- usage -----------------------------------------------------------------------------------------------


@usage_app.callback(invoke_without_command=True)
def usage(
    ctx: typer.Context,
    tenant: TenantOption = "",
    meters: MeterOption = None,
    window: WindowOption = "day",
    aggregation: Annotated[str, typer.Option("--aggregation", "-a", help="sum, count or max.")] = "sum",
    group_by: Annotated[
        list[str] | None, typer.Option("--group-by", "-g", help="An attribute to group by, e.g. model (repeatable).")
    ] = None,
    since: SinceOption = "",
    until: UntilOption = "",
) -> None:
    """Show usage per meter and time bucket (``aidc usage chart`` draws it, ``aidc usage event`` explains one)."""
    if ctx.invoked_subcommand is not None:
        return
    chosen = _meters(meters)
    groups = list(group_by or [])
    found = _run(lambda c, _: _buckets(c, chosen, tenant, window, aggregation, groups, since, until))
    table = Table("meter", "from", "to", *groups, aggregation, "events", title_justify="left")
    for meter, buckets in found.items():
        for bucket in buckets:
            group = [bucket.group.get(key, "") for key in groups]
            table.add_row(
                meter, _when(bucket.start_time), _when(bucket.end_time), *group, bucket.value, str(bucket.event_count)
            )
    if not table.row_count:
        typer.echo("no usage in that range")
        return
    _out.print(table)


@usage_app.command("chart")
def usage_chart(
    tenant: TenantOption = "",
    meters: MeterOption = None,
    window: WindowOption = "day",
    since: SinceOption = "",
    until: UntilOption = "",
    png: Annotated[Path | None, typer.Option("--png", help="Also write the chart to this PNG file.")] = None,
    width: Annotated[int, typer.Option("--width", min=10, max=200, help="Bar width in characters.")] = 40,
) -> None:
    """Chart each meter's usage over time: bars in the terminal, and optionally a PNG file."""
    chosen = _meters(meters)
    found = _run(lambda c, _: _buckets(c, chosen, tenant, window, "sum", [], since, until))
    for meter, buckets in found.items():
        unit = METERS[meter].unit
        typer.echo(f"{meter} ({unit}s per {window})")
        points = [(_when(b.start_time), Decimal(b.value)) for b in buckets]
        typer.echo(render_bars(points, width) if points else "  (no usage)")
        typer.echo("")
    if png is not None:
        series = {m: [(b.start_time.ToDatetime(UTC), Decimal(b.value)) for b in bs] for m, bs in found.items()}
        write_png(png, series, _BAR_DAYS.get(window, 0.8))
        typer.echo(f"wrote {png}", err=True)


_EIGHTHS = " ▏▎▍▌▋▊▉"


def render_bars(points: Sequence[tuple[str, Decimal]], width: int = 40) -> str:
    """A horizontal bar per (label, value), scaled to the largest value, in eighths of a character."""
    largest = max((value for _, value in points), default=Decimal(0))
    lines = []
    for label, value in points:
        eighths = int(value * width * 8 / largest) if largest > 0 else 0
        bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
        lines.append(f"  {label:<16} {bar:<{width}} {value:f}".rstrip())
    return "\n".join(lines)


#: Bar width (in days, matplotlib's date unit) per window.
_BAR_DAYS = {"hour": 0.8 / 24, "day": 0.8, "month": 24.0, "all": 1.0}


def write_png(path: Path, series: dict[str, list[tuple[datetime, Decimal]]], bar_days: float = 0.8) -> None:
    """One panel per meter, usage over time (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(series), 1, figsize=(10, 2.4 * max(1, len(series))), squeeze=False)
    for axis, (meter, points) in zip(axes[:, 0], series.items(), strict=True):
        if points:
            # Plotting needs floats; they only place pixels, no amount is computed from them.
            axis.bar([p[0] for p in points], [float(p[1]) for p in points], width=bar_days)
        axis.set_title(meter, loc="left", fontsize=10)
        axis.set_ylabel(f"{METERS[meter].unit}s")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)


@usage_app.command("event")
def usage_event(
    source: Annotated[str, typer.Argument(help="The emitting service, e.g. serving.")],
    event_id: Annotated[str, typer.Argument(help="The event id (e.g. a request id).")],
    tenant: TenantOption = "",
) -> None:
    """Show one usage event, the invoice line it was priced on, its cost and its trace."""
    found = _run(lambda c, _: c.get_usage_event(source, event_id, tenant=tenant))
    event = found.event
    typer.echo(f"event:     {event.source}/{event.id} ({event.tenant})")
    typer.echo(f"usage:     {event.quantity} {event.meter} at {_when(event.time)}")
    if event.attributes:
        typer.echo("attributes: " + ", ".join(f"{k}={v}" for k, v in sorted(event.attributes.items())))
    typer.echo(f"recorded:  {_when(found.record_time)}")
    if found.invoice_id:
        typer.echo(f"invoice:   {found.invoice_id} line {found.line_id}, cost {_money(found.attributed_cost)}")
    else:
        typer.echo("invoice:   not invoiced yet")
    if found.trace_id:
        typer.echo(f"trace:     {found.trace_id}  (aidc trace {found.trace_id})")


# -- budgets ---------------------------------------------------------------------------------------------


async def _currency(client: BillingClient, tenant: str) -> str:
    return (await client.get_price_book(tenant=tenant)).currency


@budget_app.command("set")
def budget_set(
    tenant: TenantOption = "",
    limit: Annotated[str, typer.Option("--limit", help="Monthly limit, e.g. 250.00 (the platform currency).")] = "",
    thresholds: Annotated[
        list[int] | None, typer.Option("--threshold", help="Alert at this percent of the limit (repeatable).")
    ] = None,
    enforce: Annotated[bool, typer.Option("--enforce", help="Refuse spend beyond the limit.")] = False,
    prepaid: Annotated[
        bool | None,
        typer.Option(
            "--prepaid/--postpaid",
            help="Platform admins: refuse spend beyond the prepaid credit, or stop (default: leave as it is).",
        ),
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the budget.")] = False,
) -> None:
    """Set (or remove) a tenant's monthly budget, its alert thresholds and enforcement. A tenant-admin may lower or
    enforce a limit the platform set, not raise, remove or unenforce it."""
    if (remove and limit) or (not remove and not limit and prepaid is None):
        raise typer.BadParameter("give --limit (and/or --prepaid/--postpaid), or --remove")
    micros = parse_money(limit) if limit else None

    async def work(client: BillingClient, _: CliSession) -> pb.Budget:
        cap = money(micros, await _currency(client, tenant)) if micros is not None else None
        return await client.set_budget(tenant, cap, thresholds=thresholds or [], enforce=enforce, prepaid=prepaid)

    budget = _run(work)
    if not budget.HasField("monthly_limit") and not budget.prepaid:
        typer.echo(f"removed the budget of {budget.tenant}")
        return
    typer.echo(
        f"budget of {budget.tenant}: {_money(budget.monthly_limit) or 'no limit'} per month, alerts at "
        f"{', '.join(f'{p}%' for p in budget.alert_threshold_percents)}"
        + (", enforced" if budget.enforce else "")
        + (", prepaid" if budget.prepaid else "")
    )


@budget_app.command("show")
def budget_show(tenant: TenantOption = "") -> None:
    """Show credit, month-to-date charges and the budget position."""
    balance = _run(lambda c, _: c.get_balance(tenant))
    budget = balance.budget
    rows = [
        ("tenant", balance.tenant),
        ("plan", balance.plan),
        ("month to date", _money(balance.month_to_date_charges)),
        ("monthly limit", _money(budget.monthly_limit) if budget.HasField("monthly_limit") else "none"),
        ("remaining", _money(balance.remaining_budget) if balance.HasField("remaining_budget") else "-"),
        ("alerts at", ", ".join(f"{p}%" for p in budget.alert_threshold_percents) or "-"),
        ("enforced", "yes" if budget.enforce else "no"),
        (
            "platform limit",
            (_money(budget.platform_monthly_limit) + (", enforced" if budget.platform_enforce else ""))
            if budget.HasField("platform_monthly_limit")
            else "none",
        ),
        ("prepaid", "yes" if budget.prepaid else "no"),
        ("credit balance", _money(balance.credit_balance)),
        ("as of", _when(balance.as_of_time)),
    ]
    table = Table("", "", show_header=False, box=None)
    for name, value in rows:
        table.add_row(name, value)
    _out.print(table)


@budget_app.command("alerts")
def budget_alerts(
    tenant: TenantOption = "",
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="How many, newest first.")] = 50,
) -> None:
    """List budget alerts (thresholds reached, prepaid credit exhausted), newest first."""
    alerts = _run(lambda c, _: c.list_budget_alerts(tenant, page_size=limit))
    if not alerts:
        typer.echo("no budget alerts")
        return
    table = Table("time", "tenant", "alert", "month", "month to date", "limit")
    for alert in alerts:
        what = (
            f"{alert.threshold_percent}% of budget"
            if alert.kind == pb.BUDGET_ALERT_KIND_THRESHOLD
            else "prepaid credit exhausted"
        )
        table.add_row(
            _when(alert.time),
            alert.tenant,
            what,
            _when(alert.period_start_time)[:7],
            _money(alert.month_to_date_charges),
            _money(alert.monthly_limit),
        )
    _out.print(table)


@budget_app.command("grant")
def budget_grant(
    amount: Annotated[str, typer.Argument(help="Credit to add, e.g. 100.00 (the platform currency).")],
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant.")],
    grant_id: Annotated[str, typer.Option("--id", help="Grant id; a retry with the same id adds nothing.")],
    reason: Annotated[str, typer.Option("--reason", help="Why the credit is granted.")] = "",
    expires: Annotated[str, typer.Option("--expires", help="Unused credit expires then (YYYY-MM-DD).")] = "",
) -> None:
    """Grant prepaid credit to a tenant (platform admins)."""
    micros = parse_money(amount)
    expire = _parse_time(expires, "--expires") if expires else None

    async def work(client: BillingClient, _: CliSession) -> pb.GrantCreditResponse:
        return await client.grant_credit(
            tenant, grant_id, money(micros, await _currency(client, tenant)), reason=reason, expire=expire
        )

    granted = _run(work)
    typer.echo(
        f"granted {_money(granted.grant.amount)} to {granted.grant.tenant} ({granted.grant.grant_id}); "
        f"credit balance {_money(granted.balance.credit_balance)}"
    )


# -- invoices --------------------------------------------------------------------------------------------


def _invoice_table(invoice: pb.Invoice) -> Table:
    table = Table("line", "kind", "description", "quantity", "unit price", "per", "amount", "events")
    for line in invoice.lines:
        kind = pb.InvoiceLineKind.Name(line.kind).removeprefix("INVOICE_LINE_KIND_").lower()
        table.add_row(
            line.line_id,
            kind,
            line.description,
            line.quantity,
            _money(line.unit_price) if line.HasField("unit_price") else "",
            line.price_per_quantity,
            _money(line.amount),
            str(line.event_count) if line.event_count else "",
        )
    return table


def _state(invoice: pb.Invoice) -> str:
    return pb.InvoiceState.Name(invoice.state).removeprefix("INVOICE_STATE_").lower()


@invoice_app.command("create")
def invoice_create(
    tenant: TenantOption = "",
    month: Annotated[str, typer.Option("--month", help="The month, YYYY-MM; default: the previous month.")] = "",
) -> None:
    """Compute (or recompute) the draft invoice of a past month."""
    start = _parse_time(f"{month}-01", "--month") if month else None
    invoice = _run(lambda c, _: c.create_invoice(tenant, period_start=start))
    typer.echo(
        f"{_state(invoice)} invoice {invoice.invoice_id} for {invoice.tenant}, {_when(invoice.period_start_time)[:7]}: "
        f"{len(invoice.lines)} lines, total {_money(invoice.total)}"
    )


@invoice_app.command("list")
def invoice_list(
    tenant: TenantOption = "",
    state: Annotated[str, typer.Option("--state", help="draft or finalized; default: both.")] = "",
) -> None:
    """List a tenant's invoices, newest month first."""
    wanted = _choice(state, _STATES, "--state") if state else pb.INVOICE_STATE_UNSPECIFIED
    invoices = _run(lambda c, _: c.list_invoices(tenant, state=wanted, page_size=1000))
    table = Table("invoice", "tenant", "month", "state", "plan", "subtotal", "credits", "total")
    for invoice in invoices:
        table.add_row(
            invoice.invoice_id,
            invoice.tenant,
            _when(invoice.period_start_time)[:7],
            _state(invoice),
            invoice.plan,
            _money(invoice.subtotal),
            _money(invoice.credits_applied),
            _money(invoice.total),
        )
    _out.print(table)


@invoice_app.command("show")
def invoice_show(
    invoice_id: Annotated[str, typer.Argument(help="The invoice id (from `aidc invoice list`).")],
    tenant: TenantOption = "",
) -> None:
    """Show an invoice with its lines and totals."""
    invoice = _run(lambda c, _: c.get_invoice(tenant, invoice_id))
    typer.echo(
        f"invoice {invoice.invoice_id}  tenant {invoice.tenant}  month {_when(invoice.period_start_time)[:7]}  "
        f"{_state(invoice)}  plan {invoice.plan}  price book v{', v'.join(map(str, invoice.price_book_versions))}"
    )
    _out.print(_invoice_table(invoice))
    typer.echo(f"subtotal {_money(invoice.subtotal)}")
    typer.echo(f"credits  {_money(invoice.credits_applied)}")
    typer.echo(f"total    {_money(invoice.total)}")


@invoice_app.command("finalize")
def invoice_finalize(
    invoice_id: Annotated[str, typer.Argument(help="The draft invoice id.")],
    tenant: TenantOption = "",
) -> None:
    """Freeze a draft invoice (applying prepaid credit); it is immutable afterwards."""
    invoice = _run(lambda c, _: c.finalize_invoice(tenant, invoice_id))
    typer.echo(f"finalized {invoice.invoice_id}: total {_money(invoice.total)}")


@invoice_app.command("export")
def invoice_export(
    invoice_id: Annotated[str, typer.Argument(help="The invoice id.")],
    tenant: TenantOption = "",
    format: Annotated[str, typer.Option("--format", "-f", help="csv or json.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write ('-': standard output); default: its name.")
    ] = None,
) -> None:
    """Export an invoice as CSV or JSON."""
    kind = _choice(format, _FORMATS, "--format")
    exported = _run(lambda c, _: c.export_invoice(tenant, invoice_id, kind))
    if output is not None and str(output) == "-":
        typer.echo(exported.content.decode(), nl=False)
        return
    path = output or Path(exported.filename)
    if path.exists() and path.is_dir():
        raise InvalidArgument(f"{path} is a directory")
    path.write_bytes(exported.content)
    typer.echo(f"wrote {path} ({exported.content_type}, {len(exported.content)} bytes)")
