"""``aidc train submit|watch|status|cancel`` and ``aidc model list|show|alias``: fine-tune jobs and the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from services.cli.scheduler_cmd import parse_quantity
from services.cli.session import open_session
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.scheduler.client import duration, state_name
from services.training.client import TrainingClient

__all__ = ["register", "train_app", "model_app"]

_T = TypeVar("_T")

train_app = typer.Typer(help="Submit, watch and cancel fine-tune jobs.", no_args_is_help=True)
model_app = typer.Typer(help="List and inspect registered models; point aliases at versions.", no_args_is_help=True)
_out = Console(highlight=False, soft_wrap=False)
_err = Console(stderr=True, highlight=False)

TenantOption = Annotated[str, typer.Option("--tenant", "-t", help="The tenant; default: your own.", show_default=False)]
_TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def register(app: typer.Typer) -> None:
    """Adds the ``train`` and ``model`` command groups to the CLI."""
    app.add_typer(train_app, name="train")
    app.add_typer(model_app, name="model")


def _run(work: Callable[[TrainingClient], Awaitable[_T]]) -> _T:
    async def main() -> _T:
        async with open_session() as session:
            return await work(TrainingClient(session.channel("training")))

    return asyncio.run(main())


def _state(value: int) -> str:
    return pb.JobState.Name(value).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return datetime.fromtimestamp(stamp.seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    for row in rows:
        table.add_row(*row)
    _out.print(table)


def _describe_job(job: pb.Job) -> None:
    rows = [
        ("job", job.job_id),
        ("state", _state(job.state)),
        ("base model", job.spec.base_model),
        ("dataset", f"{job.spec.dataset.name} v{job.spec.dataset.version}"),
        ("model", job.spec.output_model + (f" v{job.model_version}" if job.model_version else "")),
        ("attempt", str(job.attempt)),
        ("created", f"{_when(job.create_time)} by {job.created_by}"),
    ]
    if job.scheduler_job_id:
        where = f"{job.scheduler_job_id} {state_name(job.scheduler_state)}"
        if job.scheduler_state == scheduler_pb.JOB_STATE_QUEUED:
            where += f", queue position {job.queue_position}"
        rows.append(("scheduler", where + (f": {job.scheduler_reason}" if job.scheduler_reason else "")))
    if job.preemptions:
        rows.append(("preemptions", str(job.preemptions)))
    if job.HasField("progress"):
        rows.append(("progress", f"step {job.progress.step}/{job.progress.total_steps}"))
    for key, value in sorted(job.latest_metrics.values.items()):
        rows.append((key, f"{value:.4f}"))
    if job.error:
        rows.append(("error", job.error))
    _print_rows(rows)


async def _watch(client: TrainingClient, job_id: str, tenant: str) -> pb.Job:
    """Follows a job with a live progress bar and its evaluations; returns the final job."""
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=_err,
        transient=False,
    )
    with progress:
        task = progress.add_task("queued", total=None, detail="")
        async for event in client.watch_job(job_id, tenant=tenant, include_logs=False):
            if event.HasField("state_change"):
                state = _state(event.state_change.to_state)
                progress.update(task, description=state)
                if event.state_change.to_state in _TERMINAL:
                    progress.console.print(f"{state}: {event.state_change.message}")
            elif event.HasField("progress"):
                p = event.progress
                progress.update(
                    task,
                    total=p.total_steps or None,
                    completed=p.step,
                    detail=f"loss {p.train_loss:.4f}  lr {p.learning_rate:.2e}  {p.examples_per_second:.0f} ex/s",
                )
            elif event.HasField("metrics"):
                values = "  ".join(f"{k} {v:.4f}" for k, v in sorted(event.metrics.values.items()) if k != "examples")
                progress.console.print(f"epoch {event.metrics.epoch}: {values}")
            elif event.HasField("scheduling"):
                s = event.scheduling
                where = f" on {', '.join(s.nodes)}" if s.nodes else ""
                progress.console.print(f"scheduler: {state_name(s.state)}{where}  {s.reason}")
    return await client.get_job(job_id, tenant=tenant)


@train_app.command("submit")
def submit(
    dataset: Annotated[str, typer.Argument(help="The dataset to fine-tune on.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Registry model the result becomes a version of.")],
    base_model: Annotated[str, typer.Option("--base-model", "-b", help="Base model name.")] = "minilm-l6",
    dataset_version: Annotated[int, typer.Option("--dataset-version", min=0, help="0: the latest.")] = 0,
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    epochs: Annotated[int | None, typer.Option(min=1, help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (overrides epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak AdamW learning rate.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(min=2)] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters instead of every weight.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Int8 dynamic quantization of the export.")] = False,
    cpu: Annotated[str, typer.Option(help="CPU for the run: cores (2, 0.5) or millicores (500m); default 1.")] = "",
    memory: Annotated[str, typer.Option(help="Memory for the run (8Gi, 512Mi); default 2Gi.")] = "",
    gpus: Annotated[int, typer.Option(min=0, help="GPUs for the run.")] = 0,
    gpu_type: Annotated[str, typer.Option(help="GPU model, e.g. nvidia-a100-80gb; default any.")] = "",
    pool: Annotated[str, typer.Option(help="Scheduler pool; default the default pool.")] = "",
    priority: Annotated[int, typer.Option(min=0, help="Scheduling priority (0-500).")] = 0,
    preemptible: Annotated[
        bool, typer.Option("--preemptible", help="Let higher-priority work preempt it (it resumes).")
    ] = False,
    max_run: Annotated[float, typer.Option(min=0, help="Longest run in seconds; 0: the pool's limit.")] = 0,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job until it ends.")] = False,
    tenant: TenantOption = "",
) -> None:
    """Submit a fine-tune job (the spec is checked before anything runs)."""
    hyper = pb.Hyperparameters(
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_seq_length=max_seq_length,
        seed=seed,
    )
    spec = pb.FineTuneSpec(
        base_model=base_model,
        dataset=pb.DatasetRef(name=dataset, version=dataset_version),
        sequence_classification=pb.SequenceClassificationTask(text_column=text_column, label_column=label_column),
        hyperparameters=hyper,
        method=pb.TRAINING_METHOD_LORA if lora else pb.TRAINING_METHOD_FULL,
        options=pb.TrainingOptions(export=pb.ExportOptions(int8_quantization=int8)),
        output_model=model,
        compute=pb.ComputeRequest(
            cpu_millicores=parse_quantity(cpu, "cpu") if cpu else 0,
            memory_bytes=parse_quantity(memory, "memory") if memory else 0,
            gpu_count=gpus,
            gpu_type=gpu_type,
            pool=pool,
            priority=priority,
            preemptible=preemptible,
            max_run_duration=duration(max_run) if max_run else None,
        ),
    )

    async def work(client: TrainingClient) -> pb.Job:
        job = await client.submit_fine_tune(spec, tenant=tenant)
        _err.print(f"submitted job {job.job_id}")
        return await _watch(client, job.job_id, job.tenant) if watch else job

    job = _run(work)
    _describe_job(job)
    if watch and job.state != pb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@train_app.command("watch")
def watch_cmd(job_id: str, tenant: TenantOption = "") -> None:
    """Follow a job until it ends."""
    job = _run(lambda client: _watch(client, job_id, tenant))
    _describe_job(job)
    if job.state != pb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@train_app.command("status")
def status(
    job_id: Annotated[str, typer.Argument(help="A job id; omit to list recent jobs.")] = "", tenant: TenantOption = ""
) -> None:
    """Show one job, or list the tenant's recent jobs."""
    if job_id:
        _describe_job(_run(lambda client: client.get_job(job_id, tenant=tenant)))
        return
    jobs, _ = _run(lambda client: client.list_jobs(tenant=tenant, page_size=50))
    table = Table("job", "state", "model", "dataset", "step", "created")
    for job in jobs:
        table.add_row(
            job.job_id,
            _state(job.state),
            job.spec.output_model + (f" v{job.model_version}" if job.model_version else ""),
            f"{job.spec.dataset.name} v{job.spec.dataset.version}",
            f"{job.progress.step}/{job.progress.total_steps}",
            _when(job.create_time),
        )
    _out.print(table)


