"""TrainingService RPCs: translation between protobuf messages and TrainingCore calls, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.duration_pb2 import Duration
from grpc.aio import ServicerContext
from opentelemetry import propagate

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.gen.aidc.training.v1 import training_service_pb2_grpc
from services.mesh.errors import InvalidArgument
from services.mesh.identity import require_principal, tenant_or_own
from services.mesh.messages import timestamp
from services.training.core.model import (
    ArtifactEntry,
    BaseModelRecord,
    ComputeSpec,
    DatasetVersion,
    JobEvent,
    JobRecord,
    JobState,
    ModelRecord,
    ModelVersionRecord,
)
from services.training.core.registry import ModelRegistry
from services.training.core.service import TrainingCore
from services.training.runner.spec import FineTuneSpec

__all__ = ["TrainingServicer", "compute_from_proto", "spec_from_proto", "spec_to_proto"]

_STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.EXPORTING: pb.JOB_STATE_EXPORTING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLING: pb.JOB_STATE_CANCELLING,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_STATES_FROM_PB = {v: k for k, v in _STATES.items()}
_LEVELS = {"debug": pb.LOG_LEVEL_DEBUG, "info": pb.LOG_LEVEL_INFO, "warning": pb.LOG_LEVEL_WARNING}


def spec_from_proto(spec: pb.FineTuneSpec) -> tuple[FineTuneSpec, DatasetVersion, str]:
    """The runner's spec (base_model holding the name), the dataset asked for and the output model."""
    if spec.HasField("eval_dataset") and spec.eval_dataset.name:
        raise InvalidArgument("eval_dataset is not supported yet: leave it unset to hold out eval_fraction")
    values: dict[str, Any] = {"base_model": spec.base_model}
    task = spec.sequence_classification
    values["text_column"] = task.text_column or "text"
    values["label_column"] = task.label_column or "label"
    hp = spec.hyperparameters
    for name in (
        "epochs",
        "max_steps",
        "batch_size",
        "learning_rate",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_seq_length",
        "seed",
        "max_grad_norm",
        "eval_fraction",
    ):
        if hp.HasField(name):
            values[name] = getattr(hp, name)
    if spec.method == pb.TRAINING_METHOD_LORA:
        values["method"] = "lora"
        lora = spec.lora
        values["lora"] = {
            "r": lora.r or 8,
            "alpha": lora.alpha or 16,
            "dropout": lora.dropout if spec.HasField("lora") else 0.1,
            "target_modules": list(lora.target_modules) or ["query", "value"],
        }
    options = spec.options
    if options.mixed_precision == pb.MIXED_PRECISION_BF16:
        values["mixed_precision"] = "bf16"
    if options.HasField("differential_privacy"):
        dp = options.differential_privacy
        values["privacy"] = {
            "target_epsilon": dp.target_epsilon,
            "delta": dp.target_delta or 1e-5,
            "max_grad_norm": dp.max_grad_norm or 1.0,
        }
    if options.HasField("early_stopping"):
        stop = options.early_stopping
        if stop.min_delta:
            raise InvalidArgument("early_stopping.min_delta is not supported yet")
        values["early_stopping_metric"] = stop.metric or "accuracy"
        values["early_stopping_patience"] = stop.patience or 2
    values["int8_export"] = options.export.int8_quantization
    if options.export.HasField("parity_tolerance"):
        values["parity_tolerance"] = options.export.parity_tolerance
    try:
        runner = FineTuneSpec.from_dict(values)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    dataset = DatasetVersion(spec.dataset.name, spec.dataset.version)
    return runner, dataset, spec.output_model


def compute_from_proto(compute: pb.ComputeRequest) -> ComputeSpec:
    """What the job asks of the scheduler (defaults are the core's)."""
    duration = compute.max_run_duration
    return ComputeSpec(
        cpu_millicores=compute.cpu_millicores,
        memory_bytes=compute.memory_bytes,
        gpu_count=compute.gpu_count,
        gpu_type=compute.gpu_type,
        pool=compute.pool,
        priority=compute.priority,
        preemptible=compute.preemptible,
        max_run_seconds=duration.seconds + duration.nanos / 1e9,
    )


def _compute_to_proto(compute: ComputeSpec) -> pb.ComputeRequest:
    out = pb.ComputeRequest(
        cpu_millicores=compute.cpu_millicores,
        memory_bytes=compute.memory_bytes,
        gpu_count=compute.gpu_count,
        gpu_type=compute.gpu_type,
        priority=compute.priority,
        pool=compute.pool,
        preemptible=compute.preemptible,
    )
    if compute.max_run_seconds:
        out.max_run_duration.FromNanoseconds(int(compute.max_run_seconds * 1e9))
    return out


