"""Inventory: the pools, their nodes and the tenants' quotas, as operators change them (validated, priced in
billing, stored, then given to the policy core), and the views ListPools and GetQuota show."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from services.mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.scheduler.core import Node, NodeState, Pool, Prices, Quota, Resources
from services.scheduler.domain.jobs import JobScheduler
from services.scheduler.domain.model import JobState, NodeRecord, PoolRecord, QuotaRecord
from services.scheduler.domain.requests import NodeChange, PoolChange, check_name, check_prices, check_resources
from services.scheduler.store import SchedulerStore

__all__ = ["Inventory", "PoolView", "NodeView", "QuotaView", "PriceSync", "EXECUTORS"]

#: Executor kinds a pool may name; only those the service was built with can run jobs.
EXECUTORS = ("local", "kubernetes", "ray")


class PriceSync(Protocol):
    """Keeps billing's price book in line with the pools' and nodes' prices (services.scheduler.pricebook)."""

    async def sync(self, pools: Sequence[PoolRecord], nodes: Sequence[NodeRecord]) -> None: ...


@dataclass(frozen=True)
class NodeView:
    node: NodeRecord
    allocated: Resources
    running_jobs: int


@dataclass(frozen=True)
class PoolView:
    pool: PoolRecord
    capacity: Resources
    allocated: Resources
    gpu_types: tuple[str, ...]
    nodes: tuple[NodeView, ...]
    running_jobs: int
    queued_jobs: int


@dataclass(frozen=True)
class QuotaView:
    quota: QuotaRecord
    allocated: Resources
    borrowed: Resources
    running_jobs: int
    queued_jobs: int
    share: float


def effective_prices(prices: Prices, gpu_types: Sequence[str]) -> Prices:
    """Prices with the '*' GPU price ("any other type") spelled out for each of ``gpu_types`` it covers."""
    other = prices.gpu_hour_micros.get("*")
    if other is None:
        return prices
    gpu = dict(prices.gpu_hour_micros)
    for gpu_type in gpu_types:
        gpu.setdefault(gpu_type, other)
    return replace(prices, gpu_hour_micros=gpu)


