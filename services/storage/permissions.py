"""The storage service's permission table: the rule of every RPC.

RPCs that act on one kind of object (a dataset or an artifact, named in the request) are decided by the core,
which checks ``datasets:<action>`` or ``artifacts:<action>`` in the request's tenant before looking anything up.
"""

from __future__ import annotations

from services.gen.aidc.storage.v1 import storage_service_pb2
from services.mesh.authz import PermissionTable, authenticated, tenant_rule

__all__ = ["PERMISSIONS"]

PERMISSIONS = PermissionTable.for_service(
    storage_service_pb2.DESCRIPTOR.services_by_name["StorageService"],
    {
        "CreateDataset": tenant_rule("datasets", "write"),
        "ListDatasets": tenant_rule("datasets", "read"),
        # datasets:write or artifacts:write, by header.kind (checked in the core).
        "Upload": authenticated(),
        # datasets:read or artifacts:read, by kind (checked in the core).
        "Download": authenticated(),
        "Stat": authenticated(),
        # Lists the kinds the caller may read; PERMISSION_DENIED if none (checked in the core).
        "List": authenticated(),
        # datasets:delete or artifacts:delete, by kind (checked in the core).
        "Delete": authenticated(),
        "RotateTenantKey": tenant_rule("keys", "rotate"),
        "DeleteTenantKeys": tenant_rule("keys", "delete"),
    },
)
