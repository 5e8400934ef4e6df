"""TrainingCore: fine-tune jobs. A job is validated (base model, dataset, hyperparameters) before any compute is
spent, then run as a job of the scheduler in the submitter's tenant (quota, fair share, budget, prices and
preemption apply), followed there (its placement and state) and in the runner's output (its progress, evaluations
and checkpoints, relayed into the job's history exactly once), and its export is published as a model version.
Pure Python: storage, the scheduler and the jobs' credentials come in through Protocols."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import shutil
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import services
from services.mesh.errors import (
    AidcError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)
from services.mesh.files import private_dir
from services.mesh.identity import Principal, current_principal
from services.mesh.interceptors import current_deadline
from services.mesh.telemetry import export_environment
from services.training.core.model import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    ComputeSpec,
    DatasetVersion,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    ModelVersionRecord,
)
from services.training.core.registry import MODEL_NAME, ArtifactGateway, ModelRegistry, Page, now, page_bounds
from services.training.core.relay import read_new_lines, translate
from services.training.core.scheduling import ComputeScheduler, RunRequest, ScheduledRun
from services.training.metrics import TrainingMetrics
from services.training.runner import MIN_MEMORY_BYTES, RUNNER_ENV
from services.training.runner.preflight import InvalidJob, check
from services.training.runner.sealed import SUFFIX as SEALED
from services.training.runner.sealed import SealedFileSource, SealedFileWriter, job_data_key, key_env
from services.training.runner.spec import FineTuneSpec
from services.training.store import TrainingStore

__all__ = ["JobCredentials", "JobOptions", "TrainingCore", "RUN_DIR", "JOB_LABEL"]

log = logging.getLogger(__name__)

#: The runner's --job-dir inside a job's directory (its artifact store: only what the runner writes).
RUN_DIR = "run"
#: Label of the scheduler's job naming the training job it runs.
JOB_LABEL = "aidc.training/job"
_RESULT = "result.json"
_EXIT_INVALID, _EXIT_PARITY, _EXIT_CANCELLED = 2, 3, 130
_REPO_ROOT = Path(services.__file__).resolve().parent.parent
_GIB = 2**30
#: Refusals of the scheduler that no retry changes (anything else, e.g. UNAVAILABLE, is retried).
_REFUSALS = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    FailedPrecondition,
    QuotaExceeded,
)
_RETRY_SECONDS = (0.5, 10.0)
_MAX_WORKERS = 64
#: How often the leader looks for active jobs nobody follows.
_ORPHAN_SCAN_SECONDS = 5.0
_T = TypeVar("_T")


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


@dataclass(frozen=True)
class JobOptions:
    """How the core runs jobs."""

    jobs_dir: Path
    progress_interval_seconds: float = 2.0
    #: torch threads of a runner; 0: one per whole core the job requests.
    runner_threads: int = 0
    #: Resources of a job that asks for none.
    default_cpu_millicores: int = 1000
    default_memory_bytes: int = 2 * _GIB
    #: Pool of a job that names none; empty: the scheduler's default.
    default_pool: str = ""
    #: How often the output of a running job is read.
    output_poll_seconds: float = 0.25
    code_version: str = ""
    #: Whether this service has a mesh identity (a service certificate). Without one (plaintext dev mode) the
    #: scheduler cannot tell training from a tenant and runs nothing for it: fine-tunes are refused up front.
    mesh_identity: bool = True
    #: What each job's key is derived from (services.training.runner.sealed): the service's master key, 32 bytes.
    data_master_key: bytes = field(default=b"", repr=False)


def resolve_compute(compute: ComputeSpec, options: JobOptions) -> ComputeSpec:
    """The request with the service's defaults filled in; InvalidArgument for what no scheduler could take."""
    if min(compute.cpu_millicores, compute.memory_bytes, compute.gpu_count, compute.max_run_seconds) < 0:
        raise InvalidArgument("compute: quantities must not be negative")
    if compute.max_run_seconds and compute.max_run_seconds < 1:
        raise InvalidArgument("compute.max_run_duration must be at least one second")
    if not 0 <= compute.workers <= _MAX_WORKERS:
        raise InvalidArgument(f"compute.workers must be between 1 and {_MAX_WORKERS}")
    if compute.memory_bytes and compute.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument(
            f"compute.memory_bytes must be at least {MIN_MEMORY_BYTES // 2**20} MiB: the runner itself needs about "
            "400 MiB before the model and the data"
        )
    return replace(
        compute,
        cpu_millicores=compute.cpu_millicores or options.default_cpu_millicores,
        memory_bytes=compute.memory_bytes or options.default_memory_bytes,
        pool=compute.pool or options.default_pool,
        workers=compute.workers or 1,
    )