class Inventory:
    def __init__(
        self,
        store: SchedulerStore,
        jobs: JobScheduler,
        price_sync: PriceSync | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._policy = jobs.policy
        self._price_sync = price_sync
        self._clock = clock
        self.pools: dict[str, PoolRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.quotas = jobs.quotas
        jobs.node_gpu_type = self._node_gpu_type
        self._lock = asyncio.Lock()

    def _node_gpu_type(self, name: str) -> str:
        node = self.nodes.get(name)
        return node.capacity.gpu_type if node is not None else ""

    # -- loading -----------------------------------------------------------------------------------------------

    async def load(self) -> list[PoolRecord]:
        """Reads pools, nodes and quotas and gives them to the policy core (before any job is restored)."""
        for pool in await asyncio.to_thread(self._store.pools):
            self.pools[pool.name] = pool
        for node in await asyncio.to_thread(self._store.nodes):
            self.nodes[node.name] = node
        for pool in self.pools.values():
            self._policy.upsert_pool(self._policy_pool(pool))
        for node in self.nodes.values():
            self._policy.upsert_node(self._policy_node(node))
        for quota in await asyncio.to_thread(self._store.quotas):
            self.quotas[(quota.tenant, quota.pool)] = quota
            self._policy.set_quota(self._policy_quota(quota))
        self._jobs.pools = self.pools
        return list(self.pools.values())

    def _pool_gpu_types(self, pool: str, extra: NodeRecord | None = None) -> list[str]:
        nodes = [n for n in self.nodes.values() if n.pool == pool and (extra is None or n.name != extra.name)]
        if extra is not None:
            nodes.append(extra)
        return sorted({n.capacity.gpu_type for n in nodes if n.capacity.gpu_type})

    def _policy_pool(self, pool: PoolRecord) -> Pool:
        prices = effective_prices(pool.prices, self._pool_gpu_types(pool.name))
        return Pool(pool.name, prices, pool.max_run_seconds, pool.executor)

    def _policy_node(self, node: NodeRecord) -> Node:
        types = [node.capacity.gpu_type] if node.capacity.gpu_type else []
        prices = effective_prices(node.prices, types) if node.prices is not None else None
        return Node(node.name, node.pool, node.capacity, prices, node.state, dict(node.labels))

    @staticmethod
    def _policy_quota(quota: QuotaRecord) -> Quota:
        return Quota(
            quota.tenant,
            quota.pool,
            quota.nominal,
            quota.borrowing_limit,
            quota.lending_limit,
            quota.cohort,
            quota.weight,
            quota.max_running_jobs,
            quota.max_queued_jobs,
        )

    # -- pools -------------------------------------------------------------------------------------------------

    async def create_pool(self, change: PoolChange, *, is_default: bool = False, sync: bool = True) -> PoolRecord:
        check_name("pool", change.name)
        if change.executor not in EXECUTORS:
            raise InvalidArgument(f"unknown executor {change.executor!r}")
        if not self._jobs.has_executor(change.executor):
            raise FailedPrecondition(
                f"the {change.executor} executor is not available in this deployment"
                + (" (set AIDC_SCHEDULER_RAY_ADDRESS)" if change.executor == "ray" else "")
            )
        prices = change.prices or Prices(0, 0, {})
        check_prices("prices", prices)
        max_run = change.max_run_seconds or 86_400.0
        if max_run <= 0:
            raise InvalidArgument("max_run_duration must be positive")
        async with self._lock:
            if change.name in self.pools:
                raise AlreadyExists(f"pool {change.name!r} already exists")
            now = self._clock()
            pool = PoolRecord(change.name, change.executor, prices, max_run, is_default, now, now)
            await self._commit_pool(pool, sync)
            return pool

    async def update_pool(self, change: PoolChange) -> PoolRecord:
        async with self._lock:
            pool = self.pools.get(change.name)
            if pool is None:
                raise NotFound(f"pool {change.name!r} not found")
            if change.prices is not None:
                check_prices("prices", change.prices)
                for node in self.nodes.values():
                    if node.pool == pool.name and node.prices is None:
                        _require_gpu_price(node, effective_prices(change.prices, self._pool_gpu_types(pool.name)))
            if change.max_run_seconds is not None and change.max_run_seconds <= 0:
                raise InvalidArgument("max_run_duration must be positive")
            updated = replace(
                pool,
                prices=change.prices if change.prices is not None else pool.prices,
                max_run_seconds=change.max_run_seconds or pool.max_run_seconds,
                update_ns=self._clock(),
            )
            await self._commit_pool(updated, sync=change.prices is not None)
            return updated

    async def _commit_pool(self, pool: PoolRecord, sync: bool) -> None:
        if sync and self._price_sync is not None:
            await self._price_sync.sync(
                [*(p for p in self.pools.values() if p.name != pool.name), pool], list(self.nodes.values())
            )
        self._policy.upsert_pool(self._policy_pool(pool))
        await asyncio.to_thread(self._store.save_pool, pool)
        self.pools[pool.name] = pool
        self._jobs.trigger()

    # -- nodes -------------------------------------------------------------------------------------------------

    async def add_node(self, change: NodeChange, *, sync: bool = True) -> NodeRecord:
        check_name("node", change.name)
        async with self._lock:
            if change.name in self.nodes:
                raise AlreadyExists(f"node {change.name!r} already exists (in pool {self.nodes[change.name].pool!r})")
            if change.pool not in self.pools:
                raise InvalidArgument(f"unknown pool {change.pool!r}")
            node = NodeRecord(
                change.name,
                change.pool,
                change.capacity or Resources(),
                dict(change.labels or {}),
                change.prices,
                NodeState[change.state] if change.state else NodeState.READY,
                self._clock(),
            )
            self._check_node(node)
            await self._commit_node(node, sync=sync and node.prices is not None)
            return node

    async def update_node(self, change: NodeChange) -> NodeRecord:
        async with self._lock:
            node = self.nodes.get(change.name)
            if node is None:
                raise NotFound(f"node {change.name!r} not found")
            updated = replace(
                node,
                capacity=change.capacity if change.capacity is not None else node.capacity,
                labels=dict(change.labels) if change.labels is not None else node.labels,
                prices=None if change.clear_prices else (change.prices if change.prices is not None else node.prices),
                state=NodeState[change.state] if change.state else node.state,
                heartbeat_ns=self._clock(),
            )
            self._check_node(updated)
            held = self._policy.node_allocated(updated.name)
            if change.capacity is not None and not held.fits_in(updated.capacity):
                raise FailedPrecondition(
                    f"node {node.name!r} holds {held.describe()} now; drain it before lowering its capacity below that"
                )
            lost: list[str] = []
            if updated.state is not node.state:
                lost = list(self._policy.set_node_state(updated.name, updated.state))
            await self._commit_node(updated, sync=updated.prices != node.prices)
        if lost:
            await self._jobs.lose_jobs(lost, f"node {node.name} is NOT_READY")
        return updated

    async def remove_node(self, name: str) -> None:
        async with self._lock:
            node = self.nodes.get(name)
            if node is None:
                raise NotFound(f"node {name!r} not found")
            running = [j.job_id for j in self._jobs.active_jobs() if j.holding and name in j.nodes]
            if running:
                raise FailedPrecondition(
                    f"node {name!r} still runs {len(running)} job(s) ({', '.join(running[:5])}); drain it first"
                )
            # The policy core has no remove_node yet (NEEDS-FROM-CORE): NOT_READY offers nothing; it is gone from
            # the policy at the next start, which loads only stored nodes.
            self._policy.set_node_state(name, NodeState.NOT_READY)
            await asyncio.to_thread(self._store.remove_node, name)
            del self.nodes[name]

    def _check_node(self, node: NodeRecord) -> None:
        check_resources("capacity", node.capacity)
        if node.capacity.is_zero():
            raise InvalidArgument("capacity: a node offers some CPU, memory or GPUs")
        if bool(node.capacity.gpus) != bool(node.capacity.gpu_type):
            raise InvalidArgument("capacity: a node with GPUs names their gpu_type (and one without names none)")
        if node.prices is not None:
            check_prices("prices", node.prices)
        pool = self.pools[node.pool]
        _require_gpu_price(node, node.prices or effective_prices(pool.prices, self._pool_gpu_types(pool.name, node)))

    async def _commit_node(self, node: NodeRecord, sync: bool) -> None:
        if sync and self._price_sync is not None:
            nodes = [*(n for n in self.nodes.values() if n.name != node.name), node]
            await self._price_sync.sync(list(self.pools.values()), nodes)
        self._policy.upsert_node(self._policy_node(node))
        pool = self.pools[node.pool]
        self._policy.upsert_pool(self._policy_pool(pool))  # a new GPU type may be priced by the pool's '*'
        await asyncio.to_thread(self._store.save_node, node)
        self.nodes[node.name] = node
        self._jobs.trigger()

    # -- quotas ------------------------------------------------------------------------------------------------

    async def set_quota(self, quota: QuotaRecord) -> QuotaRecord:
        if quota.pool not in self.pools:
            raise InvalidArgument(f"unknown pool {quota.pool!r}")
        for what, r in (
            ("nominal", quota.nominal),
            ("borrowing_limit", quota.borrowing_limit),
            ("lending_limit", quota.lending_limit),
        ):
            if r is not None:
                check_resources(what, r)
        if quota.weight < 0 or quota.weight != quota.weight:
            raise InvalidArgument("weight must not be negative")
        if quota.max_running_jobs < 0 or quota.max_queued_jobs < 0:
            raise InvalidArgument("max_running_jobs and max_queued_jobs must not be negative")
        async with self._lock:
            stored = replace(quota, update_ns=self._clock())
            self._policy.set_quota(self._policy_quota(stored))  # InvalidQuota: below what the tenant holds now
            await asyncio.to_thread(self._store.save_quota, stored)
            self.quotas[(stored.tenant, stored.pool)] = stored
        self._jobs.trigger()
        return stored

    def quota_views(self, tenant: str, pool: str = "") -> list[QuotaView]:
        if pool and pool not in self.pools:
            raise NotFound(f"pool {pool!r} not found")
        counts = self._counts(tenant)
        shares = self._policy.shares(pool) if pool else {}
        views = []
        for (owner, name), quota in sorted(self.quotas.items()):
            if owner not in (tenant, "") or (pool and name != pool):
                continue
            if owner == "" and (tenant, name) in self.quotas:
                continue  # the tenant's own quota overrides the pool's default
            allocated = self._policy.usage(tenant, name)
            borrowed = Resources.of(
                [max(a - n, 0) for a, n in zip(allocated.as_tuple(), quota.nominal.as_tuple(), strict=True)]
            )
            pool_shares = shares if pool else self._policy.shares(name)
            views.append(
                QuotaView(
                    quota,
                    allocated,
                    borrowed,
                    counts[(name, "running")],
                    counts[(name, "queued")],
                    float(pool_shares.get(tenant, 0.0)),
                )
            )
        return views

    def _counts(self, tenant: str) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        for job in self._jobs.active_jobs():
            if tenant and job.tenant != tenant:
                continue
            if job.state is JobState.QUEUED:
                counts[(job.pool, "queued")] += 1
            elif job.holding:
                counts[(job.pool, "running")] += 1
        return counts

    # -- pool views --------------------------------------------------------------------------------------------

    def pool_views(self, tenant: str = "") -> list[PoolView]:
        """Every pool; with ``tenant``, as that tenant sees them (no nodes; its own job counts)."""
        counts = self._counts(tenant)
        running_on: Counter[str] = Counter()
        for job in self._jobs.active_jobs():
            if job.holding:
                running_on.update(set(job.nodes))
        views = []
        for pool in sorted(self.pools.values(), key=lambda p: p.name):
            members = [n for n in self.nodes.values() if n.pool == pool.name]
            capacity = Resources()
            for node in members:
                if node.state is NodeState.READY:
                    capacity = capacity + node.capacity
            nodes = (
                ()
                if tenant
                else tuple(NodeView(n, self._policy.node_allocated(n.name), running_on[n.name]) for n in members)
            )
            views.append(
                PoolView(
                    pool,
                    replace(capacity, gpu_type=""),
                    replace(self._policy.allocated(pool.name), gpu_type=""),
                    tuple(self._pool_gpu_types(pool.name)),
                    nodes,
                    counts[(pool.name, "running")],
                    counts[(pool.name, "queued")],
                )
            )
        return views


def _require_gpu_price(node: NodeRecord, prices: Prices) -> None:
    gpu_type = node.capacity.gpu_type
    if gpu_type and gpu_type not in prices.gpu_hour_micros:
        raise InvalidArgument(f"node {node.name!r}: no GPU-hour price for type {gpu_type!r} (in the node or its pool)")
