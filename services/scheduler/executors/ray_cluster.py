"""The scheduler's view of a Ray cluster: connecting to it (``ray`` is imported only here, and only once a Ray pool
exists), its nodes and their resources, and the environment a driver needs to join it."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from services.scheduler.executors.ray_placement import node_name_of

__all__ = ["RAY_AUTH_VARIABLES", "RayCluster", "RayNode", "driver_environment", "loopback_address"]

log = logging.getLogger(__name__)

#: Ray replaces a loopback cluster address by the machine's own IP unless told it runs on one machine: with this
#: set to 0 every Ray process of a loopback cluster (raylets, drivers, workers) stays on 127.0.0.1.
_LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_address(address: str) -> bool:
    host = address.removeprefix("ray://").rpartition(":")[0] or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: Ray's token authentication (RAY_AUTH_MODE=token and the token or its file): given to the scheduler for a cluster
#: that requires it (`aidc up --ray`'s does), passed on to its drivers only, never to other jobs' processes.
RAY_AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def driver_environment(address: str) -> dict[str, str]:
    """What a driver process needs to connect to the cluster at ``address``."""
    env = {"RAY_ADDRESS": address, "RAY_DEDUP_LOGS": "0"}
    env.update({name: os.environ[name] for name in RAY_AUTH_VARIABLES if name in os.environ})
    if loopback_address(address):
        env[_LOOPBACK_FLAG] = "0"
    return env


@dataclass(frozen=True)
class RayNode:
    """A Ray node as the scheduler sees it: its name in the pool, and what it offers."""

    node_id: str
    alive: bool
    cpu_millicores: int
    memory_bytes: int
    gpus: int
    gpu_type: str
    address: str

    @property
    def name(self) -> str:
        return node_name_of(self.node_id)


def _gpu_type(resources: dict[str, float], labels: dict[str, str]) -> str:
    # An operator's label wins (the price book's names, e.g. nvidia-a100-80gb); else Ray's accelerator type.
    if labels.get("aidc.io/gpu-type"):
        return labels["aidc.io/gpu-type"]
    for key in resources:
        if key.startswith("accelerator_type:"):
            return "nvidia-" + key.partition(":")[2].lower()
    return "nvidia-gpu"


def _node(info: dict[str, Any]) -> RayNode:
    resources = {str(k): float(v) for k, v in (info.get("Resources") or {}).items()}
    labels = {str(k): str(v) for k, v in (info.get("Labels") or {}).items()}
    gpus = int(resources.get("GPU", 0))
    return RayNode(
        node_id=str(info["NodeID"]),
        alive=bool(info.get("Alive")),
        cpu_millicores=int(round(resources.get("CPU", 0.0) * 1000)),
        memory_bytes=int(resources.get("memory", 0.0)),
        gpus=gpus,
        gpu_type=_gpu_type(resources, labels) if gpus else "",
        address=str(info.get("NodeManagerAddress", "")),
    )


class RayCluster:
    """One Ray cluster (a pool's). The connection is made on first use, in a worker thread: ray's calls block."""

    def __init__(self, address: str, namespace: str = "aidc") -> None:
        self.address = address
        self.namespace = namespace
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        with self._lock:
            if loopback_address(self.address):
                os.environ.setdefault(_LOOPBACK_FLAG, "0")  # before ray is imported: it reads it at import
            import ray  # noqa: PLC0415 - optional dependency (aidc[ray]), needed only with a Ray pool

            if not ray.is_initialized():
                ray.init(
                    address=self.address,
                    namespace=self.namespace,
                    log_to_driver=False,
                    configure_logging=False,
                )
                log.info("connected to the Ray cluster at %s", self.address)
            return ray

    def _nodes(self) -> list[RayNode]:
        ray = self._connect()
        return [_node(info) for info in ray.nodes()]

    async def nodes(self) -> list[RayNode]:
        """Every node the cluster knows, dead ones included (Ray never reuses a node id)."""
        return await asyncio.to_thread(self._nodes)

    async def dead(self, node_ids: set[str]) -> set[str]:
        """Which of ``node_ids`` have left the cluster."""
        alive = {n.node_id for n in await self.nodes() if n.alive}
        return {node_id for node_id in node_ids if node_id not in alive}

    def environment(self) -> dict[str, str]:
        return driver_environment(self.address)

    def close(self) -> None:
        with self._lock:
            import sys

            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()
