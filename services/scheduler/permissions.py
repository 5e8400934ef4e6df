"""The scheduler service's permission table: the rule of every RPC.

Tenants see and cancel only their own jobs (the request's tenant, else the caller's own; a job of another tenant is
NOT_FOUND). Quotas and pools are read in the tenant (as the tenant sees them) and written by platform admins only.
Requests with an empty tenant from platform admins and mesh services act across all tenants.
"""

from __future__ import annotations

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2
from services.mesh.authz import PermissionTable, mesh_only, platform_rule, tenant_rule

__all__ = ["PERMISSIONS"]

PERMISSIONS = PermissionTable.for_service(
    scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
    {
        # A job is a program run on the platform's machines: mesh services (training) submit them; tenants submit
        # fine-tunes through the training service.
        "SubmitJob": mesh_only(tenant_rule("jobs", "write")),
        "GetJob": tenant_rule("jobs", "read"),
        "ListJobs": tenant_rule("jobs", "read"),
        "WatchJobs": tenant_rule("jobs", "read"),
        "CancelJob": tenant_rule("jobs", "cancel"),
        "SetQuota": platform_rule("quotas", "write"),
        "GetQuota": tenant_rule("quotas", "read"),
        "ListPools": tenant_rule("pools", "read"),
        "CreatePool": platform_rule("pools", "write"),
        "UpdatePool": platform_rule("pools", "write"),
        "AddNode": platform_rule("pools", "write"),
        "UpdateNode": platform_rule("pools", "write"),
        "RemoveNode": platform_rule("pools", "write"),
    },
)
