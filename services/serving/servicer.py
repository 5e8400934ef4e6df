"""ServingService RPCs: translation between protobuf messages and DeploymentsCore calls, nothing else."""

from __future__ import annotations

from grpc.aio import ServicerContext

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.serving.v1 import serving_service_pb2 as pb
from services.gen.aidc.serving.v1 import serving_service_pb2_grpc
from services.mesh.identity import require_principal, tenant_or_own
from services.mesh.messages import timestamp
from services.serving.core.deployments import DeploymentsCore, DeployRequest
from services.serving.core.model import DeploymentRecord, DeploymentState

__all__ = ["ServingServicer", "deployment_proto", "DEFAULT_MAX_BATCH_SIZE"]

#: Dynamic batching's largest batch when a Deploy request leaves max_batch_size unset.
DEFAULT_MAX_BATCH_SIZE = 8

_STATES = {
    DeploymentState.LOADING: pb.DEPLOYMENT_STATE_LOADING,
    DeploymentState.READY: pb.DEPLOYMENT_STATE_READY,
    DeploymentState.UPDATING: pb.DEPLOYMENT_STATE_UPDATING,
    DeploymentState.FAILED: pb.DEPLOYMENT_STATE_FAILED,
    DeploymentState.UNLOADING: pb.DEPLOYMENT_STATE_UNLOADING,
}


def deployment_proto(record: DeploymentRecord) -> pb.Deployment:
    return pb.Deployment(
        tenant=record.tenant,
        model=record.model,
        version=record.version,
        alias=record.alias,
        state=_STATES[record.state],
        target_version=record.target_version,
        triton_model_name=record.triton_name,
        last_error=record.last_error,
        last_error_time=timestamp(record.last_error_time),
        instance_count=record.instance_count,
        max_batch_size=record.max_batch_size,
        created_by=record.created_by,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
    )


class ServingServicer(serving_service_pb2_grpc.ServingServiceServicer):
    """Each RPC: unpack, call the core, pack."""

    def __init__(self, core: DeploymentsCore) -> None:
        self._core = core

    async def Deploy(self, request: pb.DeployRequest, context: ServicerContext) -> pb.DeployResponse:  # noqa: N802
        deploy = DeployRequest(
            tenant=tenant_or_own(request.tenant),
            model=request.model,
            version=request.version,
            alias=request.alias,
            instance_count=request.instance_count or 1,
            max_batch_size=request.max_batch_size if request.HasField("max_batch_size") else DEFAULT_MAX_BATCH_SIZE,
            wait=request.wait,
        )
        record = await self._core.deploy(deploy, require_principal().subject, context.time_remaining())
        return pb.DeployResponse(deployment=deployment_proto(record))

    async def Undeploy(self, request: pb.UndeployRequest, context: ServicerContext) -> pb.UndeployResponse:  # noqa: N802
        record = await self._core.undeploy(tenant_or_own(request.tenant), request.model)
        return pb.UndeployResponse(deployment=deployment_proto(record))

    async def ListDeployments(  # noqa: N802
        self, request: pb.ListDeploymentsRequest, context: ServicerContext
    ) -> pb.ListDeploymentsResponse:
        page = await self._core.list(tenant_or_own(request.tenant), request.page.page_size, request.page.page_token)
        return pb.ListDeploymentsResponse(
            deployments=[deployment_proto(r) for r in page.items],
            page=common_pb2.PageResponse(next_page_token=page.next_token),
        )

    async def GetDeployment(  # noqa: N802
        self, request: pb.GetDeploymentRequest, context: ServicerContext
    ) -> pb.GetDeploymentResponse:
        record = await self._core.get(tenant_or_own(request.tenant), request.model)
        return pb.GetDeploymentResponse(deployment=deployment_proto(record))
