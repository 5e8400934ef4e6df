"""Wiring of the scheduler service: database, policy core, executors, billing (budget answers, usage outbox, price
book), the domain (jobs, inventory), this machine as the default pool, the servicer, and the mesh server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from services.billing.client import BillingClient, UsageEmitter, money
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2_grpc
from services.mesh.channels import service_channel
from services.mesh.config import master_key
from services.mesh.db import open_database
from services.mesh.forwarding import LeaderForwarding
from services.mesh.leader import LeaderElection
from services.mesh.metrics import metrics_enabled
from services.mesh.security import secured_server
from services.mesh.server import MeshServer, Registration
from services.scheduler.config import SchedulerSettings
from services.scheduler.core import DEFAULT_TENANT, Prices, Resources, Scheduler
from services.scheduler.domain.budget import BudgetAnswer
from services.scheduler.domain.clusternodes import ClusterNodes
from services.scheduler.domain.inventory import Inventory
from services.scheduler.domain.jobs import JobOptions, JobScheduler
from services.scheduler.domain.model import Allocation, QuotaRecord
from services.scheduler.domain.requests import NodeChange, PoolChange
from services.scheduler.domain.secrets import SecretSealer
from services.scheduler.executors import Executor, LocalExecutor
from services.scheduler.machine import detect_machine
from services.scheduler.metering import AllocationMeter
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.permissions import PERMISSIONS
from services.scheduler.pricebook import PriceBookSync
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.store import MIGRATIONS, SchedulerStore

__all__ = ["build_server", "SERVICE", "BillingBudget", "register_local_machine"]

SERVICE = "scheduler"

log = logging.getLogger(__name__)


class BillingBudget:
    """Billing's CheckBudget, asked as the scheduler itself."""

    def __init__(self, billing: BillingClient, currency: str) -> None:
        self._billing = billing
        self._currency = currency

    async def check_budget(self, tenant: str, estimated_micros: int) -> BudgetAnswer:
        answer = await self._billing.check_budget(tenant, money(estimated_micros, self._currency))
        remaining = answer.remaining.micros if answer.HasField("remaining") else None
        return BudgetAnswer(answer.allowed, remaining, answer.reason)


def _default_prices(settings: SchedulerSettings) -> Prices:
    """The configured prices (the seeded price book's): this machine's pool, and a Ray pool created at start."""
    return Prices(
        settings.scheduler_cpu_core_hour_micros, settings.scheduler_memory_gib_hour_micros, settings.gpu_prices()
    )


async def register_local_machine(inventory: Inventory, settings: SchedulerSettings) -> None:
    """The default pool (created at the configured prices if missing) with this machine as its node."""
    name = settings.scheduler_default_pool
    if name not in inventory.pools:
        await inventory.create_pool(
            PoolChange(name, "local", _default_prices(settings), settings.scheduler_max_run_seconds),
            is_default=True,
            sync=False,
        )
    if not settings.scheduler_register_local_node:
        return
    machine = detect_machine(settings.scheduler_local_cpu_millicores, settings.scheduler_local_memory_bytes)
    capacity = Resources(machine.cpu_millicores, machine.memory_bytes, machine.gpus, machine.gpu_type)
    node = settings.scheduler_local_node_name or "local"
    if node in inventory.nodes:
        if inventory.nodes[node].capacity != capacity:
            await inventory.update_node(NodeChange(node, capacity=capacity))
    else:
        await inventory.add_node(
            NodeChange(node, pool=name, capacity=capacity, labels={"aidc.io/machine": "local"}), sync=False
        )
    if (DEFAULT_TENANT, name) not in inventory.quotas:
        # Out of the box every tenant may use the whole machine (no cohort: nothing to borrow); operators narrow it
        # with `aidc quota set` (the pool's default, or per tenant).
        await inventory.set_quota(QuotaRecord(DEFAULT_TENANT, name, replace(capacity, gpu_type=""), None, None))
    log.info("this machine is node %s of pool %s: %s", node, name, capacity.describe())


