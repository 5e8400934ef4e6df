"""``aidc jobs list|show|cancel|watch``, ``aidc quota set|show`` and ``aidc pools [show|create|update]`` with
``aidc pools node add|update|drain|undrain|remove``: the scheduler's jobs (with their queue position and why they
wait), quotas and pools."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from services.cli.session import open_session
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.errors import InvalidArgument
from services.scheduler.client import SchedulerClient, duration, prices, resources, state_name

__all__ = ["register", "jobs_app", "quota_app", "pools_app", "parse_quantity"]

_T = TypeVar("_T")

jobs_app = typer.Typer(help="List, show, watch and cancel scheduled jobs.", no_args_is_help=True)
quota_app = typer.Typer(
    help="Show tenants' quotas and what they use; set them (platform admins).", no_args_is_help=True
)
pools_app = typer.Typer(
    help="Resource pools and their nodes (show: anyone; create, update, nodes: operators).", invoke_without_command=True
)
node_app = typer.Typer(help="Add, update, drain and remove a pool's nodes (operators).", no_args_is_help=True)
pools_app.add_typer(node_app, name="node")
_out = Console(highlight=False, soft_wrap=False)

TenantOption = Annotated[str, typer.Option("--tenant", "-t", help="The tenant; default: your own.", show_default=False)]
PoolOption = Annotated[str, typer.Option("--pool", "-p", help="The pool; default: the default pool.")]
_GIB = 2**30
_STATES = {state_name(v): v for v in pb.JobState.values() if v}


def register(app: typer.Typer) -> None:
    """Adds the ``jobs``, ``quota`` and ``pools`` command groups to the CLI."""
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(quota_app, name="quota")
    app.add_typer(pools_app, name="pools")


def _run(work: Callable[[SchedulerClient], Awaitable[_T]]) -> _T:
    async def main() -> _T:
        async with open_session() as session:
            return await work(SchedulerClient(session.channel("scheduler")))

    return asyncio.run(main())


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return datetime.fromtimestamp(stamp.seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _resources(r: pb.Resources) -> str:
    parts = [f"{r.cpu_millicores / 1000:g} cpu", f"{r.memory_bytes / _GIB:g} GiB"]
    if r.gpu_count:
        parts.append(f"{r.gpu_count} gpu" + (f" {r.gpu_type}" if r.gpu_type else ""))
    return ", ".join(parts)


def _money(micros: int, currency: str) -> str:
    amount = f"{micros / 1_000_000:.6f}".rstrip("0").rstrip(".")
    return f"{amount} {currency}"


def parse_quantity(text: str, what: str) -> int:
    """CPU as cores ("2", "0.5") or millicores ("500m"); memory with a unit ("8Gi", "512Mi", bytes)."""
    value = text.strip()
    if what == "cpu":
        found = re.fullmatch(r"(\d+)m", value)
        if found:
            return int(found.group(1))
        try:
            return round(float(value) * 1000)
        except ValueError:
            raise InvalidArgument(f"cpu {text!r}: give cores (2, 0.5) or millicores (500m)") from None
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}
    found = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", value)
    if found is None:
        raise InvalidArgument(f"memory {text!r}: give bytes or a number with Ki, Mi, Gi or Ti")
    return round(float(found.group(1)) * units[found.group(2) or ""])


def _job_row(job: pb.Job) -> tuple[str, ...]:
    waiting = job.state == pb.JOB_STATE_QUEUED
    return (
        job.job_id,
        job.tenant,
        job.name if job.name != job.job_id else "",
        state_name(job.state),
        str(job.queue_position) if waiting else "",
        job.pool,
        f"{job.workers} x {_resources(job.resources)}",
        job.state_reason,
    )


def _jobs_table(jobs: list[pb.Job]) -> Table:
    table = Table("job", "tenant", "name", "state", "position", "pool", "resources", "reason")
    for job in jobs:
        table.add_row(*_job_row(job))
    return table


@jobs_app.command("list")
def jobs_list(
    tenant: TenantOption = "",
    state: Annotated[list[str] | None, typer.Option("--state", "-s", help="Only these states (repeatable).")] = None,
    pool: Annotated[str, typer.Option("--pool", "-p", help="Only this pool.")] = "",
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many, newest first.")] = 50,
) -> None:
    """List jobs, newest first, with the queue position and the reason a job waits."""
    unknown = [s for s in state or [] if s not in _STATES]
    if unknown:
        raise typer.BadParameter(f"unknown state(s) {unknown}; one of {sorted(_STATES)}")
    states = [_STATES[s] for s in state or []]
    jobs, _ = _run(lambda c: c.list_jobs(tenant, states=states, pool=pool, page_size=limit))
    _out.print(_jobs_table(jobs))


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="The job id.")], tenant: TenantOption = "") -> None:
    """Show one job: its state and why, placement, attempts, times and estimated cost."""
    job = _run(lambda c: c.get_job(job_id, tenant))
    rows = [
        ("job", job.job_id),
        ("tenant", job.tenant),
        ("name", job.name),
        ("state", state_name(job.state)),
        ("reason", job.state_reason),
        ("pool", job.pool),
        ("resources", f"{job.workers} worker(s) x {_resources(job.resources)}"),
        ("priority", f"{job.priority}" + (" (preemptible)" if job.preemptible else "")),
        ("attempt", f"{job.attempt} ({job.preemptions} preemption(s))"),
        ("command", " ".join(job.executor.command)),
        ("submitted", f"{_when(job.submit_time)} by {job.submitted_by}"),
        ("estimated cost", _money(job.estimated_cost.micros, job.estimated_cost.currency or "USD")),
    ]
    if job.state == pb.JOB_STATE_QUEUED:
        rows.append(("queue position", str(job.queue_position)))
    if job.placement.nodes:
        rows.append(("nodes", ", ".join(job.placement.nodes)))
        rows.append(("executor", job.placement.executor_ref))
    if job.start_time.seconds:
        rows.append(("started", _when(job.start_time)))
    if job.end_time.seconds:
        rows.append(("ended", f"{_when(job.end_time)} (exit code {job.exit_code})"))
    rows.append(("run time", f"{job.run_time.ToNanoseconds() / 1e9:.1f} s"))
    table = Table(show_header=False, box=None)
    for row in rows:
        table.add_row(*row)
    _out.print(table)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    tenant: TenantOption = "",
    reason: Annotated[str, typer.Option("--reason", help="Why, recorded on the job.")] = "",
) -> None:
    """Cancel a job: a queued one at once, a running one with SIGTERM (SIGKILL after its grace period)."""
    job = _run(lambda c: c.cancel_job(job_id, tenant, reason))
    typer.echo(f"{job.job_id}: {state_name(job.state)} ({job.state_reason})")


@jobs_app.command("watch")
def jobs_watch(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Jobs to follow until they end; none: every job.")] = None,
    tenant: TenantOption = "",
) -> None:
    """Print each change of jobs as it happens (state, queue position, reason) until the named jobs end."""

    async def work(client: SchedulerClient) -> None:
        async for change in client.watch_jobs(tenant, job_ids=job_ids or [], include_current=True):
            job = change.job
            moved = "" if change.previous_state == job.state else f"{state_name(change.previous_state)} -> "
            where = f" #{job.queue_position}" if job.state == pb.JOB_STATE_QUEUED else ""
            _out.print(f"{job.job_id} {moved}{state_name(job.state)}{where}: {job.state_reason}")

    _run(work)


@quota_app.command("show")
def quota_show(tenant: TenantOption = "", pool: Annotated[str, typer.Option("--pool", "-p")] = "") -> None:
    """Show the tenant's quotas (its own, or the pool's default) with what it uses and borrows."""
    quotas = _run(lambda c: c.get_quota(tenant, pool))
    table = Table("pool", "nominal", "borrowing limit", "cohort", "allocated", "borrowed", "running", "queued", "share")
    for usage in quotas:
        q = usage.quota
        table.add_row(
            q.pool,
            _resources(q.nominal),
            _resources(q.borrowing_limit) if q.HasField("borrowing_limit") else ("unlimited" if q.cohort else "-"),
            q.cohort,
            _resources(usage.allocated),
            _resources(usage.borrowed),
            str(usage.running_jobs),
            str(usage.queued_jobs),
            f"{usage.share:.3f}",
        )
    _out.print(table)


@quota_app.command("set")
def quota_set(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant; empty: the pool's default quota.")],
    cpu: Annotated[str, typer.Option("--cpu", help="Nominal CPU: cores (4, 0.5) or millicores (500m).")],
    memory: Annotated[str, typer.Option("--memory", help="Nominal memory, e.g. 16Gi.")],
    gpus: Annotated[int, typer.Option("--gpus", help="Nominal GPUs.")] = 0,
    pool: PoolOption = "",
    cohort: Annotated[str, typer.Option("--cohort", help="Cohort to lend to and borrow from.")] = "",
    borrow_cpu: Annotated[str, typer.Option("--borrow-cpu", help="Borrowing limit (CPU); unset: unlimited.")] = "",
    borrow_memory: Annotated[str, typer.Option("--borrow-memory", help="Borrowing limit (memory).")] = "",
    weight: Annotated[float, typer.Option("--weight", help="Fair-sharing weight.")] = 1.0,
    max_running: Annotated[int, typer.Option("--max-running", help="Running jobs at once; 0: no limit.")] = 0,
    max_queued: Annotated[int, typer.Option("--max-queued", help="Queued jobs; 0: no limit.")] = 0,
) -> None:
    """Set a tenant's quota in a pool (platform admins)."""
    quota = pb.Quota(
        pool=pool,
        nominal=resources(parse_quantity(cpu, "cpu"), parse_quantity(memory, "memory"), gpus),
        cohort=cohort,
        weight=weight,
        max_running_jobs=max_running,
        max_queued_jobs=max_queued,
    )
    if borrow_cpu or borrow_memory:
        quota.borrowing_limit.CopyFrom(
            resources(parse_quantity(borrow_cpu or "0", "cpu"), parse_quantity(borrow_memory or "0", "memory"))
        )
    stored = _run(lambda c: c.set_quota(tenant, quota))
    typer.echo(f"quota of {tenant or 'every tenant (default)'} in {stored.pool}: {_resources(stored.nominal)}")


