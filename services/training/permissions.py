"""The training service's permission table: the rule of every RPC."""

from __future__ import annotations

from services.gen.aidc.training.v1 import training_service_pb2
from services.mesh.authz import PermissionTable, tenant_rule

__all__ = ["PERMISSIONS"]

PERMISSIONS = PermissionTable.for_service(
    training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
    {
        # The dataset is read from storage with the caller's token, so datasets:read applies there too.
        "SubmitFineTune": tenant_rule("jobs", "write"),
        "GetJob": tenant_rule("jobs", "read"),
        "WatchJob": tenant_rule("jobs", "read"),
        "CancelJob": tenant_rule("jobs", "cancel"),
        "ListJobs": tenant_rule("jobs", "read"),
        "ListModels": tenant_rule("models", "read"),
        "ListModelVersions": tenant_rule("models", "read"),
        "GetModelVersion": tenant_rule("models", "read"),
        "SetAlias": tenant_rule("models", "write"),
        # The artifact is read from storage with the caller's token (artifacts:read there).
        "RegisterBaseModel": tenant_rule("models", "write"),
        "ListBaseModels": tenant_rule("models", "read"),
    },
)
