"""The billing service's permission table: the rule of every RPC.

Requests with an empty tenant are checked in the caller's own tenant; for platform admins and mesh services
that is the platform scope, where an empty tenant means "every tenant" (RecordUsage, QueryUsage) or the default
price book (GetPriceBook).
"""

from __future__ import annotations

from services.gen.aidc.billing.v1 import billing_service_pb2
from services.mesh.authz import PermissionTable, mesh_only, platform_rule, tenant_rule

__all__ = ["PERMISSIONS"]

PERMISSIONS = PermissionTable.for_service(
    billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"],
    {
        # Mesh services (role "service") and platform admins on the mesh path; no tenant role may write its own usage.
        "RecordUsage": mesh_only(tenant_rule("usage", "write")),
        "QueryUsage": tenant_rule("usage", "read"),
        "GetUsageEvent": tenant_rule("usage", "read"),
        "SetPriceBook": platform_rule("pricebook", "write"),
        "GetPriceBook": tenant_rule("pricebook", "read"),
        "SetTenantPlan": platform_rule("pricebook", "write"),
        # The scheduler and the gateway ask as themselves (budgets:read in the platform scope).
        "CheckBudget": tenant_rule("budgets", "read"),
        "SetBudget": tenant_rule("budgets", "write"),
        "GrantCredit": platform_rule("invoices", "write"),
        "GetBalance": tenant_rule("budgets", "read"),
        "ListBudgetAlerts": tenant_rule("budgets", "read"),
        "CreateInvoice": tenant_rule("invoices", "write"),
        "GetInvoice": tenant_rule("invoices", "read"),
        "ListInvoices": tenant_rule("invoices", "read"),
        "FinalizeInvoice": tenant_rule("invoices", "write"),
        "ExportInvoice": tenant_rule("invoices", "read"),
    },
)