def _pools_table(pools: list[pb.Pool]) -> Table:
    table = Table("pool", "executor", "capacity", "allocated", "running", "queued", "cpu/h", "GiB/h", "max run")
    for pool in pools:
        currency = pool.prices.cpu_core_hour.currency or "USD"
        table.add_row(
            pool.name + (" (default)" if pool.default else ""),
            pb.ExecutorKind.Name(pool.executor).removeprefix("EXECUTOR_KIND_").lower(),
            _resources(pool.capacity),
            _resources(pool.allocated),
            str(pool.running_jobs),
            str(pool.queued_jobs),
            _money(pool.prices.cpu_core_hour.micros, currency),
            _money(pool.prices.memory_gib_hour.micros, currency),
            f"{pool.max_run_duration.seconds / 3600:g} h",
        )
    return table


def _nodes_table(pools: list[pb.Pool]) -> Table:
    table = Table("node", "pool", "state", "capacity", "allocated", "jobs", "labels")
    for pool in pools:
        for node in pool.nodes:
            table.add_row(
                node.name,
                pool.name,
                pb.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower(),
                _resources(node.capacity),
                _resources(node.allocated),
                str(node.running_jobs),
                ", ".join(f"{k}={v}" for k, v in sorted(node.labels.items())),
            )
    return table