class TrainingCore:
    """Jobs: submission, their runs in the scheduler, their history, cancellation and publication."""

    def __init__(
        self,
        store: TrainingStore,
        registry: ModelRegistry,
        artifacts: ArtifactGateway,
        scheduler: ComputeScheduler,
        options: JobOptions,
        *,
        credentials: JobCredentials,
        metrics: TrainingMetrics | None = None,
    ) -> None:
        if len(options.data_master_key) != 32:
            raise ValueError("JobOptions.data_master_key must be the service's 32-byte master key")
        self._metrics = metrics or TrainingMetrics()
        self._store = store
        self._registry = registry
        self._artifacts = artifacts
        self._scheduler = scheduler
        self._options = options
        self._credentials = credentials
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._relaying: dict[str, asyncio.Lock] = {}
        self._writing: dict[str, asyncio.Lock] = {}
        self._live: dict[str, JobRecord] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._leading = False

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await self._store.db.run(fn, *args)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def lead(self) -> None:
        """The leader's work, until cancelled (one replica follows each job: it relays the runner's output and
        publishes the model once). Follows again the jobs a previous leader or instance left active (their runs went
        on in the scheduler; each job acts for its submitter through its stored delegation; relaying goes on where it
        stopped), revokes delegations of ended jobs that were not yet, and looks for active jobs nobody follows every
        few seconds (one whose submission raced a change of leader). SubmitFineTune, CancelJob and
        RegisterBaseModel are forwarded to the leader, so the jobs it submits it follows at once."""
        self._leading = True
        try:
            for job_id in await self._db(self._store.ended_jobs_with_credentials, TERMINAL_STATES):
                await self._end_credentials(job_id)
            await self._clear_ended_job_dirs()
            while True:
                # A job followed here while the database was read may have ended meanwhile, its row read before
                # its end was written: only jobs nobody here followed during the read are taken.
                followed = set(self._followers)
                for job in await self._db(self._store.jobs_in, ACTIVE_STATES):
                    if job.job_id not in self._followers and job.job_id not in followed:
                        log.info("job %s: following it (%s)", job.job_id, job.state.value)
                        self._follow(job)
                await asyncio.sleep(_ORPHAN_SCAN_SECONDS)
        finally:
            self._leading = False
            await self.close()

    async def _clear_ended_job_dirs(self) -> None:
        """Clears the directories of ended jobs that still hold more than the scheduler's files (a process that
        stopped between recording a job's end and clearing its directory)."""
        jobs_dir = self._options.jobs_dir
        if not jobs_dir.is_dir():
            return
        for job_dir in jobs_dir.iterdir():
            job = await self._db(self._store.job, job_dir.name)
            if job is None or job.state not in TERMINAL_STATES:
                continue
            if any(path.name != job.scheduler_job_id for path in job_dir.iterdir()):
                log.info("job %s ended: clearing what its directory still holds", job.job_id)
                await asyncio.to_thread(_clear_job_dir, job_dir, job.scheduler_job_id)

    async def close(self) -> None:
        """Stops following jobs. Their runs go on in the scheduler; the next leader follows them again."""
        tasks = list(self._followers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
        compute: ComputeSpec | None = None,
    ) -> JobRecord:
        """Validates everything (base model, dataset, columns, hyperparameters, resources) and submits the job's run
        to the scheduler as the caller; InvalidArgument (or the scheduler's refusal) before any compute is spent,
        and then nothing is kept."""
        if not self._options.mesh_identity:
            raise FailedPrecondition(
                "fine-tunes need the mesh's certificates: the scheduler runs programs only for mesh services, and in "
                "plaintext dev mode (AIDC_CERTS_DIR=off) training has no service identity; start the platform with "
                "certificates (aidc up makes them)"
            )
        if not MODEL_NAME.match(output_model):
            raise InvalidArgument("output_model must be 1-128 lowercase letters, digits, '.', '_' or '-'")
        if not dataset.name:
            raise InvalidArgument("dataset.name is required")
        resources = resolve_compute(compute or ComputeSpec(), self._options)
        if resources.workers > 1 and spec.privacy is not None:
            raise InvalidArgument(
                "compute.workers: differential privacy trains on one worker (its accounting is per process)"
            )
        if request_id:
            for job in await self._db(self._store.jobs, tenant):
                if job.request_id == request_id:
                    return self._live.get(job.job_id, job)
        base = await self._registry.base_model(tenant, spec.base_model)
        job_id = uuid.uuid4().hex
        job_dir = private_dir(self._options.jobs_dir / job_id)
        try:
            # Sealed under the job's own key as it streams in: no plaintext copy of the tenant's data at rest here.
            key = job_data_key(self._options.data_master_key, job_id)
            writer = SealedFileWriter(job_dir / "dataset.part", key)
            try:
                resolved, fmt = await self._artifacts.fetch_dataset(tenant, dataset.name, dataset.version, writer.write)
                await asyncio.to_thread(writer.finish)
            except NotFound as exc:
                raise InvalidArgument(f"unknown dataset {dataset.name!r}: {exc.message}") from None
            finally:
                writer.close()
            data_path = job_dir / f"dataset.{fmt}{SEALED}"
            (job_dir / "dataset.part").rename(data_path)
            runner_spec = replace(spec, base_model=base.path)
            try:
                checked = await asyncio.to_thread(check, runner_spec, SealedFileSource(data_path, key))
            except InvalidJob as exc:
                raise InvalidArgument(str(exc)) from None
            (job_dir / "spec.json").write_text(json.dumps(runner_spec.to_dict(), indent=2))
            # The job outlives this call and the submitter's token: it acts for the submitter through a delegation.
            credential = await self._credentials.delegate(tenant, job_id)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        resolved = replace(resolved, sha256=checked.dataset.sha256, rows=checked.dataset.examples)
        job = JobRecord(
            tenant=tenant,
            job_id=job_id,
            spec=JobSpec(spec.base_model, resolved, output_model, spec.to_dict()),
            state=JobState.QUEUED,
            created_by=principal.subject,
            created_at=now(),
            request_id=request_id,
            trace_carrier=dict(trace_carrier or {}),
            base_model_path=base.path,
            base_model_sha256=base.sha256,
            compute=resources,
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
        queued = {"from": "", "to": JobState.QUEUED.value, "message": "accepted; submitting it to the scheduler"}
        await self._record(job, [("state", queued)])
        try:
            # As the caller (the submitter's own token): the scheduler's job is theirs, in their tenant, and their
            # quota, budget and rights apply.
            await self._track(job, await self._scheduler.submit(self._run_request(job)))
        except _REFUSALS:
            await self._discard(job)
            raise
        except AidcError as exc:
            # The scheduler may or may not have queued it: the job's follower submits again (idempotent on the id).
            log.warning("job %s: submitting it to the scheduler failed (%s); retrying", job_id, exc)
        if self._leading:  # else (leadership moved meanwhile) the new leader's scan finds it
            self._follow(job)
        return job

    async def _discard(self, job: JobRecord) -> None:
        """Undoes a submission the scheduler refused: nothing of it is kept."""
        await self._db(self._store.delete_job, job.job_id)
        shutil.rmtree(self._options.jobs_dir / job.job_id, ignore_errors=True)
        with contextlib.suppress(AidcError):
            credential = await self._db(self._store.job_credential, job.job_id)
            if credential is not None:
                await self._credentials.end(job.job_id, credential)
        self._changed.pop(job.job_id, None)

    async def job(self, tenant: str, job_id: str) -> JobRecord:
        live = self._live.get(job_id)
        job = live if live is not None else await self._db(self._store.job, job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"job {job_id!r} not found")
        return job  # type: ignore[no-any-return]

    async def jobs(self, tenant: str, states: frozenset[JobState], page_size: int, page_token: str) -> Page:
        offset, limit = page_bounds(page_size, page_token)
        found: list[JobRecord] = await self._db(self._store.jobs, tenant, states, offset, limit + 1)
        found = [self._live.get(j.job_id, j) for j in found]
        return Page(found[:limit], str(offset + limit) if len(found) > limit else "")

    async def cancel(self, tenant: str, job_id: str, reason: str = "") -> JobRecord:
        """Cancels a job: its run is cancelled in the scheduler as the caller (a queued run is dropped, a running one
        gets SIGTERM, checkpoints and stops); the job ends CANCELLED once the scheduler says so. Terminal jobs: a
        no-op."""
        job = await self.job(tenant, job_id)
        if job.state in TERMINAL_STATES or job.cancel_requested:
            return job
        job.cancel_requested = True
        message = f"cancelled: {reason}" if reason else "cancelled by request"
        job.error = message
        await self._set_state(job, JobState.CANCELLING, message)
        if job.scheduler_job_id:
            try:
                await self._track(job, await self._scheduler.cancel(job.tenant, job.scheduler_job_id, message))
            except (Unavailable, DeadlineExceeded) as exc:
                log.warning("job %s: cancelling its run failed (%s); its follower retries", job_id, exc)
        wake = self._wake.get(job_id)
        if wake is not None:
            wake.set()
        return job

    async def watch(self, tenant: str, job_id: str, after: int, include_logs: bool) -> AsyncIterator[JobEvent]:
        """The job's events after ``after``, then live ones; ends after the event of its terminal state."""
        await self.job(tenant, job_id)
        condition = self._changed.setdefault(job_id, asyncio.Condition())
        while True:
            # Read before the events: a job that reads as terminal already has its terminal event stored. The stored
            # record, not the live one, which turns terminal before the write of its terminal event (read from the
            # live one, a watch could end at CANCELLING, one event short).
            stored = await self._db(self._store.job, job_id)
            terminal = stored is not None and stored.state in TERMINAL_STATES
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

    # -- the run in the scheduler ------------------------------------------------------------------------------

    def _run_request(self, job: JobRecord) -> RunRequest:
        job_dir = self._options.jobs_dir / job.job_id
        data_path = next(job_dir.glob("dataset.*"))
        distributed = job.compute.workers > 1
        argv = (
            sys.executable,
            "-m",
            # Several workers: a Ray driver whose TorchTrainer runs the ranks where the scheduler placed them.
            "services.training.runner.distributed" if distributed else "services.training.runner",
            "--job-dir",
            str(job_dir / RUN_DIR),
            "--spec",
            str(job_dir / "spec.json"),
            "--dataset",
            str(data_path),
            "--progress-interval",
            str(self._options.progress_interval_seconds),
        )
        threads = self._options.runner_threads or max(1, math.floor(job.compute.cpu_millicores / 1000))
        env = {**RUNNER_ENV, "PYTHONPATH": str(_REPO_ROOT), "OMP_NUM_THREADS": str(threads)}
        # The scheduler gives its processes none of its own settings: the runner's spans go where ours go because
        # we say where.
        exporter, secrets = export_environment()
        if data_path.name.endswith(SEALED):
            secrets = {**secrets, **key_env(job_data_key(self._options.data_master_key, job.job_id))}
        return RunRequest(
            tenant=job.tenant,
            name=f"finetune-{job.job_id}",
            argv=argv,
            env={**env, **exporter},
            secret_env=secrets,
            working_dir=job_dir,
            compute=job.compute,
            labels={JOB_LABEL: job.job_id},
            idempotency_key=job.job_id,
            trace_carrier=job.trace_carrier,
        )

    def _follow(self, job: JobRecord) -> None:
        self._live[job.job_id] = job
        self._wake[job.job_id] = asyncio.Event()
        self._relaying[job.job_id] = asyncio.Lock()
        task = asyncio.create_task(self._follow_to_end(job), name=f"training-job-{job.job_id}")
        self._followers[job.job_id] = task

        def forget(_: asyncio.Task[None]) -> None:
            self._followers.pop(job.job_id, None)
            if job.state in TERMINAL_STATES:
                for table in (self._live, self._wake, self._relaying, self._writing):
                    table.pop(job.job_id, None)

        task.add_done_callback(forget)

    async def _follow_to_end(self, job: JobRecord) -> None:
        # The job outlives the SubmitFineTune call that started it: it must not inherit that call's caller (whose
        # token expires) nor its deadline. What it does in the scheduler and in storage it does for its submitter,
        # through its delegation.
        current_principal.set(None)
        current_deadline.set(None)
        pause = _RETRY_SECONDS[0]
        while job.state not in TERMINAL_STATES:
            try:
                if await self._follow_once(job):
                    pause = _RETRY_SECONDS[0]
                    continue
            except asyncio.CancelledError:
                raise
            except _REFUSALS as exc:
                if job.cancel_requested:
                    await self._finish(job, JobState.CANCELLED, job.error or "cancelled")
                else:
                    await self._finish(job, JobState.FAILED, f"the scheduler refused the job's run: {exc.message}")
                return
            except AidcError as exc:
                log.warning("job %s: following it failed (%s); again in %.1f s", job.job_id, exc, pause)
            except Exception as exc:
                log.exception("job %s failed in the service", job.job_id)
                message = f"internal error: {type(exc).__name__}"
                await self._stop_run(job, message)
                await self._finish(job, JobState.FAILED, message)
                return
            wake = self._wake[job.job_id]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), pause)
            wake.clear()
            pause = min(pause * 2, _RETRY_SECONDS[1])

    async def _stop_run(self, job: JobRecord, reason: str) -> None:
        """Cancels the job's run, if it has one, for a job that ends in the service while the scheduler may still run
        it: its runner would go on spending the tenant's quota and budget for a job already over. Best effort (the
        failure that ends the job may be the scheduler's, or the submitter's delegation)."""
        if not job.scheduler_job_id:
            return
        try:
            await self._as_submitter(job, lambda: self._scheduler.cancel(job.tenant, job.scheduler_job_id, reason))
        except Exception:
            log.exception("job %s: its run %s could not be cancelled", job.job_id, job.scheduler_job_id)

    async def _as_submitter(self, job: JobRecord, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call`` made as the job's submitter (a current token of its delegation)."""
        token = current_principal.set(await self._submitter(job))
        try:
            return await call()
        finally:
            current_principal.reset(token)

    async def _follow_once(self, job: JobRecord) -> bool:
        """Submits the run if it is not yet, follows it until it ends and concludes the job; or returns False when
        the scheduler's stream ended before the run did (followed again after a pause)."""
        if not job.scheduler_job_id:
            # Even a job cancelled meanwhile: the first submission may have reached the scheduler (then this returns
            # that run, which is cancelled next).
            await self._track(
                job, await self._as_submitter(job, lambda: self._scheduler.submit(self._run_request(job)))
            )
        if job.cancel_requested and job.scheduler_state not in ("cancelling", "cancelled"):
            reason = job.error or "cancelled by request"
            await self._track(
                job,
                await self._as_submitter(job, lambda: self._scheduler.cancel(job.tenant, job.scheduler_job_id, reason)),
            )
        tail = asyncio.create_task(self._tail(job), name=f"training-output-{job.job_id}")
        try:
            current_principal.set(await self._submitter(job))
            # The scheduler ends the stream once the run ended (read to its end: the call and its span end with it).
            async with contextlib.aclosing(self._scheduler.watch(job.tenant, job.scheduler_job_id)) as changes:
                async for run in changes:
                    await self._track(job, run)
            run = await self._as_submitter(job, lambda: self._scheduler.run(job.tenant, job.scheduler_job_id))
            await self._track(job, run)
        finally:
            current_principal.set(None)
            tail.cancel()
            # gather, not suppress(CancelledError): a cancel of this task arriving while it waits for the tail must
            # not be swallowed (the follower went on following, and a leader closing waited for it forever).
            await asyncio.gather(tail, return_exceptions=True)
        if not run.terminal:
            return False
        await self._relay(job, final=True)
        await self._conclude(job, run)
        return True

    async def _tail(self, job: JobRecord) -> None:
        # A failed relay is tried again at the next poll: its task's exception would be seen only once the run ended,
        # and the job would show no progress until then.
        while True:
            try:
                await self._relay(job, final=False)
            except Exception:
                log.exception("job %s: relaying the runner's output failed; again in a moment", job.job_id)
            await asyncio.sleep(self._options.output_poll_seconds)

    async def _track(self, job: JobRecord, run: ScheduledRun) -> None:
        """The scheduler's view of the run into the job: its placement and state, and the training states that
        follow from them (QUEUED -> RUNNING; back to QUEUED when requeued; CANCELLING)."""
        seen = (job.scheduler_state, job.scheduler_reason, job.queue_position, job.attempt)
        job.scheduler_job_id = run.job_id
        job.scheduler_state, job.scheduler_reason = run.state, run.reason
        job.queue_position, job.preemptions = run.queue_position, run.preemptions
        previous_attempt, job.attempt = job.attempt, max(job.attempt, run.attempt)
        events: list[tuple[str, dict[str, Any]]] = []
        active = job.state not in TERMINAL_STATES
        if seen[0] in ("", "queued") and run.state not in ("queued", "scheduled") and run.nodes:
            # The admission happened between two looks (e.g. before the watch began): its placement is in the run.
            admitted = {"state": "scheduled", "reason": f"admitted on {', '.join(sorted(set(run.nodes)))}"}
            events.append(("scheduling", {**self._update(run), **admitted}))
        if (run.state, run.reason, run.queue_position, run.attempt) != seen:
            events.append(("scheduling", self._update(run)))
        running = job.state in (JobState.RUNNING, JobState.EXPORTING)
        if run.state == "running" and (job.state is JobState.QUEUED or (running and job.attempt != previous_attempt)):
            job.started_at = job.started_at or now()
            message = f"runner started (attempt {run.attempt}) on {', '.join(run.nodes)}"
            events.append(self._state_change(job, JobState.RUNNING, message))
        elif run.state == "queued" and running:
            events.append(self._state_change(job, JobState.QUEUED, run.reason))
        elif run.state == "cancelling" and active and job.state is not JobState.CANCELLING:
            job.cancel_requested = True
            job.error = job.error or run.reason
            events.append(self._state_change(job, JobState.CANCELLING, run.reason))
        await self._record(job, events)

    @staticmethod
    def _update(run: ScheduledRun) -> dict[str, Any]:
        """A scheduling event's data: the scheduler's view of the run."""
        return {
            "scheduler_job_id": run.job_id,
            "state": run.state,
            "reason": run.reason,
            "queue_position": run.queue_position,
            "attempt": run.attempt,
            "nodes": list(run.nodes),
        }

    async def _relay(self, job: JobRecord, *, final: bool) -> None:
        """What the runner printed since the last call into the job's history. The events and how far the output
        was read are stored together, so a restarted service goes on where this one stopped, without repeats."""
        if not job.scheduler_job_id or not job.attempt:
            return
        async with self._relaying[job.job_id]:
            job.output_attempt = job.output_attempt or 1
            while True:
                path = self._scheduler.output_file(
                    self._options.jobs_dir / job.job_id, job.scheduler_job_id, job.output_attempt
                )
                # An attempt the scheduler has moved on from has exited: all it printed is there.
                ended = final or job.attempt > job.output_attempt
                lines, offset = await asyncio.to_thread(read_new_lines, path, job.output_offset, to_end=ended)
                if offset != job.output_offset:
                    # No other write of the record may come between the new offset and the events read up to it.
                    async with self._writing.setdefault(job.job_id, asyncio.Lock()):
                        job.output_offset = offset
                        await self._write(job, [self._relayed(job, line) for line in lines])
                    continue
                if job.attempt <= job.output_attempt:
                    return
                job.output_attempt, job.output_offset = job.output_attempt + 1, 0

    def _relayed(self, job: JobRecord, line: str) -> tuple[str, dict[str, Any]]:
        """One output line: its event, and what it changes in the record."""
        item = translate(line)
        if item.progress is not None:
            self._metrics.progress(job.progress, item.progress)
            job.progress = item.progress
        if item.metrics is not None:
            job.metrics = item.metrics
        if item.error is not None:
            job.error = item.error
        if item.phase == "exporting" and job.state is JobState.RUNNING:
            return self._state_change(job, JobState.EXPORTING, "training finished; exporting")
        return item.kind, item.data

    async def _conclude(self, job: JobRecord, run: ScheduledRun) -> None:
        """The run ended in the scheduler: publish the export, or end the job as the run did."""
        if run.state == "succeeded":
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
        elif run.state == "cancelled":
            await self._finish(job, JobState.CANCELLED, job.error or run.reason or "cancelled")
        elif run.exit_code == _EXIT_INVALID:
            await self._finish(job, JobState.FAILED, f"invalid job: {job.error}")
        elif run.exit_code == _EXIT_PARITY:
            await self._finish(job, JobState.FAILED, f"parity check failed: {job.error}")
        elif run.exit_code == _EXIT_CANCELLED:  # stopped by the scheduler, e.g. past its max run duration
            await self._finish(job, JobState.FAILED, run.reason)
        else:
            await self._finish(job, JobState.FAILED, job.error or f"the runner failed: {run.reason}")

    async def _publish(self, job: JobRecord) -> ModelVersionRecord:
        """Uploads the export, tokenizer and TensorBoard events as the tenant's artifacts; registers the version
        (once: publishing again after a restart returns the version registered already)."""
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
            created_at=now(),
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

    @staticmethod
    def _state_change(job: JobRecord, state: JobState, message: str) -> tuple[str, dict[str, Any]]:
        """Moves the record to ``state``; the event that says so (stored with the record by _record)."""
        change = {"from": job.state.value, "to": state.value, "message": message}
        job.state = state
        return "state", change

    async def _record(self, job: JobRecord, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Stores the record with ``events`` appended to its history, in one transaction (a job that reads as
        terminal has its terminal event stored: WatchJob relies on it), and wakes its watchers."""
        async with self._writing.setdefault(job.job_id, asyncio.Lock()):
            await self._write(job, events)

    async def _write(self, job: JobRecord, events: list[tuple[str, dict[str, Any]]]) -> None:
        at: datetime = now()
        await self._db(self._store.append_events, job.job_id, [(at, kind, data) for kind, data in events], job)
        condition = self._changed.get(job.job_id)
        if condition is not None and events:
            async with condition:
                condition.notify_all()

    async def _set_state(self, job: JobRecord, state: JobState, message: str) -> None:
        await self._record(job, [self._state_change(job, state, message)])

    async def _finish(self, job: JobRecord, state: JobState, message: str) -> None:
        if job.state in TERMINAL_STATES:
            return
        job.ended_at = now()
        job.queue_position = -1
        if state is not JobState.SUCCEEDED:
            job.error = message
        await self._set_state(job, state, message)
        self._changed.pop(job.job_id, None)
        await self._end_credentials(job.job_id)
        await asyncio.to_thread(_clear_job_dir, self._options.jobs_dir / job.job_id, job.scheduler_job_id)


def _clear_job_dir(job_dir: Path, scheduler_job_id: str) -> None:
    """What an ended job leaves of the tenant's in its directory is deleted: its sealed dataset, checkpoints, export
    (in the tenant's storage once published) and packed archives. The scheduler's files of its attempts stay (the
    runner's output, for the job's history and operators)."""
    if not job_dir.is_dir():
        return
    for path in job_dir.iterdir():
        if path.name == scheduler_job_id and scheduler_job_id:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _tar(directory: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
