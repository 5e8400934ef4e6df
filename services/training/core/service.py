"""TrainingCore: fine-tune jobs (validate, queue, launch the runner, relay its events, publish its result), base
models and the model registry. Pure Python: storage, the executor, billing and the jobs' credentials come in through
Protocols."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import services
from services.mesh.errors import AidcError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.mesh.files import private_dir, private_tar_member
from services.mesh.identity import Principal, current_principal
from services.mesh.interceptors import current_deadline
from services.training.core.catalog import BaseModelCatalog, describe_model_dir
from services.training.core.executor import ExecutionHandle, Executor, runner_environment
from services.training.core.model import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    ArtifactEntry,
    BaseModelRecord,
    DatasetVersion,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    ModelRecord,
    ModelVersionRecord,
)
from services.training.metrics import TrainingMetrics
from services.training.runner.data import LocalFileSource
from services.training.runner.preflight import InvalidJob, prepare
from services.training.runner.spec import FineTuneSpec
from services.training.store import TrainingStore

__all__ = ["ArtifactGateway", "JobCredentials", "JobOptions", "Page", "TrainingCore", "UsageSink", "RUN_DIR"]

log = logging.getLogger(__name__)

#: The runner's --job-dir inside a job's directory (its artifact store: only what the runner writes).
RUN_DIR = "run"
_RESULT = "result.json"
_EXIT_OK, _EXIT_INVALID, _EXIT_PARITY, _EXIT_CANCELLED = 0, 2, 3, 130
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[a-z0-9-]{1,40}$")
_REPO_ROOT = Path(services.__file__).resolve().parent.parent


class ArtifactGateway(Protocol):
    """What the core needs from the storage service, acting for the tenant (the caller's identity when there is
    one, else the service's own)."""

    async def fetch_dataset(self, tenant: str, name: str, version: int, target: Path) -> tuple[DatasetVersion, str]:
        """Downloads a dataset version into ``target``; the resolved version and its format ("csv"/"jsonl")."""
        ...

    async def fetch_artifact(self, tenant: str, name: str, version: int, target: Path) -> ArtifactEntry:
        """Downloads an artifact version into ``target``."""
        ...

    async def put_artifact(self, tenant: str, name: str, source: Path, role: str) -> ArtifactEntry:
        """Uploads ``source`` as a new version of artifact ``name``."""
        ...


class JobCredentials(Protocol):
    """How a job acts for its submitter for as long as it runs — not with the submitter's token, which expires long
    before a fine-tune may end, and never as the training service itself: a delegation from the submitter, bound to
    the job and its tenant, made at submission, kept with the job (sealed), revoked when the job ends."""

    async def delegate(self, tenant: str, job_id: str) -> bytes:
        """A delegation for the job from the caller of the RPC being served (the submitter), sealed for storage."""
        ...

    async def act_for(self, job_id: str, sealed: bytes) -> Principal:
        """The submitter acting in the job's tenant, with a current access token."""
        ...

    async def end(self, job_id: str, sealed: bytes) -> None:
        """Revokes the delegation."""
        ...


class UsageSink(Protocol):
    """Where usage goes (billing's UsageEmitter)."""

    def emit(
        self,
        meter: str,
        quantity: str | int | Decimal,
        *,
        tenant: str,
        id: str,
        time_ns: int | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class JobOptions:
    """How the core runs jobs."""

    jobs_dir: Path
    base_models_dir: Path
    max_concurrent_jobs: int = 1
    progress_interval_seconds: float = 2.0
    runner_threads: int = 0
    code_version: str = ""


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_token: str


def _now() -> datetime:
    return datetime.now(UTC)


def _offset(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidArgument("invalid page token")
    return int(token)


def _limit(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(page_size or 100, 1000)


class TrainingCore:
    """Jobs, their runners, base models and the registry."""

    def __init__(
        self,
        store: TrainingStore,
        catalog: BaseModelCatalog,
        artifacts: ArtifactGateway,
        executor: Executor,
        options: JobOptions,
        usage: UsageSink | None = None,
        *,
        credentials: JobCredentials,
        metrics: TrainingMetrics | None = None,
    ) -> None:
        self._metrics = metrics or TrainingMetrics()
        self._store = store
        self._credentials = credentials
        self._catalog = catalog
        self._artifacts = artifacts
        self._executor = executor
        self._options = options
        self._usage = usage
        self._slots = asyncio.Semaphore(options.max_concurrent_jobs)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._handles: dict[str, ExecutionHandle] = {}
        self._live: dict[str, JobRecord] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._save_lock = asyncio.Lock()
        self._stopping = False

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await self._store.db.run(fn, *args)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Relaunches the jobs a previous instance left active (runners resume from their checkpoints; each acts for
        its submitter through its stored delegation), and revokes delegations of ended jobs that were not yet."""
        for job in await self._db(self._store.jobs_in, ACTIVE_STATES):
            if job.job_id not in self._tasks:
                log.info("job %s: resuming after a restart (was %s)", job.job_id, job.state.value)
                self._launch(job)
        for job_id in await self._db(self._store.ended_jobs_with_credentials, TERMINAL_STATES):
            await self._end_credentials(job_id)
        return True

    async def close(self) -> None:
        """Stops every runner (they checkpoint); their jobs stay active and resume when the service restarts."""
        self._stopping = True
        for handle in list(self._handles.values()):
            handle.terminate()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        for task in tasks:
            task.cancel()

    # -- jobs ------------------------------------------------------------------------------------------------

    async def submit(
        self,
        principal: Principal,
        tenant: str,
        spec: FineTuneSpec,
        dataset: DatasetVersion,
        output_model: str,
        request_id: str = "",
        trace_carrier: Mapping[str, str] | None = None,
    ) -> JobRecord:
        """Validates everything (base model, dataset, columns, hyperparameters) and queues the job; InvalidArgument
        before any compute is spent."""
        if not _MODEL_NAME.match(output_model):
            raise InvalidArgument("output_model must be 1-128 lowercase letters, digits, '.', '_' or '-'")
        if not dataset.name:
            raise InvalidArgument("dataset.name is required")
        if request_id:
            for job in await self._db(self._store.jobs, tenant):
                if job.request_id == request_id:
                    return job
        base = await self.base_model(tenant, spec.base_model)
        job_id = uuid.uuid4().hex
        job_dir = private_dir(self._options.jobs_dir / job_id)
        try:
            try:
                resolved, fmt = await self._artifacts.fetch_dataset(
                    tenant, dataset.name, dataset.version, job_dir / "dataset.tmp"
                )
            except NotFound as exc:
                raise InvalidArgument(f"unknown dataset {dataset.name!r}: {exc.message}") from None
            data_path = job_dir / f"dataset.{fmt}"
            (job_dir / "dataset.tmp").rename(data_path)
            runner_spec = replace(spec, base_model=base.path)
            try:
                prepared = await asyncio.to_thread(prepare, runner_spec, LocalFileSource(data_path))
            except InvalidJob as exc:
                raise InvalidArgument(str(exc)) from None
            (job_dir / "spec.json").write_text(json.dumps(runner_spec.to_dict(), indent=2))
            # The job outlives this call and the submitter's token: it acts for the submitter through a delegation.
            credential = await self._credentials.delegate(tenant, job_id)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        resolved = replace(resolved, sha256=prepared.dataset.sha256, rows=len(prepared.dataset.examples))
        job = JobRecord(
            tenant=tenant,
            job_id=job_id,
            spec=JobSpec(spec.base_model, resolved, output_model, spec.to_dict()),
            state=JobState.QUEUED,
            created_by=principal.subject,
            created_at=_now(),
            request_id=request_id,
            trace_carrier=dict(trace_carrier or {}),
            base_model_path=base.path,
            base_model_sha256=base.sha256,
        )
        try:
            stored = await self._db(self._store.create_job, job, credential)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            await self._end_credentials(job_id, credential)
            raise
        if stored.job_id != job_id:  # a concurrent retry with the same request id won
            shutil.rmtree(job_dir, ignore_errors=True)
            await self._end_credentials(job_id, credential)
            return stored  # type: ignore[no-any-return]
        await self._event(job, "state", {"from": "", "to": JobState.QUEUED.value, "message": "queued"})
        self._launch(job)
        return job

    async def job(self, tenant: str, job_id: str) -> JobRecord:
        live = self._live.get(job_id)
        job = live if live is not None else await self._db(self._store.job, job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"job {job_id!r} not found")
        return job  # type: ignore[no-any-return]

    async def jobs(self, tenant: str, states: frozenset[JobState], page_size: int, page_token: str) -> Page:
        offset, limit = _offset(page_token), _limit(page_size)
        found: list[JobRecord] = await self._db(self._store.jobs, tenant, states, offset, limit + 1)
        found = [self._live.get(j.job_id, j) for j in found]
        return Page(found[:limit], str(offset + limit) if len(found) > limit else "")

    async def cancel(self, tenant: str, job_id: str, reason: str = "") -> JobRecord:
        """Cancels a job: a queued one at once, a running one by stopping its runner. Terminal jobs: a no-op."""
        job = await self.job(tenant, job_id)
        if job.state in TERMINAL_STATES or job.cancel_requested:
            return job
        job.cancel_requested = True
        message = f"cancelled: {reason}" if reason else "cancelled by request"
        job.error = message
        handle = self._handles.get(job_id)
        if handle is not None:
            await self._set_state(job, JobState.CANCELLING, message)
            handle.terminate()
        else:
            # Not launched yet: the job's task sees the flag when it gets a slot and never starts the runner.
            await self._finish(job, JobState.CANCELLED, message)
        return job

    async def watch(self, tenant: str, job_id: str, after: int, include_logs: bool) -> AsyncIterator[JobEvent]:
        """The job's events after ``after``, then live ones; ends after the event of its terminal state."""
        await self.job(tenant, job_id)
        condition = self._changed.setdefault(job_id, asyncio.Condition())
        while True:
            # Read before the events: a job that reads as terminal already has its terminal event stored.
            terminal = (await self.job(tenant, job_id)).state in TERMINAL_STATES
            events: list[JobEvent] = await self._db(self._store.events, job_id, after)
            for event in events:
                after = event.sequence
                if event.kind == "log" and not include_logs:
                    continue
                yield event
                if event.kind == "state" and JobState(event.data["to"]) in TERMINAL_STATES:
                    return
            if events:
                continue
            if terminal:
                return
            async with condition:
                try:
                    await asyncio.wait_for(condition.wait(), timeout=1.0)
                except TimeoutError:
                    pass

    # -- running ---------------------------------------------------------------------------------------------

    def _launch(self, job: JobRecord) -> None:
        self._live[job.job_id] = job
        task = asyncio.create_task(self._run(job), name=f"training-job-{job.job_id}")
        self._tasks[job.job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.job_id, None))

    async def _run(self, job: JobRecord) -> None:
        # The job outlives the SubmitFineTune call that launched it: it must not inherit that call's caller (whose
        # token expires) nor its deadline (every storage call would fail DEADLINE_EXCEEDED). What it does in storage
        # it does for its submitter, through its delegation (_publish).
        current_principal.set(None)
        current_deadline.set(None)
        try:
            async with self._slots:
                if job.state in TERMINAL_STATES or self._stopping:
                    return
                if job.cancel_requested or job.state is JobState.CANCELLING:
                    await self._finish(job, JobState.CANCELLED, "cancelled before the runner started")
                    return
                code, cpu = await self._run_runner(job)
            await self._conclude(job, code, cpu)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s failed in the service", job.job_id)
            await self._finish(job, JobState.FAILED, f"internal error: {type(exc).__name__}")
        finally:
            if job.state in TERMINAL_STATES or not self._stopping:
                self._live.pop(job.job_id, None)

    async def _run_runner(self, job: JobRecord) -> tuple[int, float]:
        job_dir = self._options.jobs_dir / job.job_id
        data_path = next(job_dir.glob("dataset.*"))
        job.attempt += 1
        job.started_at = job.started_at or _now()
        await self._set_state(job, JobState.RUNNING, f"runner started (attempt {job.attempt})")
        argv = [
            sys.executable,
            "-m",
            "services.training.runner",
            "--job-dir",
            str(job_dir / RUN_DIR),
            "--spec",
            str(job_dir / "spec.json"),
            "--dataset",
            str(data_path),
            "--progress-interval",
            str(self._options.progress_interval_seconds),
        ]
        env = {"PYTHONPATH": str(_REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.update({k.upper(): v for k, v in job.trace_carrier.items()})
        if self._options.runner_threads:
            env["OMP_NUM_THREADS"] = str(self._options.runner_threads)
        handle = await self._executor.submit(job.job_id, argv, runner_environment(env), job_dir)
        self._handles[job.job_id] = handle
        try:
            if job.cancel_requested:
                handle.terminate()
            async for line in handle.lines():
                await self._relay(job, line)
            code = await handle.wait()
        finally:
            self._handles.pop(job.job_id, None)
        return code, handle.cpu_seconds()

    async def _relay(self, job: JobRecord, line: str) -> None:
        """One stdout line of the runner -> the job's record and history."""
        try:
            record = json.loads(line)
            kind = record.pop("event")
            record.pop("time", None)
        except (ValueError, KeyError, AttributeError):
            await self._event(job, "log", {"level": "info", "message": line[:2000]})
            return
        if kind == "progress":
            self._metrics.progress(job.progress, record)
            job.progress = record
            await self._save(job)
            await self._event(job, "progress", record)
        elif kind == "eval":
            job.metrics = record
            await self._save(job)
            await self._event(job, "metrics", record)
        elif kind == "checkpoint":
            await self._event(job, "checkpoint", record)
        elif kind == "log":
            await self._event(job, "log", {"level": record.get("level", "info"), "message": record.get("message", "")})
        elif kind == "state":
            state = record.get("state", "")
            if state == "exporting" and job.state is JobState.RUNNING:
                await self._set_state(job, JobState.EXPORTING, "training finished; exporting")
            elif state == "failed":
                job.error = str(record.get("message", "")) or "the runner failed"
                await self._save(job)
            await self._event(job, "log", {"level": "info", "message": f"runner: {state}"})

    async def _conclude(self, job: JobRecord, code: int, cpu_seconds: float) -> None:
        self._report_usage(job, cpu_seconds)
        if code == _EXIT_OK:
            if job.state is not JobState.EXPORTING:
                await self._set_state(job, JobState.EXPORTING, "publishing the export")
            try:
                version = await self._publish(job)
            except Exception as exc:
                log.exception("job %s: publishing its result failed", job.job_id)
                message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
                await self._finish(job, JobState.FAILED, f"publishing the model failed: {message}")
                return
            job.model, job.model_version = version.model, version.version
            await self._finish(job, JobState.SUCCEEDED, f"registered {version.model} version {version.version}")
        elif code == _EXIT_CANCELLED and job.cancel_requested:
            await self._finish(job, JobState.CANCELLED, job.error or "cancelled")
        elif code == _EXIT_CANCELLED and self._stopping:
            await self._event(job, "log", {"level": "info", "message": "service stopping: the runner checkpointed"})
        elif code == _EXIT_INVALID:
            await self._finish(job, JobState.FAILED, f"invalid job: {job.error}")
        elif code == _EXIT_PARITY:
            await self._finish(job, JobState.FAILED, f"parity check failed: {job.error}")
        else:
            await self._finish(job, JobState.FAILED, job.error or f"the runner exited with code {code}")

    def _report_usage(self, job: JobRecord, cpu_seconds: float) -> None:
        if self._usage is None or cpu_seconds <= 0:
            return
        job.cpu_seconds += cpu_seconds
        self._usage.emit(
            "cpu_core_seconds",
            Decimal(str(round(cpu_seconds, 3))),
            tenant=job.tenant,
            id=f"training-job-{job.job_id}-attempt-{job.attempt}",
            attributes={"job": job.job_id},
        )

    async def _publish(self, job: JobRecord) -> ModelVersionRecord:
        """Uploads the export, tokenizer and TensorBoard events as the tenant's artifacts; registers the version."""
        run_dir = self._options.jobs_dir / job.job_id / RUN_DIR
        result = json.loads((run_dir / _RESULT).read_text())
        prefix = f"training/{job.job_id}"
        uploads: list[tuple[str, str, Path]] = [
            ("model", f"{prefix}/model.pt", run_dir / "export" / "model.pt"),
            ("model_config", f"{prefix}/model_config.json", run_dir / "export" / "model_config.json"),
            ("labels", f"{prefix}/labels.json", run_dir / "export" / "labels.json"),
        ]
        packed = self._options.jobs_dir / job.job_id / "packed"
        packed.mkdir(exist_ok=True)
        for role, directory in (
            ("tokenizer", run_dir / "export" / "tokenizer"),
            ("tensorboard", run_dir / "tensorboard"),
        ):
            if directory.is_dir():
                archive = packed / f"{role}.tar.gz"
                await asyncio.to_thread(_tar, directory, archive)
                uploads.append((role, f"{prefix}/{role}.tar.gz", archive))
        artifacts = []
        for role, name, path in uploads:
            acting = current_principal.set(await self._submitter(job))  # a current token for each upload
            try:
                artifacts.append(await self._artifacts.put_artifact(job.tenant, name, path, role))
            finally:
                current_principal.reset(acting)
        export = result.get("export") or {}
        environment = result.get("environment") or {}
        lineage = {
            "base_model": job.spec.base_model,
            "base_model_sha256": job.base_model_sha256,
            "dataset": {"name": job.spec.dataset.name, "version": job.spec.dataset.version},
            "dataset_sha256": result["dataset"]["sha256"],
            "spec": job.spec.runner,
            "code_version": self._options.code_version,
            "library_versions": {k: str(v) for k, v in environment.items() if v},
            "job_id": job.job_id,
        }
        record = ModelVersionRecord(
            tenant=job.tenant,
            model=job.spec.output_model,
            version=0,
            lineage=lineage,
            metrics={**result.get("metrics", {}), "step": result.get("training", {}).get("steps", 0)},
            labels=tuple(result.get("labels", [])),
            privacy=result.get("privacy"),
            parity=export.get("parity") or {},
            int8_quantized=bool(export.get("quantization")) and export.get("quantization") != "none",
            artifacts=tuple(artifacts),
            created_at=_now(),
        )
        return await self._db(self._store.add_model_version, record)  # type: ignore[no-any-return]

    # -- acting for the submitter -----------------------------------------------------------------------------

    async def _submitter(self, job: JobRecord) -> Principal:
        """The job's submitter, acting in the job's tenant through the job's delegation."""
        sealed = await self._db(self._store.job_credential, job.job_id)
        if sealed is None:
            raise FailedPrecondition("the job holds no delegation from its submitter: resubmit it")
        return await self._credentials.act_for(job.job_id, sealed)

    async def _end_credentials(self, job_id: str, sealed: bytes | None = None) -> None:
        """Revokes the job's delegation. If auth does not answer, the record stays and the next start tries again
        (the delegation expires on its own in any case)."""
        if sealed is None:
            sealed = await self._db(self._store.job_credential, job_id)
            if sealed is None:
                return
        try:
            await self._credentials.end(job_id, sealed)
        except AidcError as exc:
            log.warning("job %s: could not revoke its delegation (%s); will retry at the next start", job_id, exc)
            return
        await self._db(self._store.drop_job_credential, job_id)

    # -- job state and history -------------------------------------------------------------------------------

    async def _save(self, job: JobRecord) -> None:
        async with self._save_lock:
            await self._db(self._store.save_job, job)

    async def _event(self, job: JobRecord, kind: str, data: dict[str, Any]) -> None:
        await self._db(self._store.append_event, job.job_id, _now(), kind, data)
        condition = self._changed.get(job.job_id)
        if condition is not None:
            async with condition:
                condition.notify_all()

    async def _set_state(self, job: JobRecord, state: JobState, message: str) -> None:
        # The event first: once a job reads as terminal, its terminal event is in the history (WatchJob relies on it).
        previous = job.state
        await self._event(job, "state", {"from": previous.value, "to": state.value, "message": message})
        job.state = state
        await self._save(job)

    async def _finish(self, job: JobRecord, state: JobState, message: str) -> None:
        if job.state in TERMINAL_STATES:
            return
        job.ended_at = _now()
        if state is not JobState.SUCCEEDED:
            job.error = message
        await self._set_state(job, state, message)
        self._changed.pop(job.job_id, None)
        await self._end_credentials(job.job_id)

    # -- base models -----------------------------------------------------------------------------------------

    async def base_model(self, tenant: str, name: str) -> BaseModelRecord:
        """A base model by name: a built-in, else one of the tenant's; InvalidArgument when there is none."""
        if self._catalog.path(name) is not None:
            info = await asyncio.to_thread(self._catalog.describe, name)
            return BaseModelRecord(
                tenant="",
                name=name,
                path=str(self._catalog.path(name)),
                architecture=info.architecture,
                max_seq_length=info.max_seq_length,
                parameter_count=info.parameter_count,
                sha256=info.sha256,
                description="built in",
                created_at=self._catalog.created_at(name),
            )
        record = await self._db(self._store.base_model, tenant, name) if name else None
        if record is None:
            raise InvalidArgument(f"unknown base model {name!r}; see ListBaseModels")
        return record  # type: ignore[no-any-return]

    async def base_models(self, tenant: str) -> list[BaseModelRecord]:
        builtins = [await self.base_model(tenant, name) for name in self._catalog.names()]
        return builtins + list(await self._db(self._store.base_models, tenant))

    async def register_base_model(
        self, tenant: str, name: str, artifact_name: str, artifact_version: int, description: str
    ) -> BaseModelRecord:
        """Downloads the artifact (a tar of a Hugging Face model directory), unpacks and validates it."""
        if not _MODEL_NAME.match(name):
            raise InvalidArgument("name must be 1-128 lowercase letters, digits, '.', '_' or '-'")
        if self._catalog.path(name) is not None:
            raise InvalidArgument(f"{name!r} is a built-in base model")
        if await self._db(self._store.base_model, tenant, name) is not None:
            raise AlreadyExists(f"base model {name!r} already exists")
        if not artifact_name:
            raise InvalidArgument("artifact_name is required")
        target = self._options.base_models_dir / tenant / name
        staging = private_dir(target.with_name(f".{name}.{uuid.uuid4().hex}"))
        try:
            artifact = await self._artifacts.fetch_artifact(
                tenant, artifact_name, artifact_version, staging / "artifact.tar"
            )
            model_dir = staging / "model"
            try:
                await asyncio.to_thread(_untar, staging / "artifact.tar", model_dir)
                info = await asyncio.to_thread(describe_model_dir, model_dir)
            except (ValueError, tarfile.TarError, OSError) as exc:
                raise InvalidArgument(f"artifact {artifact_name!r} is not a usable base model: {exc}") from None
            (staging / "artifact.tar").unlink()
            shutil.rmtree(target, ignore_errors=True)
            model_dir.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record = BaseModelRecord(
            tenant=tenant,
            name=name,
            path=str(target),
            architecture=info.architecture,
            max_seq_length=info.max_seq_length,
            parameter_count=info.parameter_count,
            sha256=artifact.sha256,
            description=description,
            created_at=_now(),
            artifact=replace(artifact, role="hf_model"),
        )
        await self._db(self._store.add_base_model, record)
        return record

    # -- registry --------------------------------------------------------------------------------------------

    async def models(self, tenant: str, page_size: int, page_token: str) -> Page:
        offset, limit = _offset(page_token), _limit(page_size)
        found = await self._db(self._store.models, tenant, offset, limit + 1)
        return Page(found[:limit], str(offset + limit) if len(found) > limit else "")

    async def _model(self, tenant: str, name: str) -> ModelRecord:
        model = await self._db(self._store.model, tenant, name)
        if model is None:
            raise NotFound(f"model {name!r} not found")
        return model  # type: ignore[no-any-return]

    async def model_versions(self, tenant: str, model: str, page_size: int, page_token: str) -> Page:
        await self._model(tenant, model)
        offset, limit = _offset(page_token), _limit(page_size)
        found = await self._db(self._store.model_versions, tenant, model, offset, limit + 1)
        return Page(found[:limit], str(offset + limit) if len(found) > limit else "")

    async def model_version(self, tenant: str, model: str, version: int, alias: str) -> ModelVersionRecord:
        """By number, by alias, or (neither) the latest."""
        if version and alias:
            raise InvalidArgument("give version or alias, not both")
        if version < 0:
            raise InvalidArgument("version must not be negative")
        found = await self._model(tenant, model)
        if alias:
            if alias not in found.aliases:
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            version = found.aliases[alias]
        record = await self._db(self._store.model_version, tenant, model, version)
        if record is None:
            raise NotFound(f"model {model!r} has no version {version}")
        return record  # type: ignore[no-any-return]

    async def set_alias(self, tenant: str, model: str, alias: str, version: int) -> ModelRecord:
        if not _ALIAS.match(alias):
            raise InvalidArgument("alias must be 1-40 lowercase letters, digits or '-'")
        if version < 0:
            raise InvalidArgument("version must not be negative")
        await self._model(tenant, model)
        if version and await self._db(self._store.model_version, tenant, model, version) is None:
            raise FailedPrecondition(f"model {model!r} has no version {version}")
        await self._db(self._store.set_alias, tenant, model, alias, version)
        return await self._model(tenant, model)


def _tar(directory: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))


def _untar(archive: Path, target: Path) -> None:
    """Unpacks a (gzip) tar safely: members stay inside ``target`` and are private; a single top-level directory is
    unwrapped."""
    private_dir(target)
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(target, filter=private_tar_member)
    entries = list(target.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (target / "config.json").exists():
        inner = entries[0]
        for child in inner.iterdir():
            child.rename(target / child.name)
        inner.rmdir()