@pools_app.callback()
def pools_main(ctx: typer.Context) -> None:
    """Without a subcommand: the pools as you see them."""
    if ctx.invoked_subcommand is None:
        _out.print(_pools_table(_run(lambda c: c.list_pools())))


@pools_app.command("show")
def pools_show(tenant: TenantOption = "") -> None:
    """Pools with capacity, allocation, prices and (for operators) their nodes."""
    pools = _run(lambda c: c.list_pools(tenant))
    _out.print(_pools_table(pools))
    if any(p.nodes for p in pools):
        _out.print(_nodes_table(pools))


def _prices(cpu_hour: float, memory_hour: float, gpu_hour: list[str]) -> pb.PoolPrices:
    gpu = {}
    for item in gpu_hour:
        name, sep, price = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--gpu-hour {item!r}: give type=price, e.g. nvidia-a100-80gb=2.5")
        gpu[name] = round(float(price) * 1_000_000)
    return prices(round(cpu_hour * 1_000_000), round(memory_hour * 1_000_000), gpu)


@pools_app.command("create")
def pools_create(
    name: Annotated[str, typer.Argument(help="Pool name: lowercase letters, digits and '-'.")],
    cpu_hour: Annotated[float, typer.Option("--cpu-hour", help="Price per CPU core-hour.")] = 0.04,
    memory_hour: Annotated[float, typer.Option("--memory-hour", help="Price per GiB-hour.")] = 0.005,
    gpu_hour: Annotated[list[str] | None, typer.Option("--gpu-hour", help="type=price per GPU-hour.")] = None,
    max_run_hours: Annotated[float, typer.Option("--max-run-hours", help="Longest run of a job.")] = 24.0,
) -> None:
    """Create a pool (platform admins); its prices go to billing's price book."""
    pool = pb.Pool(
        name=name,
        prices=_prices(cpu_hour, memory_hour, gpu_hour or []),
        max_run_duration=duration(max_run_hours * 3600),
    )
    created = _run(lambda c: c.create_pool(pool))
    typer.echo(f"created pool {created.name}")


