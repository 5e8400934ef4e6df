"""The typed client of the training service (the CLI, the serving gateway and tests use it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.gen.aidc.training.v1 import training_service_pb2_grpc
from services.mesh.client import ServiceClient

__all__ = ["TrainingClient"]


class TrainingClient(ServiceClient):
    """Typed calls to TrainingService; errors arrive as services.mesh.errors types."""

    def __init__(self, channel: grpc.aio.Channel, **kwargs: float) -> None:
        # Submitting downloads and checks the dataset before answering: allow it time.
        kwargs.setdefault("timeout_seconds", 120.0)
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.stub = training_service_pb2_grpc.TrainingServiceStub(channel)

    # -- jobs --------------------------------------------------------------------------------------------

    async def submit_fine_tune(
        self, spec: pb.FineTuneSpec, tenant: str = "", request_id: str = "", timeout: float | None = None
    ) -> pb.Job:
        request = pb.SubmitFineTuneRequest(tenant=tenant, spec=spec, request_id=request_id)
        # Idempotent only with a request id: a retry then returns the first call's job.
        return (await self._unary(self.stub.SubmitFineTune, request, idempotent=bool(request_id), timeout=timeout)).job

    async def get_job(self, job_id: str, tenant: str = "") -> pb.Job:
        request = pb.GetJobRequest(tenant=tenant, job_id=job_id)
        return (await self._unary(self.stub.GetJob, request, idempotent=True)).job

    async def list_jobs(
        self,
        tenant: str = "",
        states: list[pb.JobState.ValueType] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[pb.Job], str]:
        request = pb.ListJobsRequest(
            tenant=tenant, states=states or [], page=common_pb2.PageRequest(page_size=page_size, page_token=page_token)
        )
        response = await self._unary(self.stub.ListJobs, request, idempotent=True)
        return list(response.jobs), response.page.next_page_token

    async def watch_job(
        self, job_id: str, tenant: str = "", after_sequence: int = 0, include_logs: bool = False
    ) -> AsyncIterator[pb.JobEvent]:
        """The job's events until it ends (no deadline: a fine-tune takes as long as it takes)."""
        request = pb.WatchJobRequest(
            tenant=tenant, job_id=job_id, after_sequence=after_sequence, include_logs=include_logs
        )
        async for response in self._server_stream(self.stub.WatchJob, request):
            yield response.event

    async def cancel_job(self, job_id: str, tenant: str = "", reason: str = "") -> pb.Job:
        request = pb.CancelJobRequest(tenant=tenant, job_id=job_id, reason=reason)
        return (await self._unary(self.stub.CancelJob, request, idempotent=True)).job

    # -- registry ----------------------------------------------------------------------------------------

    async def list_models(self, tenant: str = "") -> list[pb.Model]:
        """Every model of the tenant (all pages)."""
        found: list[pb.Model] = []
        token = ""
        while True:
            request = pb.ListModelsRequest(tenant=tenant, page=common_pb2.PageRequest(page_size=1000, page_token=token))
            response = await self._unary(self.stub.ListModels, request, idempotent=True)
            found.extend(response.models)
            token = response.page.next_page_token
            if not token:
                return found

    async def list_model_versions(self, model: str, tenant: str = "") -> list[pb.ModelVersion]:
        """Every version of a model, newest first."""
        found: list[pb.ModelVersion] = []
        token = ""
        while True:
            request = pb.ListModelVersionsRequest(
                tenant=tenant, model=model, page=common_pb2.PageRequest(page_size=1000, page_token=token)
            )
            response = await self._unary(self.stub.ListModelVersions, request, idempotent=True)
            found.extend(response.versions)
            token = response.page.next_page_token
            if not token:
                return found

    async def get_model_version(
        self, model: str, tenant: str = "", version: int = 0, alias: str = ""
    ) -> pb.ModelVersion:
        request = pb.GetModelVersionRequest(tenant=tenant, model=model, version=version, alias=alias)
        return (await self._unary(self.stub.GetModelVersion, request, idempotent=True)).version

    async def set_alias(self, model: str, alias: str, version: int, tenant: str = "") -> pb.Model:
        request = pb.SetAliasRequest(tenant=tenant, model=model, alias=alias, version=version)
        return (await self._unary(self.stub.SetAlias, request, idempotent=True)).model

    # -- base models -------------------------------------------------------------------------------------

    async def register_base_model(
        self, name: str, artifact_name: str, tenant: str = "", artifact_version: int = 0, description: str = ""
    ) -> pb.BaseModel:
        request = pb.RegisterBaseModelRequest(
            tenant=tenant,
            name=name,
            artifact_name=artifact_name,
            artifact_version=artifact_version,
            description=description,
        )
        return (await self._unary(self.stub.RegisterBaseModel, request, timeout=600.0)).base_model

    async def list_base_models(self, tenant: str = "") -> list[pb.BaseModel]:
        request = pb.ListBaseModelsRequest(tenant=tenant)
        return list((await self._unary(self.stub.ListBaseModels, request, idempotent=True)).base_models)
