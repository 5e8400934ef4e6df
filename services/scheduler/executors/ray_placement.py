"""Where a Ray job's workers go: the placement the scheduler admitted (resources per worker, the Ray node of each
worker, the placement group strategy), handed to the job's driver as AIDC_RAY_PLACEMENT. Standard library only: the
drivers (the per-worker launcher, the training runner) read it without importing the scheduler."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["EXIT_WORKER_LOST", "NODE_PREFIX", "PLACEMENT_ENV", "Placement", "bundle", "node_id_of", "node_name_of"]

#: The variable a driver finds its placement in.
PLACEMENT_ENV = "AIDC_RAY_PLACEMENT"
#: Scheduler node names of a Ray pool are this prefix and the Ray node id (hex), so a name leads back to its node.
NODE_PREFIX = "ray-"
#: Exit code of a driver that lost a worker (its actor died, e.g. with its node): EX_TEMPFAIL. The executor then asks
#: Ray whether a node of the placement died; if so the attempt was lost with its node, not failed by the job.
EXIT_WORKER_LOST = 75
#: Ray's label every node carries with its own id (ray._raylet.RAY_NODE_ID_KEY).
NODE_ID_LABEL = "ray.io/node-id"


def node_name_of(node_id: str) -> str:
    return NODE_PREFIX + node_id.lower()


def node_id_of(name: str) -> str:
    """The Ray node id of a scheduler node name; ValueError for a node that is not a Ray node."""
    if not name.startswith(NODE_PREFIX) or len(name) <= len(NODE_PREFIX):
        raise ValueError(f"node {name!r} is not a Ray node (its name does not start with {NODE_PREFIX!r})")
    return name[len(NODE_PREFIX) :]


@dataclass(frozen=True)
class Placement:
    """``workers`` bundles of ``resources`` (Ray's names: CPU, memory, GPU), bundle i on Ray node ``node_ids[i]``."""

    resources: dict[str, float]
    node_ids: tuple[str, ...]

    @property
    def workers(self) -> int:
        return len(self.node_ids)

    @property
    def strategy(self) -> str:
        """STRICT_SPREAD when every worker has a node of its own (one per node, or the gang does not start), else
        PACK: the scheduler put several on one node, and the node selectors keep each where it was put."""
        return "STRICT_SPREAD" if len(set(self.node_ids)) == len(self.node_ids) > 1 else "PACK"

    def label_selectors(self) -> list[dict[str, str]]:
        """One selector per bundle pinning it to its node (Ray's bundle_label_selector / ScalingConfig's
        label_selector): Ray runs exactly what the scheduler admitted, where it admitted it."""
        return [{NODE_ID_LABEL: node_id} for node_id in self.node_ids]

    def to_json(self) -> str:
        return json.dumps({"resources": self.resources, "node_ids": list(self.node_ids)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Placement:
        data = json.loads(text)
        return cls({str(k): float(v) for k, v in data["resources"].items()}, tuple(data["node_ids"]))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Placement:
        """The placement the scheduler gave this driver; KeyError outside a Ray job."""
        return cls.from_json((env if env is not None else os.environ)[PLACEMENT_ENV])


def bundle(cpu_millicores: int, memory_bytes: int, gpus: int) -> dict[str, float]:
    """One worker's resources in Ray's names (zero amounts left out: Ray rejects empty bundles' zero entries)."""
    resources: dict[str, float] = {}
    if cpu_millicores:
        resources["CPU"] = cpu_millicores / 1000
    if memory_bytes:
        resources["memory"] = float(memory_bytes)
    if gpus:
        resources["GPU"] = float(gpus)
    return resources