def _scheduler_state(name: str) -> scheduler_pb.JobState.ValueType:
    """A scheduler state's name ("queued", ...) as the scheduler's enum; unspecified for "" (not submitted yet)."""
    if not name:
        return scheduler_pb.JOB_STATE_UNSPECIFIED
    return scheduler_pb.JobState.Value(f"JOB_STATE_{name.upper()}")


def spec_to_proto(
    runner: dict[str, Any], base_model: str, dataset: DatasetVersion, output_model: str
) -> pb.FineTuneSpec:
    """The resolved spec of a job, every default filled in."""
    spec = FineTuneSpec.from_dict(runner)
    out = pb.FineTuneSpec(
        base_model=base_model,
        dataset=pb.DatasetRef(name=dataset.name, version=dataset.version),
        sequence_classification=pb.SequenceClassificationTask(
            text_column=spec.text_column, label_column=spec.label_column
        ),
        hyperparameters=pb.Hyperparameters(
            epochs=spec.epochs,
            max_steps=spec.max_steps,
            batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            warmup_steps=spec.warmup_steps,
            warmup_ratio=spec.warmup_ratio,
            weight_decay=spec.weight_decay,
            max_seq_length=spec.max_seq_length,
            seed=spec.seed,
            max_grad_norm=spec.max_grad_norm,
            eval_fraction=spec.eval_fraction,
        ),
        method=pb.TRAINING_METHOD_LORA if spec.method == "lora" else pb.TRAINING_METHOD_FULL,
        output_model=output_model,
    )
    if spec.method == "lora":
        out.lora.CopyFrom(
            pb.LoraConfig(
                r=spec.lora.r,
                alpha=spec.lora.alpha,
                dropout=spec.lora.dropout,
                target_modules=list(spec.lora.target_modules),
            )
        )
    options = out.options
    options.mixed_precision = pb.MIXED_PRECISION_BF16 if spec.mixed_precision == "bf16" else pb.MIXED_PRECISION_NONE
    if spec.privacy is not None:
        options.differential_privacy.CopyFrom(
            pb.DifferentialPrivacy(
                target_epsilon=spec.privacy.target_epsilon,
                target_delta=spec.privacy.delta,
                max_grad_norm=spec.privacy.max_grad_norm,
            )
        )
    if spec.early_stopping_patience is not None:
        options.early_stopping.CopyFrom(
            pb.EarlyStopping(metric=spec.early_stopping_metric, patience=spec.early_stopping_patience)
        )
    options.export.int8_quantization = spec.int8_export
    options.export.parity_tolerance = spec.effective_parity_tolerance
    return out


def _progress(data: dict[str, Any], spec: dict[str, Any]) -> pb.Progress:
    step, total = int(data.get("step", 0)), int(data.get("total_steps", 0))
    rate = float(data.get("examples_per_second") or 0.0)
    steps_per_second = rate / max(int(spec.get("batch_size", 1)), 1)
    eta = Duration()
    if steps_per_second > 0 and total > step:
        eta.FromNanoseconds(int((total - step) / steps_per_second * 1e9))
    return pb.Progress(
        step=step,
        total_steps=total,
        epoch=int(data.get("epoch", 0)),
        total_epochs=int(spec.get("epochs", 0)),
        examples_per_second=rate,
        train_loss=float(data.get("loss") or 0.0),
        learning_rate=float(data.get("learning_rate") or 0.0),
        eta=eta,
    )


def _metrics(data: dict[str, Any]) -> pb.Metrics:
    """An eval event ({epoch, step, metrics: {...}}) or a final metrics dict ({accuracy, ..., per_class})."""
    values = data.get("metrics", data)
    out = pb.Metrics(epoch=int(data.get("epoch", 0)), step=int(data.get("step", 0)))
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.values[key] = float(value)
    for label, report in (values.get("per_class") or {}).items():
        out.per_class.append(
            pb.ClassMetrics(
                label=label,
                precision=report.get("precision", 0.0),
                recall=report.get("recall", 0.0),
                f1=report.get("f1", 0.0),
                support=int(report.get("support", 0)),
            )
        )
    return out


def _job(job: JobRecord) -> pb.Job:
    out = pb.Job(
        tenant=job.tenant,
        job_id=job.job_id,
        spec=spec_to_proto(job.spec.runner, job.spec.base_model, job.spec.dataset, job.spec.output_model),
        state=_STATES[job.state],
        error=job.error,
        attempt=job.attempt,
        model=job.model,
        model_version=job.model_version,
        created_by=job.created_by,
        create_time=timestamp(job.created_at),
        start_time=timestamp(job.started_at),
        end_time=timestamp(job.ended_at),
        trace_id=job.trace_id,
        scheduler_job_id=job.scheduler_job_id,
        scheduler_state=_scheduler_state(job.scheduler_state),
        scheduler_reason=job.scheduler_reason,
        queue_position=max(job.queue_position, 0),
        preemptions=job.preemptions,
    )
    out.spec.compute.CopyFrom(_compute_to_proto(job.compute))
    if job.progress:
        out.progress.CopyFrom(_progress(job.progress, job.spec.runner))
    if job.metrics:
        out.latest_metrics.CopyFrom(_metrics(job.metrics))
    return out


