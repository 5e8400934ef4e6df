"""Group commit: changes from concurrent RPCs and the cycle are written in one transaction per batch; each caller
awaits the commit that holds its change (so an answered SubmitJob is durable), and one transaction serves many."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable

from services.scheduler.domain.model import Allocation, JobRecord
from services.scheduler.store import Changes

__all__ = ["BatchWriter"]

log = logging.getLogger(__name__)


class BatchWriter:
    """Collects job and allocation writes; a single writer task commits them in batches, in arrival order."""

    def __init__(self, apply: Callable[[Changes], None]) -> None:
        self._apply = apply
        self._pending = Changes()
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="scheduler-writer")

    async def close(self) -> None:
        if self._task is not None:
            await self.flush()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def insert_job(self, job: JobRecord) -> asyncio.Future[None]:
        self._pending.new_jobs.append(job)
        return self._future()

    def save_job(self, job: JobRecord) -> asyncio.Future[None]:
        """Writes the job as it is at commit time (later changes before the commit ride along)."""
        if not any(j is job for j in self._pending.new_jobs):
            self._pending.jobs[job.job_id] = job
        return self._future()

    def insert_allocation(self, allocation: Allocation) -> asyncio.Future[None]:
        self._pending.new_allocations[(allocation.job_id, allocation.attempt)] = allocation
        return self._future()

    def save_allocation(self, allocation: Allocation) -> asyncio.Future[None]:
        key = (allocation.job_id, allocation.attempt)
        if key in self._pending.new_allocations:
            self._pending.new_allocations[key] = allocation
        else:
            self._pending.allocations[key] = allocation
        return self._future()

    async def flush(self) -> None:
        """Returns once everything written before the call is committed."""
        if self._pending or self._waiters:
            await self._future()

    def _future(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, waiters = self._pending, self._waiters
            self._pending, self._waiters = Changes(), []
            # Copies taken on the event loop: the loop goes on changing the records while the thread writes.
            batch = Changes(
                [copy.copy(j) for j in batch.new_jobs],
                {k: copy.copy(j) for k, j in batch.jobs.items()},
                dict(batch.allocations),
                dict(batch.new_allocations),
            )
            try:
                if batch:
                    await asyncio.to_thread(self._apply, batch)
            except Exception as exc:  # noqa: BLE001 - every waiter learns the batch failed
                log.exception("writing a batch of %d job changes failed", len(batch.jobs) + len(batch.new_jobs))
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
