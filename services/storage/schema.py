"""The storage service's tables and their recorded migrations (services.mesh.db): what ``StorageStore`` reads and
writes. Applied migrations are never edited; a change of schema is a new migration."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection

from services.mesh.db import Migration

__all__ = [
    "MIGRATIONS",
    "datasets",
    "keyring_keys",
    "object_counters",
    "object_versions",
    "pending_uploads",
    "pseudonym_keys",
    "storage_metering",
    "tenant_keyrings",
    "tenant_keys",
]

metadata = MetaData()

datasets = Table(
    "datasets",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("description", String(1000), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(200), nullable=False),
)

tenant_keys = Table(
    "tenant_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("destroyed_at", DateTime(timezone=True)),
)

tenant_keyrings = Table(
    "tenant_keyrings",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("active_key_id", String(64), ForeignKey("tenant_keys.key_id")),
    # Bumped by every transaction that must be serialized with key changes of the tenant (takes the row lock).
    Column("serial", BigInteger, nullable=False),
)

object_versions = Table(
    "object_versions",
    metadata,
    Column("object_id", String(32), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("name", String(512), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("s3_key", String(700), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("stored_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("content_type", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("format", String(16), nullable=False),
    Column("key_id", String(64), ForeignKey("tenant_keys.key_id"), nullable=False, index=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("text_json", Text),
    Column("masking_json", Text),
    Column("metadata_json", Text, nullable=False),
    Index("object_versions_identity", "tenant", "kind", "name", "version", unique=True),
)

keyring_keys = Table(
    "keyring_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("sealed", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

pending_uploads = Table(
    "pending_uploads",
    metadata,
    Column("object_id", String(32), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("s3_key", String(700), nullable=False),
    Column("instance_id", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
)


# Tables of later migrations live in their own MetaData, so migration 1 keeps creating exactly the first schema.
metering_metadata = MetaData()

storage_metering = Table(
    "storage_metering",
    metering_metadata,
    Column("tenant", String(64), primary_key=True),
    Column("metered_until_ns", BigInteger, nullable=False),
    Column("observed_until_ns", BigInteger, nullable=False),
    Column("unbilled_byte_ns", BigInteger, nullable=False),
    Column("stored_bytes", BigInteger, nullable=False),
    Column("due_span_start_ns", BigInteger),
    Column("due_quantity_nanos", BigInteger),
    # Bumped by every save: the compare-and-set token of concurrent meters (replicas on one database).
    Column("revision", BigInteger, nullable=False),
)


pseudonym_metadata = MetaData()

# One pseudonym key per tenant, wrapped by one of its tenant keys (``key_id``; no foreign key across the two
# MetaData, the keyring lock keeps them consistent). Deleted with the tenant's keys when they are destroyed.
pseudonym_keys = Table(
    "pseudonym_keys",
    pseudonym_metadata,
    Column("tenant", String(64), primary_key=True),
    Column("pseudonym_key_id", String(64), nullable=False),
    Column("key_id", String(64), nullable=False, index=True),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def _create_schema(conn: Connection) -> None:
    metadata.create_all(conn)


def _create_metering(conn: Connection) -> None:
    metering_metadata.create_all(conn)


def _create_pseudonym_keys(conn: Connection) -> None:
    pseudonym_metadata.create_all(conn)


# A version number, once given, is never given again, even after its version is deleted: whoever fetched "v3" of
# an artifact must never get other bytes under that name later (serving, lineage). Each object's highest number ever
# given survives the deletion of its versions and of the dataset itself.
counters_metadata = MetaData()

object_counters = Table(
    "object_counters",
    counters_metadata,
    Column("tenant", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("name", String(512), primary_key=True),
    Column("last_version", BigInteger, nullable=False),
)


def _create_counters(conn: Connection) -> None:
    """The counters, seeded with each object's highest version held now (numbers deleted before this migration
    above the highest remaining one are not known any more: they are given again once, the last time)."""
    counters_metadata.create_all(conn)
    v = object_versions.c
    conn.execute(
        insert(object_counters).from_select(
            ["tenant", "kind", "name", "last_version"],
            select(v.tenant, v.kind, v.name, func.max(v.version)).group_by(v.tenant, v.kind, v.name),
        )
    )


MIGRATIONS = [
    Migration(1, "storage: datasets, versions, tenant keys, keyring, pending uploads", _create_schema),
    Migration(2, "storage: metering points of storage_gib_hours per tenant", _create_metering),
    Migration(3, "storage: pseudonym keys of tenants (masking's keyed tokens)", _create_pseudonym_keys),
    Migration(4, "storage: per-object version counters (a number is never given twice)", _create_counters),
]