def _event(event: JobEvent, spec: dict[str, Any]) -> pb.JobEvent:
    out = pb.JobEvent(job_id=event.job_id, sequence=event.sequence, time=timestamp(event.time))
    data = event.data
    if event.kind == "state":
        out.state_change.CopyFrom(
            pb.StateChange(
                from_state=_STATES[JobState(data["from"])] if data.get("from") else pb.JOB_STATE_UNSPECIFIED,
                to_state=_STATES[JobState(data["to"])],
                message=data.get("message", ""),
            )
        )
    elif event.kind == "progress":
        out.progress.CopyFrom(_progress(data, spec))
    elif event.kind == "metrics":
        out.metrics.CopyFrom(_metrics(data))
    elif event.kind == "scheduling":
        out.scheduling.CopyFrom(
            pb.SchedulingUpdate(
                scheduler_job_id=data.get("scheduler_job_id", ""),
                state=_scheduler_state(data.get("state", "")),
                reason=data.get("reason", ""),
                queue_position=max(int(data.get("queue_position", 0)), 0),
                attempt=int(data.get("attempt", 0)),
                nodes=list(data.get("nodes", [])),
            )
        )
    elif event.kind == "checkpoint":
        out.checkpoint.CopyFrom(
            pb.CheckpointSaved(
                epoch=int(data.get("epoch", 0)),
                step=int(data.get("step", 0)),
                artifact=pb.ArtifactRef(
                    role="checkpoint", name=data.get("name", ""), size_bytes=int(data.get("size_bytes", 0))
                ),
            )
        )
    else:
        out.log.CopyFrom(
            pb.LogLine(level=_LEVELS.get(data.get("level", ""), pb.LOG_LEVEL_ERROR), message=data.get("message", ""))
        )
    return out


def _artifact(a: ArtifactEntry) -> pb.ArtifactRef:
    return pb.ArtifactRef(role=a.role, name=a.name, version=a.version, size_bytes=a.size_bytes, sha256=a.sha256)


def _model(m: ModelRecord) -> pb.Model:
    return pb.Model(
        tenant=m.tenant,
        name=m.name,
        latest_version=m.latest_version,
        aliases=m.aliases,
        create_time=timestamp(m.created_at),
        update_time=timestamp(m.updated_at),
    )


def _version(v: ModelVersionRecord) -> pb.ModelVersion:
    lineage = v.lineage
    dataset = lineage.get("dataset", {})
    out = pb.ModelVersion(
        tenant=v.tenant,
        model=v.model,
        version=v.version,
        lineage=pb.Lineage(
            base_model=lineage.get("base_model", ""),
            base_model_sha256=lineage.get("base_model_sha256", ""),
            dataset=pb.DatasetRef(name=dataset.get("name", ""), version=int(dataset.get("version", 0))),
            dataset_sha256=lineage.get("dataset_sha256", ""),
            spec=spec_to_proto(
                lineage["spec"],
                lineage.get("base_model", ""),
                DatasetVersion(dataset.get("name", ""), int(dataset.get("version", 0))),
                v.model,
            ),
            code_version=lineage.get("code_version", ""),
            library_versions=lineage.get("library_versions", {}),
            job_id=lineage.get("job_id", ""),
        ),
        metrics=_metrics({"step": v.metrics.get("step", 0), "metrics": v.metrics}),
        labels=list(v.labels),
        int8_quantized=v.int8_quantized,
        artifacts=[_artifact(a) for a in v.artifacts],
        total_size_bytes=v.total_size_bytes,
        aliases=list(v.aliases),
        create_time=timestamp(v.created_at),
    )
    if v.privacy:
        out.privacy.CopyFrom(
            pb.PrivacyReport(
                epsilon_spent=float(v.privacy.get("epsilon", v.privacy.get("epsilon_spent", 0.0)) or 0.0),
                delta=float(v.privacy.get("delta", 0.0) or 0.0),
                noise_multiplier=float(v.privacy.get("noise_multiplier", 0.0) or 0.0),
                max_grad_norm=float(v.privacy.get("max_grad_norm", 0.0) or 0.0),
            )
        )
    if v.parity:
        out.export_parity.CopyFrom(
            pb.ExportParity(
                max_abs_logit_diff=float(v.parity.get("max_abs_diff", 0.0)),
                tolerance=float(v.parity.get("tolerance", 0.0)),
                examples_checked=int(v.parity.get("examples", 0)),
                passed=bool(v.parity.get("passed", False)),
            )
        )
    return out


