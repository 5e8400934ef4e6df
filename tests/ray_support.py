"""A real Ray cluster for tests: a head and worker nodes, each its own raylet process, all on 127.0.0.1
(ray.cluster_utils.Cluster); nodes can be killed (node loss). CPU is logical in Ray, so nodes of "1 CPU" each fit
on the 2-core machine; the dashboard stays off."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from services.scheduler.executors.ray_cluster import driver_environment
from services.scheduler.executors.ray_placement import node_name_of

# Before ray is imported: a loopback cluster stays on 127.0.0.1 (see services/scheduler/executors/ray_cluster.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

GIB = 2**30


@dataclass(frozen=True)
class NodeSpec:
    cpus: float = 1
    memory_bytes: int = 2 * GIB


@dataclass
class LocalRayCluster:
    cluster: Any
    #: Scheduler node name -> the cluster_utils node handle (the head included).
    nodes: dict[str, Any]
    #: Scheduler node name -> what the node was started with.
    specs: dict[str, NodeSpec]

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def head(self) -> str:
        return next(name for name, node in self.nodes.items() if node is self.cluster.head_node)

    def add(self, spec: NodeSpec) -> str:
        """Starts one more worker node; returns its scheduler node name."""
        node = self.cluster.add_node(**_args(spec))
        self.cluster.wait_for_nodes(timeout=120)
        self.nodes[node_name_of(node.node_id)] = node
        self.specs[node_name_of(node.node_id)] = spec
        return node_name_of(node.node_id)

    def kill(self, name: str) -> None:
        """Kills a worker node's raylet and everything on it (a node lost)."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)
        del self.specs[name]


def _args(spec: NodeSpec) -> dict[str, Any]:
    return {
        "num_cpus": spec.cpus,
        "memory": spec.memory_bytes,
        "node_ip_address": "127.0.0.1",
        "object_store_memory": 80 * 2**20,
    }


@contextmanager
def ray_cluster(specs: Sequence[NodeSpec]) -> Iterator[LocalRayCluster]:
    """The head is ``specs[0]``, each other spec a worker node; shut down (every process) on exit."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**_args(specs[0]), "include_dashboard": False})
    try:
        handles = [cluster.head_node]
        for spec in specs[1:]:
            handles.append(cluster.add_node(**_args(spec)))
        cluster.wait_for_nodes(timeout=120)
        nodes = {node_name_of(h.node_id): h for h in handles}
        yield LocalRayCluster(cluster, nodes, {node_name_of(h.node_id): s for h, s in zip(handles, specs, strict=True)})
    finally:
        cluster.shutdown()


def driver_env(address: str) -> dict[str, str]:
    return driver_environment(address)


def wait_until(predicate: Any, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.2)
