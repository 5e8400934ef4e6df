"""Bad input to the scheduler gets INVALID_ARGUMENT, FAILED_PRECONDITION (or the matching status) with the reason,
through the real server, and changes nothing: no job queued, no pool, node or quota changed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.errors import (
    AidcError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.scheduler.client import SchedulerClient, prices, resources
from tests.scheduler.service_support import (
    GIB,
    RunningScheduler,
    runner_command,
    runner_events,
    set_quota,
    wait_for,
)

CPU = 1000


def _submit(**overrides: Any) -> Callable[[SchedulerClient], Awaitable[Any]]:
    arguments: dict[str, Any] = {"resources": resources(CPU, GIB)}
    arguments.update(overrides)
    command = arguments.pop("command", runner_command(1, 0.01))
    return lambda client: client.submit_job(command, **arguments)


SUBMISSIONS: list[tuple[str, Callable[[SchedulerClient], Awaitable[Any]], type[AidcError], str]] = [
    ("unknown pool", _submit(pool="nowhere"), InvalidArgument, "unknown pool 'nowhere'"),
    ("negative resources", _submit(resources=resources(-1000, GIB)), InvalidArgument, "negative"),
    ("no resources", _submit(resources=resources()), InvalidArgument, "request some"),
    ("absurd resources", _submit(resources=resources(1_000_000, GIB)), InvalidArgument, "no node of pool default"),
    ("absurd memory", _submit(resources=resources(CPU, 2**60)), InvalidArgument, "no node of pool default"),
    ("gang bigger than any pool", _submit(workers=8), InvalidArgument, "gang of 8 workers"),
    ("GPU type nobody has", _submit(resources=resources(CPU, GIB, 1, "nvidia-h100-80gb")), InvalidArgument, "GPU"),
    ("no command", _submit(command=[]), InvalidArgument, "command"),
    ("bad env name", _submit(env={"1BAD": "x"}), InvalidArgument, "environment variable"),
    ("env and secret clash", _submit(env={"A": "1"}, secret_env={"A": "2"}), InvalidArgument, "both"),
    ("priority out of range", _submit(priority=5000), InvalidArgument, "priority"),
    ("privileged priority", _submit(priority=900), PermissionDenied, "priorities above 500"),
    ("run longer than the pool allows", _submit(max_run_seconds=10**7), InvalidArgument, "max_run_duration"),
    ("negative retries", _submit(max_retries=-1), InvalidArgument, "max_retries"),
    ("relative working dir", _submit(working_dir="tmp"), InvalidArgument, "absolute"),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), SUBMISSIONS, ids=[c[0] for c in SUBMISSIONS])
async def test_bad_submissions_are_refused_with_the_reason_and_queue_nothing(
    scheduler: RunningScheduler,
    case: str,
    call: Callable[[SchedulerClient], Awaitable[Any]],
    error: type[AidcError],
    message: str,
) -> None:
    client = scheduler.submitter("acme/dev")
    with pytest.raises(error) as raised:
        await call(client)
    assert type(raised.value) is error and message in raised.value.message, raised.value.message
    jobs, _ = await scheduler.client("platform/admin").list_jobs()
    assert jobs == []


async def test_a_quota_below_what_the_tenant_holds_is_refused_and_changes_nothing(scheduler: RunningScheduler) -> None:
    admin, client = scheduler.client("platform/admin"), scheduler.submitter("acme/dev")
    await set_quota(admin, "acme", 3 * CPU)
    job = (await client.submit_job(runner_command(600, 0.1), resources=resources(2 * CPU, GIB))).job
    await wait_for(client, job.job_id, lambda j: len(runner_events(scheduler.settings, j.job_id)) == 1)
    with pytest.raises(FailedPrecondition) as raised:
        await set_quota(admin, "acme", CPU)
    assert "holds 2 cpu" in raised.value.message
    [usage] = await client.get_quota(pool="default")
    assert usage.quota.nominal.cpu_millicores == 3 * CPU and usage.allocated.cpu_millicores == 2 * CPU
    with pytest.raises(InvalidArgument, match="unknown pool"):
        await admin.set_quota("acme", pb.Quota(pool="nowhere", nominal=resources(CPU)))
    with pytest.raises(InvalidArgument, match="negative"):
        await admin.set_quota("acme", pb.Quota(pool="default", nominal=resources(-CPU)))
    with pytest.raises(InvalidArgument, match="cohort"):
        await admin.set_quota(
            "acme", pb.Quota(pool="default", nominal=resources(4 * CPU), borrowing_limit=resources(CPU))
        )
    [usage] = await client.get_quota(pool="default")
    assert usage.quota.nominal.cpu_millicores == 3 * CPU
    await client.cancel_job(job.job_id)


async def test_bad_pool_and_node_changes_are_refused_and_change_nothing(scheduler: RunningScheduler) -> None:
    admin, client = scheduler.client("platform/admin"), scheduler.submitter("acme/dev")
    before = await admin.list_pools()
    cases: list[tuple[Awaitable[Any], type[AidcError], str]] = [
        (admin.create_pool(pb.Pool(name="Bad Name")), InvalidArgument, "pool name"),
        (admin.create_pool(pb.Pool(name="default")), AlreadyExists, "already exists"),
        (admin.create_pool(pb.Pool(name="neg", prices=prices(-1))), InvalidArgument, "negative"),
        (admin.create_pool(pb.Pool(name="ray", executor=pb.EXECUTOR_KIND_RAY)), FailedPrecondition, "ray"),
        (admin.update_pool(pb.Pool(name="nowhere"), ["prices"]), NotFound, "nowhere"),
        (admin.update_pool(pb.Pool(name="default"), ["color"]), InvalidArgument, "update_mask"),
        (admin.add_node(pb.Node(name="n1", pool="nowhere", capacity=resources(CPU))), InvalidArgument, "unknown pool"),
        (admin.add_node(pb.Node(name="local", pool="default", capacity=resources(CPU))), AlreadyExists, "exists"),
        (admin.add_node(pb.Node(name="n1", pool="default", capacity=resources())), InvalidArgument, "capacity"),
        (admin.add_node(pb.Node(name="n1", pool="default", capacity=resources(CPU, 0, 2))), InvalidArgument, "gpu"),
        (
            admin.add_node(pb.Node(name="n1", pool="default", capacity=resources(-CPU, GIB))),
            InvalidArgument,
            "negative",
        ),
        (admin.update_node(pb.Node(name="nowhere"), ["labels"]), NotFound, "nowhere"),
        (admin.remove_node("nowhere"), NotFound, "nowhere"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as raised:
            await call
        assert message in raised.value.message, raised.value.message
    assert await admin.list_pools() == before

    job = (await client.submit_job(runner_command(600, 0.1), resources=resources(3 * CPU, GIB))).job
    await wait_for(client, job.job_id, lambda j: len(runner_events(scheduler.settings, j.job_id)) == 1)
    with pytest.raises(FailedPrecondition, match="holds 3 cpu"):
        await admin.update_node(pb.Node(name="local", capacity=resources(2 * CPU, GIB)), ["capacity"])
    with pytest.raises(FailedPrecondition, match="drain it first"):
        await admin.remove_node("local")
    [pool] = await admin.list_pools()
    assert pool.nodes[0].capacity.cpu_millicores == 4 * CPU and pool.nodes[0].allocated.cpu_millicores == 3 * CPU
    await client.cancel_job(job.job_id)


async def test_other_tenants_jobs_are_not_found(scheduler: RunningScheduler) -> None:
    acme, globex = scheduler.submitter("acme/dev"), scheduler.submitter("globex/dev")
    job = (await acme.submit_job(runner_command(1, 0.01), resources=resources(CPU))).job
    for call in (globex.get_job(job.job_id), globex.cancel_job(job.job_id), globex.get_job(job.job_id, "acme")):
        with pytest.raises((NotFound, PermissionDenied)):
            await call
    assert (await acme.get_job(job.job_id)).job_id == job.job_id
    assert (await globex.list_jobs())[0] == []
