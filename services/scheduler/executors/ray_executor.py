"""RayExecutor: a pool backed by a Ray cluster. Every attempt has one driver, a process on the scheduler's machine
connected to the cluster, started through the local launcher (so its output lands in the job's files, SIGTERM and
SIGKILL reach it, and a restarted scheduler re-adopts it by pid like any local process). The driver places the
gang on Ray exactly where the policy core admitted it — a placement group whose bundle i is pinned to worker i's
node (AIDC_RAY_PLACEMENT) — so the gang starts on Ray all at once or not at all:

- a job whose command is itself a Ray driver (ExecutorSpec.driver, e.g. the training runner's TorchTrainer) gets
  the placement and creates the placement group itself;
- any other command runs through ``ray_workers``: one process per worker, each in its bundle on its node.

When the driver ends (its last act on SIGTERM, or SIGKILL after the grace period), Ray kills what it started: the
workers stop through Ray. The job's secrets stay in the driver's environment on this machine; only what a driver
chooses to send (the per-worker launcher sends the job's environment) enters Ray."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from services.scheduler.core import Resources
from services.scheduler.executors.base import ExitStatus, LaunchRequest, WorkerRef, attempt_dir
from services.scheduler.executors.local import LocalExecutor, LocalRun
from services.scheduler.executors.ray_cluster import RayCluster
from services.scheduler.executors.ray_placement import (
    EXIT_WORKER_LOST,
    PLACEMENT_ENV,
    Placement,
    bundle,
    node_id_of,
)

__all__ = ["RayExecutor", "RayRun"]

log = logging.getLogger(__name__)

_WORKERS_MODULE = "services.scheduler.executors.ray_workers"


def placement_of(request: LaunchRequest) -> Placement:
    r = request.per_worker
    return Placement(bundle(r.cpu_millicores, r.memory_bytes, r.gpus), tuple(node_id_of(n) for n in request.nodes))


class RayRun:
    """An attempt on Ray, seen through its driver. Each worker's ref names the driver (the one process to find)."""

    def __init__(self, driver: LocalRun, request: LaunchRequest, executor: RayExecutor) -> None:
        self._driver = driver
        self._request = request
        self._cluster = executor.cluster
        self._executor = executor
        self._stopping = False
        self._loss_wait = executor.node_loss_wait_seconds

    @property
    def workers(self) -> Sequence[WorkerRef]:
        (driver,) = self._driver.workers
        return [replace(driver, index=i, node=node) for i, node in enumerate(self._request.nodes)]

    @property
    def ref(self) -> str:
        return f"ray driver {self._driver.ref}"

    def done(self) -> bool:
        return self._driver.done()

    async def wait(self) -> ExitStatus:
        status = await self._driver.wait()
        if status.code == 0 or self._stopping:
            return status
        # A worker's node died: the driver failed because the platform lost the node, not because of the job. Ray
        # marks a node dead once it missed its heartbeats, which may be after the driver saw its worker die.
        node_ids = {node_id_of(n) for n in self._request.nodes}
        deadline = time.monotonic() + (self._loss_wait if status.code == EXIT_WORKER_LOST else 0.0)
        while True:
            try:
                gone = await self._cluster.dead(node_ids)
            except Exception as exc:  # noqa: BLE001 - the cluster unreachable: report the driver's own status
                log.warning("job %s: could not ask Ray which nodes are alive (%s)", self._request.job_id, exc)
                return status
            if gone or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        if not gone:
            return status
        hook = self._executor.on_nodes_lost
        if hook is not None:
            # The pool learns of the loss before the job is requeued, so the next attempt is not placed on the dead
            # node (which the periodic sync may not have marked NOT_READY yet).
            try:
                await hook()
            except Exception:  # noqa: BLE001 - the periodic sync catches up; the requeue must not wait for it
                log.warning("job %s: updating the pool's nodes failed", self._request.job_id, exc_info=True)
        names = ", ".join(sorted(n for n in self._request.nodes if node_id_of(n) in gone))
        return replace(status, disrupted=True, reason=f"Ray node {names} left the cluster; {status.reason}")

    async def stop(self, grace_seconds: float) -> None:
        self._stopping = True
        await self._driver.stop(grace_seconds)


class RayExecutor:
    """Runs attempts of a Ray pool's jobs (see the module docstring)."""

    kind = "ray"

    def __init__(
        self,
        cluster: RayCluster,
        local: LocalExecutor,
        *,
        python: str = sys.executable,
        node_loss_wait_seconds: float = 60.0,
    ) -> None:
        self.cluster = cluster
        self._local = local
        self._python = python
        #: How long a driver that lost a worker waits for Ray to say whether the worker's node died.
        self.node_loss_wait_seconds = node_loss_wait_seconds
        #: Called when an attempt was lost with a node, before it ends (the pool's node sync, set by the server).
        self.on_nodes_lost: Callable[[], Awaitable[None]] | None = None

    def _driver_request(self, request: LaunchRequest) -> LaunchRequest:
        placement = placement_of(request)
        argv = request.argv
        if not request.driver:
            output = attempt_dir(request.files_dir, request.attempt)
            argv = (self._python, "-m", _WORKERS_MODULE, "--output-dir", str(output), "--", *request.argv)
        env = {**request.env, **self.cluster.environment(), PLACEMENT_ENV: placement.to_json()}
        # One driver per attempt, whatever the number of workers: it is "worker 0" of the attempt's files. It holds
        # none of what the workers were admitted with (Ray reserves that on their nodes), so no limit applies to it.
        return replace(request, argv=argv, env=env, nodes=request.nodes[:1], per_worker=Resources())

    async def launch(self, request: LaunchRequest) -> RayRun:
        driver = await self._local.launch(self._driver_request(request))
        log.info(
            "job %s attempt %d: Ray driver %s for %d worker(s)",
            request.job_id,
            request.attempt,
            driver.ref,
            len(request.nodes),
        )
        return RayRun(driver, request, self)

    async def adopt(self, request: LaunchRequest, workers: Sequence[WorkerRef]) -> RayRun | None:
        driver = await self._local.adopt(self._driver_request(request), [w for w in workers if w.index == 0])
        return None if driver is None else RayRun(driver, request, self)

    async def close(self) -> None:
        await self._local.close()
        await asyncio.to_thread(self.cluster.close)
