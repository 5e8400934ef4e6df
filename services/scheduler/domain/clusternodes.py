"""ClusterNodes: a pool whose nodes are an external cluster's (a Ray cluster's), kept current. A node that joins is
added READY with what it offers; one whose capacity changes is updated; one that leaves (or dies) goes NOT_READY, so
the policy core releases its jobs and the scheduler requeues them. A node an operator set DRAINING stays so while it
lives. Until an operator sets one, the pool's default quota is the cluster's capacity when first seen."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from services.mesh.errors import AidcError
from services.scheduler.core import DEFAULT_TENANT, NodeState, Prices, Resources
from services.scheduler.domain.inventory import Inventory
from services.scheduler.domain.model import QuotaRecord
from services.scheduler.domain.requests import NodeChange, PoolChange

__all__ = ["ClusterNode", "ClusterNodes", "NodeSource"]

log = logging.getLogger(__name__)


class ClusterNode(Protocol):
    name: str
    alive: bool
    cpu_millicores: int
    memory_bytes: int
    gpus: int
    gpu_type: str
    address: str


class NodeSource(Protocol):
    """The cluster's nodes, dead ones included (services.scheduler.executors.ray_cluster.RayCluster)."""

    async def nodes(self) -> Sequence[ClusterNode]: ...


class ClusterNodes:
    def __init__(
        self,
        inventory: Inventory,
        source: NodeSource,
        pool: str,
        executor: str,
        prices: Prices,
        max_run_seconds: float,
        interval_seconds: float = 2.0,
    ) -> None:
        self._inventory = inventory
        self._source = source
        self.pool = pool
        self._executor = executor
        self._prices = prices
        self._max_run = max_run_seconds
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None
        #: One sync at a time: the periodic one and the executor's when an attempt was lost with a node.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Creates the pool if missing, syncs once, then keeps syncing in the background."""
        if self.pool not in self._inventory.pools:
            await self._inventory.create_pool(
                PoolChange(self.pool, self._executor, self._prices, self._max_run), sync=False
            )
        await self.sync()
        self._task = asyncio.create_task(self._loop(), name=f"cluster-nodes-{self.pool}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the cluster may be restarting; the next round tries again
                log.warning("pool %s: reading the cluster's nodes failed", self.pool, exc_info=True)

    async def sync(self) -> None:
        """One round: the pool's nodes brought in line with the cluster's."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        seen = {node.name: node for node in await self._source.nodes()}
        for name, node in seen.items():
            capacity = Resources(node.cpu_millicores, node.memory_bytes, node.gpus, node.gpu_type)
            known = self._inventory.nodes.get(name)
            try:
                if known is None:
                    # A node offering no CPU and no GPU is no place for work: a Ray head started with --num-cpus=0,
                    # or a pod that joins only to run drivers (the scheduler's own on a cluster).
                    if node.alive and (capacity.cpu_millicores or capacity.gpus):
                        labels = {"aidc.io/cluster-node": node.address}
                        await self._inventory.add_node(
                            NodeChange(name, pool=self.pool, capacity=capacity, labels=labels), sync=False
                        )
                        log.info("pool %s: node %s joined (%s)", self.pool, name, capacity.describe())
                elif not node.alive:
                    if known.state is not NodeState.NOT_READY:
                        log.warning("pool %s: node %s left the cluster: NOT_READY, its jobs requeued", self.pool, name)
                        await self._inventory.update_node(NodeChange(name, state=NodeState.NOT_READY.name))
                else:
                    state = NodeState.READY.name if known.state is NodeState.NOT_READY else None
                    if state is not None or known.capacity != capacity:
                        await self._inventory.update_node(
                            NodeChange(name, capacity=capacity if known.capacity != capacity else None, state=state)
                        )
            except AidcError as exc:
                log.warning("pool %s: node %s: %s", self.pool, name, exc)
        for name, known in list(self._inventory.nodes.items()):
            # A node the cluster no longer lists at all (its record expired in Ray): gone as well.
            if known.pool == self.pool and name not in seen and known.state is not NodeState.NOT_READY:
                await self._inventory.update_node(NodeChange(name, state=NodeState.NOT_READY.name))
        await self._default_quota()

    async def _default_quota(self) -> None:
        # Out of the box every tenant may use the whole cluster, as with this machine's pool, at the largest it has
        # been READY: a cluster's workers join one by one (KubeRay starts them beside the head), and a node lost for
        # a while must not shrink what tenants may hold. Operators narrow or widen it with `aidc quota set` (then it
        # is theirs and stays as they set it).
        current = self._inventory.quotas.get((DEFAULT_TENANT, self.pool))
        if current is not None and not current.automatic:
            return
        capacity = Resources()
        for node in self._inventory.nodes.values():
            if node.pool == self.pool and node.state is NodeState.READY:
                capacity = capacity + replace(node.capacity, gpu_type="")
        if current is not None:
            capacity = Resources.of(
                [max(a, b) for a, b in zip(capacity.as_tuple(), current.nominal.as_tuple(), strict=True)]
            )
            if capacity == current.nominal:
                return
        if not capacity.is_zero():
            await self._inventory.set_quota(
                QuotaRecord(DEFAULT_TENANT, self.pool, capacity, None, None, automatic=True)
            )
