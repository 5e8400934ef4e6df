"""Persistence of the training service (SQLAlchemy Core; SQLite by default, PostgreSQL at scale): jobs and their
event history and sealed delegations, tenants' base models, and the model registry (models, versions, aliases)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from services.mesh.db import Database, Migration
from services.mesh.errors import AlreadyExists
from services.training.core.model import (
    ArtifactEntry,
    BaseModelRecord,
    ComputeSpec,
    DatasetVersion,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    ModelRecord,
    ModelVersionRecord,
)

__all__ = ["MIGRATIONS", "TrainingStore"]

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("request_id", String(200), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Everything else of the record, as JSON: it is read and written whole.
    Column("record_json", Text, nullable=False),
    Index("jobs_by_tenant", "tenant", "created_at"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("sequence", BigInteger, primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("data_json", Text, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("record_json", Text, nullable=False),
)

model_aliases = Table(
    "model_aliases",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("alias", String(40), primary_key=True),
    Column("version", BigInteger, nullable=False),
)

base_models = Table(
    "base_models",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("record_json", Text, nullable=False),
)


#: How each job acts for its submitter: the delegation auth gave for it, sealed under the training master key.
job_credentials = Table(
    "job_credentials",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("sealed", LargeBinary, nullable=False),
)


def _create_schema(conn: Connection) -> None:
    metadata.create_all(conn)


MIGRATIONS = [
    Migration(1, "jobs, job events, base models, models, versions, aliases", _create_schema),
    # A new database has the table from migration 1 already (create_all skips what exists).
    Migration(
        2, "job credentials: each job's sealed delegation", lambda conn: metadata.create_all(conn, [job_credentials])
    ),
]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _job_json(job: JobRecord) -> str:
    data = asdict(job)
    data["state"] = job.state.value
    for key in ("created_at", "started_at", "ended_at"):
        value = getattr(job, key)
        data[key] = value.isoformat() if value else None
    return json.dumps(data)


_JOB_FIELDS = frozenset(f.name for f in fields(JobRecord))


def _job(row: Row[Any]) -> JobRecord:
    # Records of older versions may hold fields since dropped (cpu_seconds: training no longer meters compute).
    data = {k: v for k, v in json.loads(row.record_json).items() if k in _JOB_FIELDS}
    spec = data.pop("spec")
    spec["dataset"] = DatasetVersion(**spec["dataset"])
    data["spec"] = JobSpec(**spec)
    data["state"] = JobState(data["state"])
    data["created_at"] = _aware(datetime.fromisoformat(data["created_at"]))
    data["started_at"] = _time(data.get("started_at"))
    data["ended_at"] = _time(data.get("ended_at"))
    data["compute"] = ComputeSpec(**data.get("compute", {}))
    return JobRecord(**data)


def _artifact(data: dict[str, Any] | None) -> ArtifactEntry | None:
    return ArtifactEntry(**data) if data else None


def _version_json(record: ModelVersionRecord) -> str:
    data = asdict(record)
    data.pop("aliases")
    data["created_at"] = record.created_at.isoformat()
    return json.dumps(data)


def _version(row: Row[Any], aliases: tuple[str, ...]) -> ModelVersionRecord:
    data = json.loads(row.record_json)
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    data["labels"] = tuple(data["labels"])
    data["artifacts"] = tuple(ArtifactEntry(**a) for a in data["artifacts"])
    return ModelVersionRecord(**data, aliases=aliases)


def _base_model(row: Row[Any]) -> BaseModelRecord:
    data = json.loads(row.record_json)
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    data["artifact"] = _artifact(data.get("artifact"))
    return BaseModelRecord(**data)


class TrainingStore:
    """Blocking persistence; the core runs it in worker threads (``Database.run``)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._engine = db.engine

    # -- jobs ----------------------------------------------------------------------------------------------

    def create_job(self, job: JobRecord, credential: bytes | None = None) -> JobRecord:
        """Inserts a job (and its sealed delegation); with a request id already used by the tenant, returns that job
        instead."""
        with self._engine.begin() as conn:
            if job.request_id:
                row = conn.execute(
                    select(jobs.c.record_json).where(jobs.c.tenant == job.tenant, jobs.c.request_id == job.request_id)
                ).first()
                if row is not None:
                    return _job(row)
            conn.execute(
                insert(jobs).values(
                    job_id=job.job_id,
                    tenant=job.tenant,
                    request_id=job.request_id,
                    state=job.state.value,
                    created_at=job.created_at,
                    record_json=_job_json(job),
                )
            )
            if credential is not None:
                conn.execute(insert(job_credentials).values(job_id=job.job_id, sealed=credential))
        return job

    def job_credential(self, job_id: str) -> bytes | None:
        """The job's sealed delegation, if it still holds one."""
        with self._engine.connect() as conn:
            return conn.execute(  # type: ignore[no-any-return]
                select(job_credentials.c.sealed).where(job_credentials.c.job_id == job_id)
            ).scalar()

    def any_job_credential(self) -> tuple[str, bytes] | None:
        """One job's id and sealed delegation, if any job holds one (what tells whether the master key is right)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(job_credentials.c.job_id, job_credentials.c.sealed).limit(1)).first()
            return (row.job_id, bytes(row.sealed)) if row is not None else None

    def drop_job_credential(self, job_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(delete(job_credentials).where(job_credentials.c.job_id == job_id))

    def ended_jobs_with_credentials(self, ended: frozenset[JobState]) -> list[str]:
        """Jobs in one of the ``ended`` states that still hold a delegation (its revocation has not gone through)."""
        query = (
            select(job_credentials.c.job_id)
            .join(jobs, jobs.c.job_id == job_credentials.c.job_id)
            .where(jobs.c.state.in_([s.value for s in ended]))
        )
        with self._engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def save_job(self, job: JobRecord) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.job_id == job.job_id)
                .values(state=job.state.value, record_json=_job_json(job))
            )

    def job(self, job_id: str) -> JobRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(jobs.c.record_json).where(jobs.c.job_id == job_id)).first()
        return _job(row) if row is not None else None

    def jobs(
        self, tenant: str, states: frozenset[JobState] = frozenset(), offset: int = 0, limit: int = 100
    ) -> list[JobRecord]:
        query = select(jobs.c.record_json).where(jobs.c.tenant == tenant)
        if states:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.job_id).offset(offset).limit(limit)
        with self._engine.connect() as conn:
            return [_job(row) for row in conn.execute(query)]

    def job_counts(self) -> dict[str, int]:
        """Jobs by state (for the metrics)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {state: int(count) for state, count in rows}

    def jobs_in(self, states: frozenset[JobState]) -> list[JobRecord]:
        """Every job (of every tenant) in one of ``states``, oldest first."""
        query = select(jobs.c.record_json).where(jobs.c.state.in_([s.value for s in states]))
        with self._engine.connect() as conn:
            return [_job(row) for row in conn.execute(query.order_by(jobs.c.created_at))]

    def append_events(
        self, job_id: str, items: Sequence[tuple[datetime, str, dict[str, Any]]], job: JobRecord | None = None
    ) -> list[JobEvent]:
        """Appends events (time, kind, data) in order and, given ``job``, saves its record in the same transaction:
        a state change and its event, or a batch of a runner's output and the offset it was read to, are stored
        together or not at all."""
        with self._engine.begin() as conn:
            last = conn.execute(select(func.max(job_events.c.sequence)).where(job_events.c.job_id == job_id)).scalar()
            appended = [
                JobEvent(job_id, int(last or 0) + i, time, kind, data) for i, (time, kind, data) in enumerate(items, 1)
            ]
            if appended:
                conn.execute(
                    insert(job_events),
                    [
                        {
                            "job_id": job_id,
                            "sequence": e.sequence,
                            "time": e.time,
                            "kind": e.kind,
                            "data_json": json.dumps(e.data, default=str),
                        }
                        for e in appended
                    ],
                )
            if job is not None:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.job_id == job.job_id)
                    .values(state=job.state.value, record_json=_job_json(job))
                )
        return appended

    def delete_job(self, job_id: str) -> None:
        """Removes a job, its history and its delegation (a submission the scheduler refused)."""
        with self._engine.begin() as conn:
            for table in (job_events, job_credentials, jobs):
                conn.execute(delete(table).where(table.c.job_id == job_id))

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        query = (
            select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.sequence > after)
            .order_by(job_events.c.sequence)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [
                JobEvent(row.job_id, row.sequence, _aware(row.time), row.kind, json.loads(row.data_json))
                for row in conn.execute(query)
            ]

    # -- base models ---------------------------------------------------------------------------------------

    def add_base_model(self, record: BaseModelRecord) -> None:
        data = asdict(record)
        data["created_at"] = record.created_at.isoformat()
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(base_models).values(
                        tenant=record.tenant,
                        name=record.name,
                        created_at=record.created_at,
                        record_json=json.dumps(data),
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"base model {record.name!r} already exists") from None

    def base_model(self, tenant: str, name: str) -> BaseModelRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(base_models.c.record_json).where(base_models.c.tenant == tenant, base_models.c.name == name)
            ).first()
        return _base_model(row) if row is not None else None

    def base_models(self, tenant: str) -> list[BaseModelRecord]:
        query = select(base_models.c.record_json).where(base_models.c.tenant == tenant).order_by(base_models.c.name)
        with self._engine.connect() as conn:
            return [_base_model(row) for row in conn.execute(query)]

    # -- registry ------------------------------------------------------------------------------------------

    def add_model_version(self, record: ModelVersionRecord) -> ModelVersionRecord:
        """Creates the model if missing and stores ``record`` as its next version (record.version is ignored); the
        version the same job registered already, if there is one."""
        with self._engine.begin() as conn:
            exists = conn.execute(
                select(models.c.name).where(models.c.tenant == record.tenant, models.c.name == record.model)
            ).first()
            if exists is None:
                conn.execute(
                    insert(models).values(
                        tenant=record.tenant,
                        name=record.model,
                        created_at=record.created_at,
                        updated_at=record.created_at,
                    )
                )
            else:
                conn.execute(
                    update(models)
                    .where(models.c.tenant == record.tenant, models.c.name == record.model)
                    .values(updated_at=record.created_at)
                )
            job_id = record.lineage.get("job_id")
            if job_id:
                # A job registers one version however often its publication is retried (a restart after the insert).
                rows = conn.execute(
                    select(model_versions).where(
                        model_versions.c.tenant == record.tenant, model_versions.c.model == record.model
                    )
                ).all()
                for row in rows:
                    if json.loads(row.record_json)["lineage"].get("job_id") == job_id:
                        return _version(row, ())
            last = conn.execute(
                select(func.max(model_versions.c.version)).where(
                    model_versions.c.tenant == record.tenant, model_versions.c.model == record.model
                )
            ).scalar()
            stored = ModelVersionRecord(**{**record.__dict__, "version": int(last or 0) + 1, "aliases": ()})
            conn.execute(
                insert(model_versions).values(
                    tenant=stored.tenant,
                    model=stored.model,
                    version=stored.version,
                    created_at=stored.created_at,
                    record_json=_version_json(stored),
                )
            )
        return stored

    def _aliases(self, conn: Connection, tenant: str, model: str) -> dict[str, int]:
        rows = conn.execute(
            select(model_aliases.c.alias, model_aliases.c.version).where(
                model_aliases.c.tenant == tenant, model_aliases.c.model == model
            )
        )
        return {row.alias: int(row.version) for row in rows}

    def _model(self, conn: Connection, row: Row[Any]) -> ModelRecord:
        latest = conn.execute(
            select(func.max(model_versions.c.version)).where(
                model_versions.c.tenant == row.tenant, model_versions.c.model == row.name
            )
        ).scalar()
        return ModelRecord(
            row.tenant,
            row.name,
            int(latest or 0),
            self._aliases(conn, row.tenant, row.name),
            _aware(row.created_at),
            _aware(row.updated_at),
        )

    def model(self, tenant: str, name: str) -> ModelRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(models).where(models.c.tenant == tenant, models.c.name == name)).first()
            return self._model(conn, row) if row is not None else None

    def models(self, tenant: str, offset: int = 0, limit: int = 100) -> list[ModelRecord]:
        query = select(models).where(models.c.tenant == tenant).order_by(models.c.name).offset(offset).limit(limit)
        with self._engine.connect() as conn:
            return [self._model(conn, row) for row in conn.execute(query).all()]

    def model_version(self, tenant: str, model: str, version: int) -> ModelVersionRecord | None:
        """One version; version 0 means the latest."""
        query = select(model_versions).where(model_versions.c.tenant == tenant, model_versions.c.model == model)
        query = query.where(model_versions.c.version == version) if version else query
        with self._engine.connect() as conn:
            row = conn.execute(query.order_by(model_versions.c.version.desc()).limit(1)).first()
            if row is None:
                return None
            aliases = self._aliases(conn, tenant, model)
        return _version(row, tuple(sorted(a for a, v in aliases.items() if v == row.version)))

    def model_versions(self, tenant: str, model: str, offset: int = 0, limit: int = 100) -> list[ModelVersionRecord]:
        query = (
            select(model_versions)
            .where(model_versions.c.tenant == tenant, model_versions.c.model == model)
            .order_by(model_versions.c.version.desc())
            .offset(offset)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            aliases = self._aliases(conn, tenant, model)
        return [_version(row, tuple(sorted(a for a, v in aliases.items() if v == row.version))) for row in rows]

    def set_alias(self, tenant: str, model: str, alias: str, version: int) -> None:
        """Points ``alias`` at ``version`` (which must exist: the caller checks), or removes it (version 0)."""
        with self._engine.begin() as conn:
            conn.execute(
                delete(model_aliases).where(
                    model_aliases.c.tenant == tenant, model_aliases.c.model == model, model_aliases.c.alias == alias
                )
            )
            if version:
                conn.execute(insert(model_aliases).values(tenant=tenant, model=model, alias=alias, version=version))
            conn.execute(
                update(models)
                .where(models.c.tenant == tenant, models.c.name == model)
                .values(updated_at=datetime.now(UTC))
            )