@pools_app.command("update")
def pools_update(
    name: Annotated[str, typer.Argument(help="The pool.")],
    cpu_hour: Annotated[float | None, typer.Option("--cpu-hour", help="Price per CPU core-hour.")] = None,
    memory_hour: Annotated[float, typer.Option("--memory-hour", help="Price per GiB-hour (with --cpu-hour).")] = 0.005,
    gpu_hour: Annotated[list[str] | None, typer.Option("--gpu-hour", help="type=price (with --cpu-hour).")] = None,
    max_run_hours: Annotated[float | None, typer.Option("--max-run-hours", help="Longest run of a job.")] = None,
) -> None:
    """Change a pool's prices (all of them, from billing's next price book version) or its max run duration."""
    pool, fields = pb.Pool(name=name), []
    if cpu_hour is not None:
        pool.prices.CopyFrom(_prices(cpu_hour, memory_hour, gpu_hour or []))
        fields.append("prices")
    if max_run_hours is not None:
        pool.max_run_duration.CopyFrom(duration(max_run_hours * 3600))
        fields.append("max_run_duration")
    if not fields:
        raise typer.BadParameter("give --cpu-hour (with the other prices) and/or --max-run-hours")
    updated = _run(lambda c: c.update_pool(pool, fields))
    typer.echo(f"updated pool {updated.name}")


@node_app.command("add")
def node_add(
    name: Annotated[str, typer.Argument(help="Node name (unique across pools).")],
    pool: Annotated[str, typer.Option("--pool", "-p", help="Its pool.")],
    cpu: Annotated[str, typer.Option("--cpu", help="CPU capacity: cores or millicores (500m).")],
    memory: Annotated[str, typer.Option("--memory", help="Memory capacity, e.g. 64Gi.")],
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs.")] = 0,
    gpu_type: Annotated[str, typer.Option("--gpu-type", help="Their model, e.g. nvidia-a100-80gb.")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", help="key=value (repeatable).")] = None,
) -> None:
    """Add a node to a pool (platform admins)."""
    node = pb.Node(
        name=name,
        pool=pool,
        capacity=resources(parse_quantity(cpu, "cpu"), parse_quantity(memory, "memory"), gpus, gpu_type),
        labels=dict(item.partition("=")[::2] for item in label or []),
    )
    added = _run(lambda c: c.add_node(node))
    typer.echo(f"added node {added.name} to pool {added.pool}: {_resources(added.capacity)}")


@node_app.command("update")
def node_update(
    name: Annotated[str, typer.Argument(help="The node.")],
    cpu: Annotated[str, typer.Option("--cpu", help="New CPU capacity.")],
    memory: Annotated[str, typer.Option("--memory", help="New memory capacity.")],
    gpus: Annotated[int, typer.Option("--gpus")] = 0,
    gpu_type: Annotated[str, typer.Option("--gpu-type")] = "",
) -> None:
    """Change a node's capacity (refused below what it holds now)."""
    node = pb.Node(
        name=name, capacity=resources(parse_quantity(cpu, "cpu"), parse_quantity(memory, "memory"), gpus, gpu_type)
    )
    updated = _run(lambda c: c.update_node(node, ["capacity"]))
    typer.echo(f"node {updated.name}: {_resources(updated.capacity)}")


def _set_state(name: str, state: pb.NodeState.ValueType) -> None:
    updated = _run(lambda c: c.update_node(pb.Node(name=name, state=state), ["state"]))
    typer.echo(f"node {updated.name}: {pb.NodeState.Name(updated.state).removeprefix('NODE_STATE_').lower()}")


@node_app.command("drain")
def node_drain(name: Annotated[str, typer.Argument(help="The node.")]) -> None:
    """Stop placing new jobs on a node; its jobs run to their end."""
    _set_state(name, pb.NODE_STATE_DRAINING)


@node_app.command("undrain")
def node_undrain(name: Annotated[str, typer.Argument(help="The node.")]) -> None:
    """Place jobs on a node again."""
    _set_state(name, pb.NODE_STATE_READY)


@node_app.command("remove")
def node_remove(name: Annotated[str, typer.Argument(help="The node (it must hold no jobs).")]) -> None:
    """Remove a node that holds no jobs."""
    _run(lambda c: c.remove_node(name))
    typer.echo(f"removed node {name}")
