"""Persistence of the scheduler (SQLAlchemy Core; SQLite by default, PostgreSQL by URL): pools, nodes, quotas, jobs
and allocations. Writes come in batches (one transaction for many jobs), which is what keeps admission fast."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Row

from services.mesh.db import Database, Migration
from services.scheduler.core import NodeState, Prices, Resources
from services.scheduler.domain.model import (
    Allocation,
    JobRecord,
    JobState,
    NodeRecord,
    PoolRecord,
    QuotaRecord,
    StopKind,
)
from services.scheduler.executors import WorkerRef

__all__ = ["MIGRATIONS", "SchedulerStore", "Changes", "prices_json", "prices_from_json"]

metadata = MetaData()

pools = Table(
    "pools",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("record_json", Text, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("pool", String(64), nullable=False),
    Column("record_json", Text, nullable=False),
)

quotas = Table(
    "quotas",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("pool", String(64), primary_key=True),
    Column("record_json", Text, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(64), primary_key=True),
    # Submission order (the policy's tie-breaker), assigned by the service.
    Column("seq", BigInteger, nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("pool", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("idempotency_key", String(200), nullable=False),
    Column("terminal", Boolean, nullable=False),
    # Everything else of the record: it is read and written whole.
    Column("record_json", Text, nullable=False),
    Index("jobs_by_tenant", "tenant", "seq"),
    Index("jobs_active", "terminal", "seq"),
    Index("jobs_by_key", "tenant", "idempotency_key"),
)

allocations = Table(
    "allocations",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("open", Boolean, nullable=False),
    Column("record_json", Text, nullable=False),
    Index("allocations_open", "open"),
)


def _create_schema(conn: Connection) -> None:
    metadata.create_all(conn)


MIGRATIONS = [Migration(1, "pools, nodes, quotas, jobs, allocations", _create_schema)]


# -- record <-> JSON --------------------------------------------------------------------------------------------


def _resources_json(r: Resources | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"cpu": r.cpu_millicores, "memory": r.memory_bytes, "gpus": r.gpus, "gpu_type": r.gpu_type}


def _resources(data: Mapping[str, Any] | None) -> Resources | None:
    if data is None:
        return None
    return Resources(int(data["cpu"]), int(data["memory"]), int(data["gpus"]), str(data["gpu_type"]))


def prices_json(p: Prices) -> dict[str, Any]:
    return {"cpu": p.cpu_core_hour_micros, "memory": p.memory_gib_hour_micros, "gpu": dict(p.gpu_hour_micros)}


def prices_from_json(data: Mapping[str, Any]) -> Prices:
    return Prices(int(data["cpu"]), int(data["memory"]), {str(k): int(v) for k, v in data["gpu"].items()})


def _job_json(job: JobRecord) -> str:
    data = {
        "name": job.name,
        "per_worker": _resources_json(job.per_worker),
        "workers": job.workers,
        "priority": job.priority,
        "preemptible": job.preemptible,
        "argv": list(job.argv),
        "env": job.env,
        "secret_names": list(job.secret_names),
        "sealed_secrets": base64.b64encode(job.sealed_secrets).decode(),
        "working_dir": job.working_dir,
        "max_run_seconds": job.max_run_seconds,
        "max_retries": job.max_retries,
        "grace_seconds": job.grace_seconds,
        "trace_carrier": job.trace_carrier,
        "labels": job.labels,
        "submitted_by": job.submitted_by,
        "submit_ns": job.submit_ns,
        "state_reason": job.state_reason,
        "attempt": job.attempt,
        "exit_code": job.exit_code,
        "start_ns": job.start_ns,
        "end_ns": job.end_ns,
        "run_ns": job.run_ns,
        "preemptions": job.preemptions,
        "failures": job.failures,
        "nodes": list(job.nodes),
        "executor_ref": job.executor_ref,
        "worker_refs": [[w.index, w.node, w.handle, w.incarnation] for w in job.worker_refs],
        "admitted_ns": job.admitted_ns,
        "running_since_ns": job.running_since_ns,
        "estimated_cost_micros": job.estimated_cost_micros,
        "stop": job.stop.value,
        "stop_reason": job.stop_reason,
        "kill_at_ns": job.kill_at_ns,
        "driver": job.driver,
    }
    return json.dumps(data, separators=(",", ":"))


def _job(row: Row[Any]) -> JobRecord:
    data = json.loads(row.record_json)
    per_worker = _resources(data.pop("per_worker"))
    assert per_worker is not None
    return JobRecord(
        job_id=row.job_id,
        tenant=row.tenant,
        pool=row.pool,
        seq=row.seq,
        state=JobState(row.state),
        idempotency_key=row.idempotency_key,
        per_worker=per_worker,
        argv=tuple(data.pop("argv")),
        secret_names=tuple(data.pop("secret_names")),
        sealed_secrets=base64.b64decode(data.pop("sealed_secrets")),
        nodes=tuple(data.pop("nodes")),
        worker_refs=tuple(WorkerRef(int(i), str(n), str(h), str(c)) for i, n, h, c in data.pop("worker_refs")),
        stop=StopKind(data.pop("stop")),
        **data,
    )


def _job_row(job: JobRecord) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "seq": job.seq,
        "tenant": job.tenant,
        "pool": job.pool,
        "state": job.state.value,
        "idempotency_key": job.idempotency_key,
        "terminal": job.terminal,
        "record_json": _job_json(job),
    }


def _pool_json(pool: PoolRecord) -> str:
    return json.dumps(
        {
            "executor": pool.executor,
            "prices": prices_json(pool.prices),
            "max_run_seconds": pool.max_run_seconds,
            "is_default": pool.is_default,
            "create_ns": pool.create_ns,
            "update_ns": pool.update_ns,
        }
    )


def _pool(row: Row[Any]) -> PoolRecord:
    data = json.loads(row.record_json)
    data["prices"] = prices_from_json(data["prices"])
    return PoolRecord(name=row.name, **data)


def _node_json(node: NodeRecord) -> str:
    return json.dumps(
        {
            "capacity": _resources_json(node.capacity),
            "labels": node.labels,
            "prices": None if node.prices is None else prices_json(node.prices),
            "state": node.state.name,
            "heartbeat_ns": node.heartbeat_ns,
        }
    )


def _node(row: Row[Any]) -> NodeRecord:
    data = json.loads(row.record_json)
    capacity = _resources(data["capacity"])
    assert capacity is not None
    prices = None if data["prices"] is None else prices_from_json(data["prices"])
    return NodeRecord(
        row.name, row.pool, capacity, dict(data["labels"]), prices, NodeState[data["state"]], data["heartbeat_ns"]
    )


def _quota_json(quota: QuotaRecord) -> str:
    return json.dumps(
        {
            "nominal": _resources_json(quota.nominal),
            "borrowing_limit": _resources_json(quota.borrowing_limit),
            "lending_limit": _resources_json(quota.lending_limit),
            "cohort": quota.cohort,
            "weight": quota.weight,
            "max_running_jobs": quota.max_running_jobs,
            "max_queued_jobs": quota.max_queued_jobs,
            "update_ns": quota.update_ns,
            "automatic": quota.automatic,
        }
    )


def _quota(row: Row[Any]) -> QuotaRecord:
    data = json.loads(row.record_json)
    nominal = _resources(data.pop("nominal"))
    assert nominal is not None
    return QuotaRecord(
        tenant=row.tenant,
        pool=row.pool,
        nominal=nominal,
        borrowing_limit=_resources(data.pop("borrowing_limit")),
        lending_limit=_resources(data.pop("lending_limit")),
        **data,
    )


def _allocation_json(a: Allocation) -> str:
    return json.dumps(
        {
            "tenant": a.tenant,
            "pool": a.pool,
            "nodes": list(a.nodes),
            "per_worker": _resources_json(a.per_worker),
            "admitted_ns": a.admitted_ns,
            "released_ns": a.released_ns,
            "metered_until_ns": a.metered_until_ns,
        }
    )


def _allocation(row: Row[Any]) -> Allocation:
    data = json.loads(row.record_json)
    per_worker = _resources(data.pop("per_worker"))
    assert per_worker is not None
    return Allocation(row.job_id, row.attempt, per_worker=per_worker, nodes=tuple(data.pop("nodes")), **data)


# -- the store --------------------------------------------------------------------------------------------------


@dataclass
class Changes:
    """One batch of writes, applied in one transaction."""

    new_jobs: list[JobRecord] = field(default_factory=list)
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    allocations: dict[tuple[str, int], Allocation] = field(default_factory=dict)
    new_allocations: dict[tuple[str, int], Allocation] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.new_jobs or self.jobs or self.allocations or self.new_allocations)


class SchedulerStore:
    """The scheduler's database (blocking calls; the domain runs them in a worker thread)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- batches ------------------------------------------------------------------------------------------------

    def apply(self, changes: Changes) -> None:
        """Writes a batch: new jobs and allocations inserted, changed ones updated, all or nothing."""
        with self.db.engine.begin() as conn:
            if changes.new_jobs:
                conn.execute(insert(jobs), [_job_row(j) for j in changes.new_jobs])
            if changes.jobs:
                conn.execute(
                    update(jobs).where(jobs.c.job_id == bindparam("b_job_id")),
                    [
                        {("b_job_id" if k == "job_id" else k): v for k, v in _job_row(j).items()}
                        for j in changes.jobs.values()
                    ],
                )
            if changes.new_allocations:
                conn.execute(
                    insert(allocations),
                    [
                        {"job_id": a.job_id, "attempt": a.attempt, "open": True, "record_json": _allocation_json(a)}
                        for a in changes.new_allocations.values()
                    ],
                )
            if changes.allocations:
                conn.execute(
                    update(allocations).where(
                        and_(
                            allocations.c.job_id == bindparam("b_job_id"),
                            allocations.c.attempt == bindparam("b_attempt"),
                        )
                    ),
                    [
                        {
                            "b_job_id": a.job_id,
                            "b_attempt": a.attempt,
                            "open": not a.released_ns or a.metered_until_ns < a.released_ns,
                            "record_json": _allocation_json(a),
                        }
                        for a in changes.allocations.values()
                    ],
                )

    # -- jobs ---------------------------------------------------------------------------------------------------

    def active_jobs(self) -> list[JobRecord]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.terminal.is_(False)).order_by(jobs.c.seq))
            return [_job(row) for row in rows]

    def job(self, job_id: str) -> JobRecord | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.job_id == job_id)).first()
            return _job(row) if row is not None else None

    def job_by_key(self, tenant: str, key: str) -> JobRecord | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key).order_by(jobs.c.seq)
            ).first()
            return _job(row) if row is not None else None

    def jobs(
        self,
        tenant: str,
        states: Iterable[JobState] = (),
        pool: str = "",
        offset: int = 0,
        limit: int = 100,
    ) -> list[JobRecord]:
        """Newest first; tenant "" means every tenant."""
        query = select(jobs)
        if tenant:
            query = query.where(jobs.c.tenant == tenant)
        wanted = [s.value for s in states]
        if wanted:
            query = query.where(jobs.c.state.in_(wanted))
        if pool:
            query = query.where(jobs.c.pool == pool)
        query = query.order_by(jobs.c.seq.desc()).offset(offset).limit(limit)
        with self.db.engine.connect() as conn:
            return [_job(row) for row in conn.execute(query)]

    def max_seq(self) -> int:
        with self.db.engine.connect() as conn:
            value = conn.execute(select(jobs.c.seq).order_by(jobs.c.seq.desc()).limit(1)).scalar()
            return int(value or 0)

    # -- allocations --------------------------------------------------------------------------------------------

    def open_allocations(self) -> list[Allocation]:
        """Allocations still held, or released but not metered to their end."""
        with self.db.engine.connect() as conn:
            return [_allocation(r) for r in conn.execute(select(allocations).where(allocations.c.open.is_(True)))]

    def allocations_of(self, job_id: str) -> list[Allocation]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(allocations).where(allocations.c.job_id == job_id).order_by(allocations.c.attempt)
            )
            return [_allocation(r) for r in rows]

    # -- pools, nodes, quotas -----------------------------------------------------------------------------------

    def pools(self) -> list[PoolRecord]:
        with self.db.engine.connect() as conn:
            return [_pool(r) for r in conn.execute(select(pools).order_by(pools.c.name))]

    def save_pool(self, pool: PoolRecord) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(delete(pools).where(pools.c.name == pool.name))
            conn.execute(insert(pools).values(name=pool.name, record_json=_pool_json(pool)))

    def nodes(self) -> list[NodeRecord]:
        with self.db.engine.connect() as conn:
            return [_node(r) for r in conn.execute(select(nodes).order_by(nodes.c.name))]

    def save_node(self, node: NodeRecord) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(delete(nodes).where(nodes.c.name == node.name))
            conn.execute(insert(nodes).values(name=node.name, pool=node.pool, record_json=_node_json(node)))

    def remove_node(self, name: str) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(delete(nodes).where(nodes.c.name == name))

    def quotas(self) -> list[QuotaRecord]:
        with self.db.engine.connect() as conn:
            return [_quota(r) for r in conn.execute(select(quotas).order_by(quotas.c.tenant, quotas.c.pool))]

    def save_quota(self, quota: QuotaRecord) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(delete(quotas).where(quotas.c.tenant == quota.tenant, quotas.c.pool == quota.pool))
            conn.execute(insert(quotas).values(tenant=quota.tenant, pool=quota.pool, record_json=_quota_json(quota)))