async def build_server(
    settings: SchedulerSettings,
    address: str | None = None,
    *,
    executors: dict[str, Executor] | None = None,
) -> MeshServer:
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    store = SchedulerStore(db)
    election = LeaderElection.for_service(db, settings, SERVICE)
    billing = BillingClient(service_channel("billing", settings, identity=SERVICE))
    emitter = UsageEmitter.for_service(settings, SERVICE)
    sealer = SecretSealer(master_key(settings.scheduler_master_key, settings.scheduler_dir / "master.key"))
    sealer.check((job.job_id, job.sealed_secrets) for job in store.active_jobs())

    async def save_allocation(allocation: Allocation) -> None:
        await jobs.writer.save_allocation(allocation)

    meter = AllocationMeter(emitter, save_allocation, interval_seconds=settings.scheduler_metering_interval_seconds)
    if executors is None:
        executors = {"local": LocalExecutor(poll_seconds=settings.scheduler_poll_seconds)}
        if settings.scheduler_ray_address:
            # Imported only with a Ray cluster configured: the module itself does not import ray until it connects.
            from services.scheduler.executors.ray_cluster import RayCluster
            from services.scheduler.executors.ray_executor import RayExecutor

            cluster = RayCluster(settings.scheduler_ray_address)
            executors["ray"] = RayExecutor(cluster, LocalExecutor(poll_seconds=settings.scheduler_poll_seconds))
    jobs = JobScheduler(
        store,
        Scheduler(),
        executors,
        meter,
        BillingBudget(billing, settings.scheduler_currency),
        sealer,
        JobOptions(
            jobs_dir=settings.jobs_dir,
            default_pool=settings.scheduler_default_pool,
            default_grace_seconds=settings.scheduler_default_grace_seconds,
            cycle_interval_seconds=settings.scheduler_cycle_interval_seconds,
            budget_cache_seconds=settings.scheduler_budget_cache_seconds,
            currency=settings.scheduler_currency,
        ),
        metrics=SchedulerMetrics(metrics_enabled(settings)),
    )
    inventory = Inventory(store, jobs, PriceBookSync(billing))
    ray_executor = executors.get("ray")
    ray_nodes = (
        None
        if ray_executor is None
        else ClusterNodes(
            inventory,
            ray_executor.cluster,  # type: ignore[attr-defined]
            settings.scheduler_ray_pool,
            "ray",
            _default_prices(settings),
            settings.scheduler_max_run_seconds,
            settings.scheduler_ray_sync_seconds,
        )
    )
    if ray_nodes is not None:
        ray_executor.on_nodes_lost = ray_nodes.sync  # type: ignore[union-attr]
    servicer = SchedulerServicer(jobs, inventory, settings.scheduler_currency)
    # Billing takes usage only from a mesh service's certificate: without certificates (plaintext dev mode) the
    # usage waits in the outbox until mTLS is configured.
    delivers_usage = settings.tls_dir() is not None
    closing = False
    leading = asyncio.Event()
    loaded = False

    async def lead() -> None:
        """The scheduler proper, on the leader only: the queue, the cycle, launching, adopting what a previous
        leader on this machine left running, metering. A follower forwards every RPC here."""
        nonlocal loaded
        if loaded:
            # Its state was loaded into this process once (the queue, the policy's jobs and nodes), and cannot be
            # loaded again: leading again after a lost lease, or after a start that failed half-way, would restore
            # jobs the policy still holds. The process restarts and leads afresh, or follows.
            server.request_stop("this replica led once already; it restarts to lead again")
            await asyncio.Event().wait()
        loaded = True
        pools = await inventory.load()
        await register_local_machine(inventory, settings)
        if ray_nodes is not None:
            await ray_nodes.start()  # before the jobs: a node that left meanwhile requeues what it ran
        await jobs.start(list(inventory.pools.values()) or pools)
        await meter.start()
        leading.set()
        try:
            await asyncio.Event().wait()
        finally:
            if not closing:
                # Leading ended without a stop (the lease could not be renewed): another replica may lead now, so
                # this one must launch nothing more. Its state can't be picked up again: the process restarts as a
                # follower, as Kubernetes controllers do.
                server.request_stop("this replica lost the scheduler lease")

    election.lead("scheduler", lead)
    forwarding = LeaderForwarding(election, settings, SERVICE, ["aidc.scheduler.v1.SchedulerService"])

    async def ready() -> bool:
        await election.start()
        if delivers_usage:
            await emitter.start()
        # The leader serves once its queue is loaded; a follower at once (it forwards).
        return leading.is_set() or not election.is_leader

    async def close() -> None:
        nonlocal closing
        closing = True
        # The runs are let go before the lease is: the next leader adopts them only once this one stopped watching.
        if ray_nodes is not None:
            await ray_nodes.close()
        await jobs.close()
        await meter.close()
        await election.close()
        await forwarding.close()
        await emitter.close(flush_timeout=settings.shutdown_grace_seconds)
        await billing.close()
        db.dispose()

    server = secured_server(
        SERVICE,
        settings,
        registrations=[
            Registration(
                "aidc.scheduler.v1.SchedulerService",
                lambda server: scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server),
            )
        ],
        permissions=PERMISSIONS,
        readiness=ready,
        on_stop=[close],
        address=address,
        forwarding=forwarding,
    )
    return server
