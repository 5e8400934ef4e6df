"""The scheduler service's rows of the authorization matrix (see tests/test_authorization_matrix.py)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.scheduler.config import SchedulerSettings
from tests.conftest import RunningAuth
from tests.matrix_support import EVERYONE, PLATFORM, ServiceUnderTest
from tests.scheduler.service_support import runner_command, scheduler_env, start_scheduler

SERVICE = "aidc.scheduler.v1.SchedulerService"
DESCRIPTOR = pb.DESCRIPTOR.services_by_name["SchedulerService"]

JOB_WRITERS = frozenset({"tenant-admin", "developer", "platform-admin"})
JOB_READERS = frozenset({"tenant-admin", "developer", "viewer", "platform-admin"})
POOL_READERS = JOB_READERS

# Tenants see and cancel only their own jobs; quotas are readable by every role of the tenant (billing-viewers
# too: they explain spend), pools by those who run jobs or watch them; writing quotas and pools is for operators.
# A job runs a program on the platform's machines: only platform admins submit one directly (the matrix calls with
# tokens alone); tenants' jobs come through mesh services (the training service, with the tenant's token:
# tests/scheduler/test_service_jobs.py).
EXPECTED: dict[str, frozenset[str]] = {
    "SubmitJob": PLATFORM,
    "GetJob": JOB_READERS,
    "ListJobs": JOB_READERS,
    "WatchJobs": JOB_READERS,
    "CancelJob": JOB_WRITERS,
    "SetQuota": PLATFORM,
    "GetQuota": EVERYONE,
    "ListPools": POOL_READERS,
    "CreatePool": PLATFORM,
    "UpdatePool": PLATFORM,
    "AddNode": PLATFORM,
    "UpdateNode": PLATFORM,
    "RemoveNode": PLATFORM,
}

#: RPCs whose decision does not depend on the tenant named in the request (platform-scoped rules).
TENANT_FREE = {"SetQuota", "CreatePool", "UpdatePool", "AddNode", "UpdateNode", "RemoveNode"}

_counter = itertools.count()


def build_request(rpc: str, tenant: str) -> Any:
    """A well-formed request for a scheduler RPC that names ``tenant``."""
    n = next(_counter)
    cpu = pb.Resources(cpu_millicores=100, memory_bytes=256 * 2**20)
    requests: dict[str, Callable[[], Any]] = {
        "SubmitJob": lambda: pb.SubmitJobRequest(
            tenant=tenant, resources=cpu, executor=pb.ExecutorSpec(command=runner_command(1, 0.01))
        ),
        "GetJob": lambda: pb.GetJobRequest(tenant=tenant, job_id="j-none"),
        "ListJobs": lambda: pb.ListJobsRequest(tenant=tenant),
        # Watching a named job ends (here at once: NOT_FOUND), so the call returns.
        "WatchJobs": lambda: pb.WatchJobsRequest(tenant=tenant, job_ids=["j-none"]),
        "CancelJob": lambda: pb.CancelJobRequest(tenant=tenant, job_id="j-none"),
        "SetQuota": lambda: pb.SetQuotaRequest(tenant=tenant, quota=pb.Quota(pool="default", nominal=cpu)),
        "GetQuota": lambda: pb.GetQuotaRequest(tenant=tenant),
        "ListPools": lambda: pb.ListPoolsRequest(tenant=tenant),
        "CreatePool": lambda: pb.CreatePoolRequest(pool=pb.Pool(name=f"pool-{n}")),
        "UpdatePool": lambda: pb.UpdatePoolRequest(pool=pb.Pool(name="default", max_run_duration={"seconds": 3600})),
        "AddNode": lambda: pb.AddNodeRequest(node=pb.Node(name=f"node-{n}", pool="default", capacity=cpu)),
        "UpdateNode": lambda: pb.UpdateNodeRequest(
            node=pb.Node(name="local", labels={"n": str(n)}), update_mask={"paths": ["labels"]}
        ),
        "RemoveNode": lambda: pb.RemoveNodeRequest(name="node-none"),
    }
    return requests[rpc]()


@asynccontextmanager
async def serve(auth: RunningAuth, tmp_path: Path) -> AsyncIterator[str]:
    """Starts the scheduler (in this process) next to the running auth; billing's address has no server."""
    settings = SchedulerSettings.from_env(scheduler_env(tmp_path / "scheduler-data", auth.address))
    running = await start_scheduler(settings, {})
    try:
        yield running.address
    finally:
        await running.stop()


#: What only mesh services call (refused on the tenant path to everyone).
MESH_ONLY = frozenset({"SubmitJob"})

#: What writes the pool's prices into billing's price book (billing is not running here).
REACH_BILLING = frozenset({"CreatePool", "UpdatePool"})

UNDER_TEST = ServiceUnderTest(
    SERVICE, DESCRIPTOR, EXPECTED, TENANT_FREE, build_request, serve, MESH_ONLY, reach_absent_services=REACH_BILLING
)
