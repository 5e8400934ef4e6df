"""Invoice assembly (usage lines, commitment shortfall, credit, totals) and the CSV export."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

from services.billing.core.model import Invoice, InvoiceLine, InvoiceState, LineKind, Plan, PlanKind
from services.billing.core.periods import month_label
from services.billing.core.pricing import PricedLine, describe_match
from services.billing.core.quantities import format_micros, format_nanos

__all__ = ["CreditUse", "assemble_invoice", "invoice_id_for", "invoice_csv", "line_key"]


@dataclass(frozen=True)
class CreditUse:
    """Prepaid credit of one grant applied to an invoice."""

    grant_id: str
    amount_micros: int


def invoice_id_for(tenant: str, period_start_ns: int) -> str:
    """One invoice per tenant and month, so the id is derived from both: "inv_2025-01_acme"."""
    return f"inv_{month_label(period_start_ns)}_{tenant}"


def line_key(line: InvoiceLine) -> tuple[str, int, str, tuple[tuple[str, str], ...], int]:
    """What identifies a usage line across recomputations: book, version, meter, match, tier."""
    return (line.book, line.version, line.meter, line.match, line.tier_index)


def assemble_invoice(
    *,
    tenant: str,
    period_start_ns: int,
    period_end_ns: int,
    currency: str,
    plan: Plan,
    priced: Sequence[PricedLine],
    credits: Sequence[CreditUse] = (),
    state: InvoiceState = InvoiceState.DRAFT,
    create_ns: int,
    finalize_ns: int | None = None,
) -> Invoice:
    """Lines in order (usage, shortfall, credit) with sequential ids; totals are sums of the rounded lines."""
    lines: list[InvoiceLine] = []

    def next_id() -> str:
        return f"L{len(lines) + 1:03d}"

    for item in priced:
        lines.append(
            InvoiceLine(
                line_id=next_id(),
                kind=LineKind.USAGE,
                amount_micros=item.amount_micros,
                description=item.description(),
                meter=item.meter,
                match=item.match,
                tier_index=item.segment.tier_index,
                quantity_nanos=item.quantity_nanos,
                unit_price_micros=item.segment.unit_price_micros,
                price_per_quantity_nanos=item.segment.price_per_quantity_nanos,
                event_count=item.event_count,
                book=item.book,
                version=item.version,
            )
        )
    usage = sum(line.amount_micros for line in lines)
    if plan.kind is PlanKind.COMMITTED and usage < plan.monthly_commitment_micros:
        shortfall = plan.monthly_commitment_micros - usage
        lines.append(
            InvoiceLine(
                line_id=next_id(),
                kind=LineKind.COMMITMENT_SHORTFALL,
                amount_micros=shortfall,
                description=(
                    f"plan {plan.name}: monthly commitment {format_micros(plan.monthly_commitment_micros)} "
                    f"{currency} minus usage {format_micros(usage)} {currency}"
                ),
            )
        )
    subtotal = sum(line.amount_micros for line in lines)
    for use in credits:
        lines.append(
            InvoiceLine(
                line_id=next_id(),
                kind=LineKind.CREDIT,
                amount_micros=-use.amount_micros,
                description=f"prepaid credit, grant {use.grant_id}",
            )
        )
    credit_total = -sum(use.amount_micros for use in credits)
    return Invoice(
        invoice_id=invoice_id_for(tenant, period_start_ns),
        tenant=tenant,
        period_start_ns=period_start_ns,
        period_end_ns=period_end_ns,
        state=state,
        currency=currency,
        plan=plan.name,
        versions=tuple(sorted({line.version for line in lines if line.kind is LineKind.USAGE})),
        lines=tuple(lines),
        subtotal_micros=subtotal,
        credits_micros=credit_total,
        total_micros=subtotal + credit_total,
        create_ns=create_ns,
        finalize_ns=finalize_ns,
    )


_CSV_HEADER = [
    "invoice_id",
    "line_id",
    "kind",
    "meter",
    "match",
    "tier",
    "quantity",
    "unit_price",
    "price_per_quantity",
    "amount",
    "currency",
    "event_count",
    "price_book_version",
    "description",
]


def invoice_csv(invoice: Invoice) -> str:
    """One row per line with a header, then subtotal, credits_applied and total rows (amounts exact, 6 decimals)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_HEADER)

    def money(micros: int) -> str:
        return format_micros(micros, min_decimals=6)

    for line in invoice.lines:
        usage = line.kind is LineKind.USAGE
        writer.writerow(
            [
                invoice.invoice_id,
                line.line_id,
                line.kind.value,
                line.meter,
                describe_match(line.match) if usage else "",
                ("free" if line.tier_index < 0 else line.tier_index + 1) if usage else "",
                format_nanos(line.quantity_nanos) if usage else "",
                money(line.unit_price_micros) if usage else "",
                format_nanos(line.price_per_quantity_nanos) if usage else "",
                money(line.amount_micros),
                invoice.currency,
                line.event_count if usage else "",
                line.version if usage else "",
                line.description,
            ]
        )
    for label, micros in (
        ("subtotal", invoice.subtotal_micros),
        ("credits_applied", invoice.credits_micros),
        ("total", invoice.total_micros),
    ):
        writer.writerow([invoice.invoice_id, label, "", "", "", "", "", "", "", money(micros), invoice.currency])
    return out.getvalue()
