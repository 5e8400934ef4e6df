"""The serving service's permission table for ServingService (the inference gateway's rules are in gateway.py)."""

from __future__ import annotations

from services.gen.aidc.serving.v1 import serving_service_pb2
from services.mesh.authz import PermissionTable, tenant_rule

__all__ = ["PERMISSIONS"]

PERMISSIONS = PermissionTable.for_service(
    serving_service_pb2.DESCRIPTOR.services_by_name["ServingService"],
    {
        # The version is resolved in the registry and fetched from storage with the caller's token, so
        # models:read and artifacts:read apply there too.
        "Deploy": tenant_rule("deployments", "write"),
        "Undeploy": tenant_rule("deployments", "write"),
        "ListDeployments": tenant_rule("deployments", "read"),
        "GetDeployment": tenant_rule("deployments", "read"),
    },
)
