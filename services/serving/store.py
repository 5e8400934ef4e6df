"""Persistence of the serving service (SQLAlchemy Core; SQLite by default, PostgreSQL at scale): deployments."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, Text, delete, select
from sqlalchemy.engine import Connection, Row

from services.mesh.db import Database, Migration
from services.serving.core.model import DeploymentRecord, DeploymentState

__all__ = ["MIGRATIONS", "DeploymentStore"]

metadata = MetaData()

deployments = Table(
    "deployments",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("triton_name", String(200), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("target_version", BigInteger, nullable=False),
    Column("alias", String(40), nullable=False),
    Column("instance_count", Integer, nullable=False),
    Column("max_batch_size", Integer, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=False),
    Column("last_error_time", DateTime(timezone=True), nullable=True),
)


def _create_schema(conn: Connection) -> None:
    metadata.create_all(conn)


MIGRATIONS = [Migration(1, "deployments", _create_schema)]


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _record(row: Row[Any]) -> DeploymentRecord:
    values = row._mapping
    return DeploymentRecord(
        tenant=values["tenant"],
        model=values["model"],
        triton_name=values["triton_name"],
        state=DeploymentState(values["state"]),
        version=int(values["version"]),
        target_version=int(values["target_version"]),
        alias=values["alias"],
        instance_count=int(values["instance_count"]),
        max_batch_size=int(values["max_batch_size"]),
        created_by=values["created_by"],
        create_time=_aware(values["create_time"]),  # type: ignore[arg-type]
        update_time=_aware(values["update_time"]),  # type: ignore[arg-type]
        last_error=values["last_error"],
        last_error_time=_aware(values["last_error_time"]),
    )


def _values(record: DeploymentRecord) -> dict[str, Any]:
    return {
        "tenant": record.tenant,
        "model": record.model,
        "triton_name": record.triton_name,
        "state": record.state.value,
        "version": record.version,
        "target_version": record.target_version,
        "alias": record.alias,
        "instance_count": record.instance_count,
        "max_batch_size": record.max_batch_size,
        "created_by": record.created_by,
        "create_time": record.create_time,
        "update_time": record.update_time,
        "last_error": record.last_error,
        "last_error_time": record.last_error_time,
    }


class DeploymentStore:
    """Blocking persistence; the core runs it in worker threads (``Database.run``)."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine

    def save(self, record: DeploymentRecord) -> None:
        """Inserts or replaces the deployment of (tenant, model)."""
        key = (deployments.c.tenant == record.tenant) & (deployments.c.model == record.model)
        with self._engine.begin() as conn:
            if conn.execute(select(deployments.c.tenant).where(key)).first() is None:
                conn.execute(deployments.insert().values(**_values(record)))
            else:
                conn.execute(deployments.update().where(key).values(**_values(record)))

    def delete(self, tenant: str, model: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(delete(deployments).where(deployments.c.tenant == tenant, deployments.c.model == model))

    def get(self, tenant: str, model: str) -> DeploymentRecord | None:
        query = select(deployments).where(deployments.c.tenant == tenant, deployments.c.model == model)
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        return _record(row) if row is not None else None

    def page(self, tenant: str, offset: int, limit: int) -> list[DeploymentRecord]:
        query = (
            select(deployments)
            .where(deployments.c.tenant == tenant)
            .order_by(deployments.c.model)
            .offset(offset)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def all(self) -> list[DeploymentRecord]:
        """Every deployment of every tenant (what must be loaded after a restart)."""
        with self._engine.connect() as conn:
            return [_record(row) for row in conn.execute(select(deployments).order_by(deployments.c.create_time))]
