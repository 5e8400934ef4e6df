"""The scheduler service end to end through its real gRPC server (real auth, real runner processes): a job's
lifecycle, its process environment, quotas, gangs, cancellation, retries, max run duration, borrowing and reclaim by
preemption with checkpoint and resume, and WatchJobs."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.errors import PermissionDenied
from services.scheduler.client import resources
from tests.scheduler.service_support import (
    GIB,
    RunningScheduler,
    job_dir,
    runner_command,
    runner_events,
    set_quota,
    wait_for,
    wait_state,
    wait_terminal,
)

CPU = 1000  # millicores


async def test_a_job_runs_in_its_own_session_with_its_env_secret_and_trace_and_output_in_files(
    scheduler: RunningScheduler,
) -> None:
    client = scheduler.submitter("acme/dev")
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    submitted = await client.submit_job(
        runner_command(3, 0.05),
        resources=resources(CPU, GIB),
        env={"MODE": "test"},
        secret_env={"API_TOKEN": "s3cret-value-123"},
        trace_carrier={"traceparent": traceparent},
        labels={"purpose": "lifecycle"},
    )
    job = submitted.job
    assert job.state == pb.JOB_STATE_QUEUED and job.tenant == "acme" and job.submitted_by == "user:acme/dev"
    assert dict(job.executor.secret_env) == {"API_TOKEN": ""}  # never returned

    done = await wait_terminal(client, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.state_reason
    assert done.attempt == 1 and done.exit_code == 0 and list(done.placement.nodes) == ["local"]
    assert done.placement.executor_ref.startswith("pid ")
    assert done.start_time.ToNanoseconds() <= done.end_time.ToNanoseconds()
    assert done.estimated_cost.micros > 0 and done.estimated_cost.currency == "USD"

    [start, end] = runner_events(scheduler.settings, job.job_id)
    assert start["secret"] == "s3cret-value-123" and start["traceparent"] == traceparent
    # None of the scheduler's own settings or credentials (this process's AIDC_DATA_DIR, ...) reach the job: only
    # what the executor gives every worker.
    assert set(start["platform_variables"]) == {
        "AIDC_JOB_ID",
        "AIDC_JOB_ATTEMPT",
        "AIDC_WORKER_INDEX",
        "AIDC_WORKERS",
        "AIDC_NODE",
    }, start["platform_variables"]
    assert end["event"] == "done" and end["step"] == 3
    # Output went to files in the job's directory, not to a pipe.
    stdout = job_dir(scheduler.settings, job.job_id) / "attempt-1" / "worker-0.stdout"
    assert "starting at step 0" in stdout.read_text()
    # The secret is sealed at rest: no file of the scheduler's data directory holds it in plaintext.
    for path in (scheduler.settings.data_dir / "scheduler").glob("scheduler.db*"):
        assert b"s3cret-value-123" not in path.read_bytes(), path


async def test_a_job_runs_as_the_leader_of_its_own_process_group(scheduler: RunningScheduler) -> None:
    client = scheduler.submitter("acme/dev")
    job = (await client.submit_job(runner_command(30, 0.1), resources=resources(CPU, GIB))).job
    running = await wait_state(client, job.job_id, [pb.JOB_STATE_RUNNING])
    pid = int(running.placement.executor_ref.removeprefix("pid "))
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid and os.getsid(pid) != os.getsid(0)
    await client.cancel_job(job.job_id)
    assert (await wait_terminal(client, job.job_id)).state == pb.JOB_STATE_CANCELLED


async def test_the_tenants_quota_is_respected_end_to_end(scheduler: RunningScheduler) -> None:
    """Four 1-core jobs under a 2-core quota: while two hold it the others wait, saying so, and at no moment do more
    than two hold an allocation. Judged from the jobs' own admission and release times, not from polling, which a
    loaded machine could make too slow to catch two jobs at once."""
    admin = scheduler.client("platform/admin")
    await set_quota(admin, "acme", 2 * CPU)
    client = scheduler.submitter("acme/dev")
    ids = [
        (await client.submit_job(runner_command(20, 0.1), resources=resources(CPU, GIB))).job.job_id for _ in range(4)
    ]
    deadline = asyncio.get_running_loop().time() + 120
    reasons: set[str] = set()
    while not any("quota" in r for r in reasons):
        assert asyncio.get_running_loop().time() < deadline, f"no job waited for quota: {reasons}"
        jobs = [await client.get_job(i) for i in ids]
        reasons |= {j.state_reason for j in jobs if j.state == pb.JOB_STATE_QUEUED}
        [usage] = await client.get_quota(pool="default")
        assert usage.allocated.cpu_millicores <= 2 * CPU
        await asyncio.sleep(0.05)
    done = [await wait_terminal(client, i, timeout=180) for i in ids]
    assert [j.state for j in done] == [pb.JOB_STATE_SUCCEEDED] * 4
    held = [(j.start_time.ToNanoseconds(), j.end_time.ToNanoseconds()) for j in done]
    assert all(0 < start < end for start, end in held), held
    # The most allocations held at once: at every admission, count the jobs holding one.
    at_once = max(sum(s <= start < e for s, e in held) for start, _ in held)
    assert at_once == 2, held


async def test_a_gang_is_placed_all_at_once_or_not_at_all(scheduler: RunningScheduler) -> None:
    client = scheduler.submitter("acme/dev")
    blocker = (await client.submit_job(runner_command(600, 0.1), resources=resources(CPU, GIB))).job
    await wait_state(client, blocker.job_id, [pb.JOB_STATE_RUNNING])
    # Two workers of 2 cores each: 4 cores, but only 3 are free on the 4-core node.
    gang = (await client.submit_job(runner_command(3, 0.05), resources=resources(2 * CPU, GIB), workers=2)).job
    await asyncio.sleep(1.5)
    waiting = await client.get_job(gang.job_id)
    assert waiting.state == pb.JOB_STATE_QUEUED and waiting.state_reason, waiting
    assert not job_dir(scheduler.settings, gang.job_id).exists()  # no worker was started

    await client.cancel_job(blocker.job_id)
    done = await wait_terminal(client, gang.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.workers == 2
    assert list(done.placement.nodes) == ["local", "local"]
    for worker in (0, 1):
        events = runner_events(scheduler.settings, gang.job_id, worker)
        assert [e["event"] for e in events] == ["start", "done"] and events[0]["attempt"] == 1


async def test_cancel_a_queued_job_and_a_running_one(scheduler: RunningScheduler) -> None:
    admin = scheduler.client("platform/admin")
    await set_quota(admin, "acme", CPU)
    client = scheduler.submitter("acme/dev")
    running = (await client.submit_job(runner_command(600, 0.1), resources=resources(CPU, GIB))).job
    queued = (await client.submit_job(runner_command(600, 0.1), resources=resources(CPU, GIB))).job
    await wait_for(client, running.job_id, lambda j: len(runner_events(scheduler.settings, j.job_id)) == 1)

    cancelled = await client.cancel_job(queued.job_id, reason="not needed")
    assert cancelled.state == pb.JOB_STATE_CANCELLED and "not needed" in cancelled.state_reason
    assert not job_dir(scheduler.settings, queued.job_id).exists()

    stopping = await client.cancel_job(running.job_id)
    assert stopping.state == pb.JOB_STATE_CANCELLING
    done = await wait_terminal(client, running.job_id)
    assert done.state == pb.JOB_STATE_CANCELLED
    # The process got SIGTERM and checkpointed before it exited.
    assert [e["event"] for e in runner_events(scheduler.settings, running.job_id)] == ["start", "checkpoint"]
    again = await client.cancel_job(running.job_id)
    assert again.state == pb.JOB_STATE_CANCELLED and again.end_time == done.end_time


async def test_a_process_that_ignores_sigterm_is_killed_after_its_grace_period(scheduler: RunningScheduler) -> None:
    client = scheduler.submitter("acme/dev")
    job = (
        await client.submit_job(
            runner_command(600, 0.1, "--ignore-term"), resources=resources(CPU, GIB), grace_seconds=1.0
        )
    ).job
    await wait_for(client, job.job_id, lambda j: len(runner_events(scheduler.settings, j.job_id)) == 1)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    await client.cancel_job(job.job_id)
    done = await wait_terminal(client, job.job_id)
    assert done.state == pb.JOB_STATE_CANCELLED and done.exit_code == 137
    assert loop.time() - asked >= 1.0


async def test_a_failing_job_is_retried_then_fails_with_its_exit_code(scheduler: RunningScheduler) -> None:
    client = scheduler.submitter("acme/dev")
    job = (
        await client.submit_job(runner_command(3, 0.05, "--fail-code", "3"), resources=resources(CPU), max_retries=1)
    ).job
    done = await wait_terminal(client, job.job_id)
    assert done.state == pb.JOB_STATE_FAILED and done.exit_code == 3 and done.attempt == 2, done
    assert [e["attempt"] for e in runner_events(scheduler.settings, job.job_id) if e["event"] == "start"] == [1, 2]


async def test_a_job_running_past_its_max_run_duration_is_stopped_and_fails(scheduler: RunningScheduler) -> None:
    client = scheduler.submitter("acme/dev")
    job = (
        await client.submit_job(runner_command(600, 0.1), resources=resources(CPU), max_run_seconds=1, max_retries=2)
    ).job
    done = await wait_terminal(client, job.job_id)
    assert done.state == pb.JOB_STATE_FAILED and "max run duration" in done.state_reason and done.attempt == 1
    assert done.run_time.ToNanoseconds() >= 10**9


async def test_only_mesh_services_and_platform_admins_may_run_programs(scheduler: RunningScheduler) -> None:
    """A job is a program run on the platform's machine: a tenant with jobs:write calling SubmitJob itself is refused
    (its fine-tunes go through the training service); through a mesh service's certificate the tenant's token still
    decides (authorization, privileged priorities), and a platform admin may."""
    command, cpu = runner_command(1, 0.01), resources(CPU)
    with pytest.raises(PermissionDenied, match="only platform admins and mesh services.*SubmitFineTune"):
        await scheduler.client("acme/dev").submit_job(command, resources=cpu)
    with pytest.raises(PermissionDenied, match="may not write jobs"):
        await scheduler.client("acme/viewer", via="training").submit_job(command, resources=cpu)
    with pytest.raises(PermissionDenied, match="priorities above 500"):
        await scheduler.submitter("acme/dev").submit_job(command, resources=cpu, priority=900)
    admin = scheduler.client("platform/admin")
    assert (await admin.list_jobs())[0] == []  # the refused submissions queued nothing

    via_training = (await scheduler.submitter("acme/dev").submit_job(command, resources=cpu)).job
    assert (via_training.tenant, via_training.submitted_by) == ("acme", "user:acme/dev")
    by_admin = (await admin.submit_job(command, tenant="acme", resources=cpu, priority=900)).job
    assert (by_admin.tenant, by_admin.submitted_by, by_admin.priority) == ("acme", "user:platform/admin", 900)
    # The tenant still sees and follows its jobs on its own path.
    tenant = scheduler.client("acme/dev")
    assert (await wait_terminal(tenant, via_training.job_id)).state == pb.JOB_STATE_SUCCEEDED
    assert (await wait_terminal(tenant, by_admin.job_id)).state == pb.JOB_STATE_SUCCEEDED


async def test_submit_is_idempotent_on_its_key_per_tenant(scheduler: RunningScheduler) -> None:
    acme, globex = scheduler.submitter("acme/dev"), scheduler.submitter("globex/dev")
    first = await acme.submit_job(runner_command(1, 0.01), resources=resources(CPU), idempotency_key="k1")
    again = await acme.submit_job(runner_command(1, 0.01), resources=resources(CPU), idempotency_key="k1")
    other = await globex.submit_job(runner_command(1, 0.01), resources=resources(CPU), idempotency_key="k1")
    assert not first.deduplicated and again.deduplicated and not other.deduplicated
    assert again.job.job_id == first.job.job_id != other.job.job_id
    await wait_terminal(acme, first.job.job_id)
    late = await acme.submit_job(runner_command(1, 0.01), resources=resources(CPU), idempotency_key="k1")
    assert late.deduplicated and late.job.job_id == first.job.job_id and late.job.state == pb.JOB_STATE_SUCCEEDED


async def test_borrowed_work_is_preempted_when_its_owner_reclaims_and_resumes_from_its_checkpoint(
    scheduler: RunningScheduler,
) -> None:
    admin = scheduler.client("platform/admin")
    await set_quota(admin, "acme", 2 * CPU, cohort="lab")
    await set_quota(admin, "globex", 2 * CPU, cohort="lab")
    globex, acme = scheduler.submitter("globex/dev"), scheduler.submitter("acme/dev")
    changes: list[pb.WatchJobsResponse] = []

    async def watch() -> None:
        async for change in globex.watch_jobs():
            changes.append(change)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    # globex takes the whole node: its own 2 cores and 2 borrowed from acme's unused quota.
    borrowers = [
        (
            await globex.submit_job(
                runner_command(80, 0.1), resources=resources(2 * CPU, GIB), preemptible=True, grace_seconds=10
            )
        ).job
        for _ in range(2)
    ]
    for job in borrowers:
        await wait_for(globex, job.job_id, lambda j: len(runner_events(scheduler.settings, j.job_id)) == 1)
    [usage] = await globex.get_quota(pool="default")
    assert usage.allocated.cpu_millicores == 4 * CPU and usage.borrowed.cpu_millicores == 2 * CPU

    # acme reclaims its nominal quota: one of globex's jobs is preempted (SIGTERM, checkpoint, requeued).
    owner = (await acme.submit_job(runner_command(10, 0.1), resources=resources(2 * CPU, GIB))).job
    victim = await _first_preempted(globex, [j.job_id for j in borrowers])
    assert victim.state == pb.JOB_STATE_QUEUED and victim.attempt == 2 and victim.preemptions == 1
    first = runner_events(scheduler.settings, victim.job_id)
    assert [e["event"] for e in first] == ["start", "checkpoint"]
    checkpointed = first[-1]["step"]
    assert checkpointed > 0
    assert (await wait_terminal(acme, owner.job_id)).state == pb.JOB_STATE_SUCCEEDED

    resumed = await wait_terminal(globex, victim.job_id, timeout=120)
    assert resumed.state == pb.JOB_STATE_SUCCEEDED and resumed.attempt == 2
    events = runner_events(scheduler.settings, victim.job_id)
    assert [(e["event"], e["attempt"]) for e in events] == [
        ("start", 1),
        ("checkpoint", 1),
        ("start", 2),
        ("done", 2),
    ]
    assert events[2]["step"] == checkpointed  # resumed from its checkpoint, not from scratch
    # The watch delivers the end too, if later than GetJob answered it (a loaded run cancelled the watch first).
    for _ in range(300):
        if any(c.job.job_id == victim.job_id and c.job.state == pb.JOB_STATE_SUCCEEDED for c in changes):
            break
        await asyncio.sleep(0.1)
    watcher.cancel()
    path = [(c.previous_state, c.job.state) for c in changes if c.job.job_id == victim.job_id]
    for step in [
        (pb.JOB_STATE_SCHEDULED, pb.JOB_STATE_RUNNING),
        (pb.JOB_STATE_RUNNING, pb.JOB_STATE_PREEMPTED),
        (pb.JOB_STATE_PREEMPTED, pb.JOB_STATE_QUEUED),
        (pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED),
    ]:
        assert step in path, path
    assert all(c.job.tenant == "globex" for c in changes)
    reasons = {c.job.state: c.job.state_reason for c in changes if c.job.job_id == victim.job_id}
    assert reasons[pb.JOB_STATE_PREEMPTED].startswith("preempting:"), reasons


async def _first_preempted(client: object, job_ids: list[str]) -> pb.Job:
    from services.scheduler.client import SchedulerClient

    assert isinstance(client, SchedulerClient)
    for _ in range(600):
        for job_id in job_ids:
            job = await client.get_job(job_id)
            if job.preemptions:
                return job
        await asyncio.sleep(0.1)
    raise AssertionError("no job was preempted")