def _base_model(b: BaseModelRecord) -> pb.BaseModel:
    out = pb.BaseModel(
        tenant=b.tenant,
        name=b.name,
        source=pb.BASE_MODEL_SOURCE_BUILTIN if b.builtin else pb.BASE_MODEL_SOURCE_TENANT,
        architecture=b.architecture,
        max_seq_length=b.max_seq_length,
        parameter_count=b.parameter_count,
        sha256=b.sha256,
        description=b.description,
        create_time=timestamp(b.created_at),
    )
    if b.artifact is not None:
        out.artifact.CopyFrom(_artifact(b.artifact))
    return out


class TrainingServicer(training_service_pb2_grpc.TrainingServiceServicer):
    """Each RPC: unpack, call the core, pack."""

    def __init__(self, core: TrainingCore, registry: ModelRegistry) -> None:
        self._core = core
        self._registry = registry

    async def SubmitFineTune(self, request: pb.SubmitFineTuneRequest, context: ServicerContext) -> Any:
        principal = require_principal()
        runner, dataset, output_model = spec_from_proto(request.spec)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        job = await self._core.submit(
            principal,
            tenant_or_own(request.tenant),
            runner,
            dataset,
            output_model,
            request.request_id,
            carrier,
            compute_from_proto(request.spec.compute),
        )
        return pb.SubmitFineTuneResponse(job=_job(job))

    async def GetJob(self, request: pb.GetJobRequest, context: ServicerContext) -> Any:
        return pb.GetJobResponse(job=_job(await self._core.job(tenant_or_own(request.tenant), request.job_id)))

    async def WatchJob(self, request: pb.WatchJobRequest, context: ServicerContext) -> AsyncIterator[Any]:
        tenant = tenant_or_own(request.tenant)
        job = await self._core.job(tenant, request.job_id)
        async for event in self._core.watch(tenant, request.job_id, request.after_sequence, request.include_logs):
            yield pb.WatchJobResponse(event=_event(event, job.spec.runner))

    async def CancelJob(self, request: pb.CancelJobRequest, context: ServicerContext) -> Any:
        job = await self._core.cancel(tenant_or_own(request.tenant), request.job_id, request.reason)
        return pb.CancelJobResponse(job=_job(job))

    async def ListJobs(self, request: pb.ListJobsRequest, context: ServicerContext) -> Any:
        unknown = [s for s in request.states if s not in _STATES_FROM_PB]
        if unknown:
            raise InvalidArgument(f"unknown job states {unknown}")
        states = frozenset(_STATES_FROM_PB[s] for s in request.states)
        page = await self._core.jobs(
            tenant_or_own(request.tenant), states, request.page.page_size, request.page.page_token
        )
        return pb.ListJobsResponse(
            jobs=[_job(j) for j in page.items], page=common_pb2.PageResponse(next_page_token=page.next_token)
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: ServicerContext) -> Any:
        page = await self._registry.models(
            tenant_or_own(request.tenant), request.page.page_size, request.page.page_token
        )
        return pb.ListModelsResponse(
            models=[_model(m) for m in page.items], page=common_pb2.PageResponse(next_page_token=page.next_token)
        )

    async def ListModelVersions(self, request: pb.ListModelVersionsRequest, context: ServicerContext) -> Any:
        page = await self._registry.model_versions(
            tenant_or_own(request.tenant), request.model, request.page.page_size, request.page.page_token
        )
        return pb.ListModelVersionsResponse(
            versions=[_version(v) for v in page.items], page=common_pb2.PageResponse(next_page_token=page.next_token)
        )

    async def GetModelVersion(self, request: pb.GetModelVersionRequest, context: ServicerContext) -> Any:
        version = await self._registry.model_version(
            tenant_or_own(request.tenant), request.model, request.version, request.alias
        )
        return pb.GetModelVersionResponse(version=_version(version))

    async def SetAlias(self, request: pb.SetAliasRequest, context: ServicerContext) -> Any:
        model = await self._registry.set_alias(
            tenant_or_own(request.tenant), request.model, request.alias, request.version
        )
        return pb.SetAliasResponse(model=_model(model))

    async def RegisterBaseModel(self, request: pb.RegisterBaseModelRequest, context: ServicerContext) -> Any:
        record = await self._registry.register_base_model(
            tenant_or_own(request.tenant),
            request.name,
            request.artifact_name,
            request.artifact_version,
            request.description,
        )
        return pb.RegisterBaseModelResponse(base_model=_base_model(record))

    async def ListBaseModels(self, request: pb.ListBaseModelsRequest, context: ServicerContext) -> Any:
        found = await self._registry.base_models(tenant_or_own(request.tenant))
        return pb.ListBaseModelsResponse(base_models=[_base_model(b) for b in found])