@train_app.command("cancel")
def cancel(job_id: str, reason: str = "", tenant: TenantOption = "") -> None:
    """Cancel a job (its runner checkpoints and stops)."""
    _describe_job(_run(lambda client: client.cancel_job(job_id, tenant=tenant, reason=reason)))


@model_app.command("list")
def list_models(tenant: TenantOption = "") -> None:
    """The tenant's models."""
    models = _run(lambda client: client.list_models(tenant=tenant))
    table = Table("model", "latest", "aliases", "updated")
    for m in models:
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m.aliases.items()))
        table.add_row(m.name, f"v{m.latest_version}", aliases, _when(m.update_time))
    _out.print(table)


@model_app.command("show")
def show(
    model: str,
    version: Annotated[int, typer.Option("--version", "-v", min=0, help="0: the latest.")] = 0,
    alias: Annotated[str, typer.Option("--alias", "-a", help="Show the version an alias points at.")] = "",
    tenant: TenantOption = "",
) -> None:
    """One model version: lineage, metrics, parity, artifacts."""
    v = _run(lambda client: client.get_model_version(model, tenant=tenant, version=version, alias=alias))
    lineage = v.lineage
    rows = [
        ("model", f"{v.model} v{v.version}" + (f"  ({', '.join(v.aliases)})" if v.aliases else "")),
        ("created", _when(v.create_time)),
        ("base model", f"{lineage.base_model} (sha256 {lineage.base_model_sha256[:16]}...)"),
        ("dataset", f"{lineage.dataset.name} v{lineage.dataset.version} (sha256 {lineage.dataset_sha256[:16]}...)"),
        ("job", lineage.job_id),
        ("code", lineage.code_version),
        ("labels", ", ".join(v.labels)),
    ]
    for key, value in sorted(v.metrics.values.items()):
        rows.append((key, f"{value:.4f}"))
    if v.HasField("export_parity"):
        parity = v.export_parity
        verdict = "passed" if parity.passed else "FAILED"
        rows.append(("parity", f"{verdict}: max |dlogit| {parity.max_abs_logit_diff:.2e} <= {parity.tolerance:.0e}"))
    if v.HasField("privacy"):
        rows.append(("epsilon", f"{v.privacy.epsilon_spent:.3f} at delta {v.privacy.delta:.1e}"))
    for artifact in v.artifacts:
        rows.append((f"artifact {artifact.role}", f"{artifact.name} v{artifact.version} ({artifact.size_bytes} bytes)"))
    _print_rows(rows)


@model_app.command("alias")
def alias_cmd(
    model: str,
    alias: str,
    version: Annotated[int, typer.Argument(help="The version to point at; 0 removes the alias.")],
    tenant: TenantOption = "",
) -> None:
    """Point an alias (e.g. production) at a version, or remove it with version 0."""
    m = _run(lambda client: client.set_alias(model, alias, version, tenant=tenant))
    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m.aliases.items())) or "(none)"
    _out.print(f"{m.name}: {aliases}")
