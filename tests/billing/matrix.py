"""The billing service's rows of the authorization matrix (see tests/test_authorization_matrix.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.gen.aidc.common.v1 import common_pb2
from tests.billing.conftest import start_billing
from tests.conftest import RunningAuth
from tests.matrix_support import ADMINS, PLATFORM, ServiceUnderTest

SERVICE = "aidc.billing.v1.BillingService"
DESCRIPTOR = pb.DESCRIPTOR.services_by_name["BillingService"]

#: Roles with usage:read, budgets:read, invoices:read and pricebook:read in their tenant.
USAGE_READERS = frozenset({"tenant-admin", "developer", "billing-viewer", "platform-admin"})
BUDGET_READERS = frozenset({"tenant-admin", "billing-viewer", "platform-admin"})
INVOICE_READERS = BUDGET_READERS
PRICEBOOK_READERS = USAGE_READERS

# Who may call each RPC on their own tenant (the platform admin acts on every tenant). Tenants never write
# their own usage, prices, credit or invoices; mesh services (not a tenant role) record usage and check budgets.
EXPECTED: dict[str, frozenset[str]] = {
    "RecordUsage": PLATFORM,
    "QueryUsage": USAGE_READERS,
    "GetUsageEvent": USAGE_READERS,
    "SetPriceBook": PLATFORM,
    "GetPriceBook": PRICEBOOK_READERS,
    "SetTenantPlan": PLATFORM,
    "CheckBudget": BUDGET_READERS,
    "SetBudget": ADMINS,
    "GrantCredit": PLATFORM,
    "GetBalance": BUDGET_READERS,
    "ListBudgetAlerts": BUDGET_READERS,
    "CreateInvoice": PLATFORM,
    "GetInvoice": INVOICE_READERS,
    "ListInvoices": INVOICE_READERS,
    "FinalizeInvoice": PLATFORM,
    "ExportInvoice": INVOICE_READERS,
}

#: RPCs whose decision does not depend on the tenant named in the request (platform-scoped rules).
TENANT_FREE = {"SetPriceBook", "SetTenantPlan", "GrantCredit"}

_counter = itertools.count()


def build_request(rpc: str, tenant: str) -> Any:
    """A well-formed request for a billing RPC that names ``tenant``."""
    n = next(_counter)
    event = pb.UsageEvent(id=f"m{n}", source="serving", tenant=tenant, meter="inference_requests", quantity="1")
    event.time.FromNanoseconds(time.time_ns())
    usd = common_pb2.Money(micros=1_000_000, currency="USD")
    requests: dict[str, Callable[[], Any]] = {
        "RecordUsage": lambda: pb.RecordUsageRequest(tenant=tenant, events=[event]),
        "QueryUsage": lambda: pb.QueryUsageRequest(tenant=tenant, meter="inference_requests"),
        "GetUsageEvent": lambda: pb.GetUsageEventRequest(tenant=tenant, source="serving", id="none"),
        "SetPriceBook": lambda: pb.SetPriceBookRequest(tenant=tenant, price_book=pb.PriceBook(currency="USD")),
        "GetPriceBook": lambda: pb.GetPriceBookRequest(tenant=tenant),
        "SetTenantPlan": lambda: pb.SetTenantPlanRequest(tenant=tenant, plan="on-demand"),
        "CheckBudget": lambda: pb.CheckBudgetRequest(tenant=tenant, estimated_cost=usd),
        "SetBudget": lambda: pb.SetBudgetRequest(tenant=tenant, monthly_limit=usd),
        "GrantCredit": lambda: pb.GrantCreditRequest(tenant=tenant, grant_id=f"g{n}", amount=usd),
        "GetBalance": lambda: pb.GetBalanceRequest(tenant=tenant),
        "ListBudgetAlerts": lambda: pb.ListBudgetAlertsRequest(tenant=tenant),
        "CreateInvoice": lambda: pb.CreateInvoiceRequest(tenant=tenant),
        "GetInvoice": lambda: pb.GetInvoiceRequest(tenant=tenant, invoice_id="inv_none"),
        "ListInvoices": lambda: pb.ListInvoicesRequest(tenant=tenant),
        "FinalizeInvoice": lambda: pb.FinalizeInvoiceRequest(tenant=tenant, invoice_id="inv_none"),
        "ExportInvoice": lambda: pb.ExportInvoiceRequest(
            tenant=tenant, invoice_id="inv_none", format=pb.EXPORT_FORMAT_CSV
        ),
    }
    return requests[rpc]()


@asynccontextmanager
async def serve(auth: RunningAuth, tmp_path: Path) -> AsyncIterator[str]:
    """The billing service in-process, on its own port, trusting the running auth service."""
    running = await start_billing(auth, tmp_path / "billing-matrix")
    try:
        yield running.address
    finally:
        await running.server.stop(0)


#: What only mesh services call (refused on the tenant path to everyone).
MESH_ONLY = frozenset({"RecordUsage"})

UNDER_TEST = ServiceUnderTest(SERVICE, DESCRIPTOR, EXPECTED, TENANT_FREE, build_request, serve, MESH_ONLY)
