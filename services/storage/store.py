"""Persistence of the storage service's metadata (SQLAlchemy Core; SQLite by default, PostgreSQL at scale):
datasets, visible object versions with their wrapped data keys, tenant keys and their states, the local keyring's
sealed tenant keys, each tenant's wrapped pseudonym key, uploads in progress, and each tenant's storage metering
point (tables in ``schema``).

Version numbers are never given twice: each object's highest number ever given is kept (``object_counters``)
through the deletion of its versions, so (tenant, kind, name, version) names the same bytes forever.

Tenant-key bookkeeping is serialized per tenant by touching the tenant's ``tenant_keyrings`` row first in every
transaction that depends on a key's state (a row lock on PostgreSQL; SQLite serializes writers anyway), so a key
can never be destroyed while a version wrapped by it is being committed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    and_,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from services.mesh.db import Database
from services.mesh.errors import AlreadyExists
from services.storage.core.crypto import SealedKey
from services.storage.core.model import (
    DatasetRecord,
    KeyState,
    MaskingRecord,
    PendingUpload,
    PseudonymKeyRecord,
    TenantKeyRecord,
    TextDatasetRecord,
    VersionRecord,
)
from services.storage.core.names import ObjectKind
from services.storage.schema import (
    datasets,
    keyring_keys,
    object_counters,
    object_versions,
    pending_uploads,
    pseudonym_keys,
    storage_metering,
    tenant_keyrings,
    tenant_keys,
)

__all__ = [
    "StorageStore",
    "MeteringPoint",
    "VersionTaken",
    "KeyUnusable",
    "UploadGone",
    "DatasetGone",
    "DELETED_MARK",
]

#: instance_id of the pending records of deleted versions whose bytes are still to be removed from the store.
DELETED_MARK = "deleted"


@dataclass(frozen=True)
class MeteringPoint:
    """Where a tenant's storage metering stands (see services.storage.metering).

    Usage before ``metered_until_ns`` has been emitted. ``unbilled_byte_ns`` is the volume integrated over
    [metered_until_ns, observed_until_ns) that is not yet billed (or, just after an emission, the rounding residue
    carried into the next span, which may be slightly negative); ``stored_bytes`` is the volume held since
    ``observed_until_ns``. A ``due_*`` span [due_span_start_ns, metered_until_ns) was decided but may not be in the
    usage outbox yet (a crash in between): it is emitted again, with the same id and content, before anything else.
    """

    tenant: str
    metered_until_ns: int
    observed_until_ns: int
    unbilled_byte_ns: int
    stored_bytes: int
    due_span_start_ns: int | None = None
    due_quantity_nanos: int | None = None
    revision: int = 0


class VersionTaken(Exception):
    """Another upload committed the same version number first; retry with the next one."""


class KeyUnusable(Exception):
    """The tenant key a data key was wrapped with was destroyed meanwhile; wrap with the active key again."""


class UploadGone(Exception):
    """The upload's pending record is gone (cleaned up as an orphan); its bytes must not become visible."""


class DatasetGone(Exception):
    """The dataset was deleted while a version of it was being uploaded."""


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _version(row: Row[Any]) -> VersionRecord:
    m = row._mapping
    text = json.loads(m["text_json"]) if m["text_json"] else None
    masking = json.loads(m["masking_json"]) if m["masking_json"] else None
    return VersionRecord(
        object_id=m["object_id"],
        tenant=m["tenant"],
        kind=ObjectKind(m["kind"]),
        name=m["name"],
        version=int(m["version"]),
        s3_key=m["s3_key"],
        size_bytes=int(m["size_bytes"]),
        stored_bytes=int(m["stored_bytes"]),
        sha256=m["sha256"],
        content_type=m["content_type"],
        created_at=_aware(m["created_at"]),
        created_by=m["created_by"],
        format=m["format"],
        key_id=m["key_id"],
        wrapped_key=bytes(m["wrapped_key"]),
        text=TextDatasetRecord(**text) if text else None,
        masking=MaskingRecord(**masking) if masking else None,
        metadata=json.loads(m["metadata_json"]),
        key_state=KeyState(m["state"]),
    )


def _metering_values(point: MeteringPoint) -> dict[str, Any]:
    return {
        "metered_until_ns": point.metered_until_ns,
        "observed_until_ns": point.observed_until_ns,
        "unbilled_byte_ns": point.unbilled_byte_ns,
        "stored_bytes": point.stored_bytes,
        "due_span_start_ns": point.due_span_start_ns,
        "due_quantity_nanos": point.due_quantity_nanos,
        "revision": point.revision,
    }


def _version_columns() -> list[Any]:
    return [*object_versions.c, tenant_keys.c.state]


def _versions_joined() -> Any:
    return object_versions.join(tenant_keys, object_versions.c.key_id == tenant_keys.c.key_id)


class StorageStore:
    """Blocking metadata operations; the core runs them in worker threads (``Database.run``)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._engine = db.engine

    # -- datasets ----------------------------------------------------------------------------------------

    def create_dataset(self, record: DatasetRecord) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(datasets).values(
                        tenant=record.tenant,
                        name=record.name,
                        description=record.description,
                        created_at=record.created_at,
                        created_by=record.created_by,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"dataset {record.name!r} already exists") from None

    def _latest_versions(self) -> Any:
        return (
            select(
                object_versions.c.tenant,
                object_versions.c.name,
                func.max(object_versions.c.version).label("latest"),
            )
            .where(object_versions.c.kind == ObjectKind.DATASET.value)
            .group_by(object_versions.c.tenant, object_versions.c.name)
            .subquery()
        )

    def datasets(self, tenant: str, prefix: str = "", after: str = "", limit: int = 1000) -> list[DatasetRecord]:
        """Datasets of ``tenant`` by name (those after ``after``), with their latest version."""
        latest = self._latest_versions()
        query = (
            select(datasets, latest.c.latest)
            .select_from(
                datasets.outerjoin(latest, and_(latest.c.tenant == datasets.c.tenant, latest.c.name == datasets.c.name))
            )
            .where(datasets.c.tenant == tenant, datasets.c.name > after)
            .order_by(datasets.c.name)
            .limit(limit)
        )
        if prefix:
            query = query.where(datasets.c.name.startswith(prefix, autoescape=True))
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            DatasetRecord(
                tenant=r.tenant,
                name=r.name,
                description=r.description,
                created_at=_aware(r.created_at),
                created_by=r.created_by,
                latest_version=int(r.latest or 0),
            )
            for r in rows
        ]

    def dataset_exists(self, tenant: str, name: str) -> bool:
        with self._engine.connect() as conn:
            return self._dataset_exists(conn, tenant, name)

    @staticmethod
    def _dataset_exists(conn: Connection, tenant: str, name: str) -> bool:
        found = conn.execute(select(datasets.c.name).where(datasets.c.tenant == tenant, datasets.c.name == name))
        return found.first() is not None

    # -- versions ----------------------------------------------------------------------------------------

    def version(self, tenant: str, kind: ObjectKind, name: str, version: int = 0) -> VersionRecord | None:
        """One version, or the latest when ``version`` is 0."""
        where = [
            object_versions.c.tenant == tenant,
            object_versions.c.kind == kind.value,
            object_versions.c.name == name,
        ]
        query = select(*_version_columns()).select_from(_versions_joined()).where(*where)
        if version:
            query = query.where(object_versions.c.version == version)
        else:
            query = query.order_by(object_versions.c.version.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        return _version(row) if row is not None else None

    def versions(
        self,
        tenant: str,
        kind: ObjectKind | None,
        prefix: str,
        all_versions: bool,
        after: tuple[str, str, int] | None,
        limit: int,
    ) -> list[VersionRecord]:
        """Versions ordered by (kind, name, version), after the position ``after``; only the latest of each
        object unless ``all_versions``."""
        v = object_versions.c
        query = select(*_version_columns()).select_from(_versions_joined()).where(v.tenant == tenant)
        if kind is not None:
            query = query.where(v.kind == kind.value)
        if prefix:
            query = query.where(v.name.startswith(prefix, autoescape=True))
        if after is not None:
            query = query.where(tuple_(v.kind, v.name, v.version) > tuple_(*after))
        if not all_versions:
            latest = (
                select(v.kind, v.name, func.max(v.version).label("latest"))
                .where(v.tenant == tenant)
                .group_by(v.kind, v.name)
                .subquery()
            )
            query = query.join(
                latest, and_(latest.c.kind == v.kind, latest.c.name == v.name, latest.c.latest == v.version)
            )
        query = query.order_by(v.kind, v.name, v.version).limit(limit)
        with self._engine.connect() as conn:
            return [_version(row) for row in conn.execute(query)]

    def versions_of(self, tenant: str, kind: ObjectKind, name: str) -> list[VersionRecord]:
        v = object_versions.c
        query = (
            select(*_version_columns())
            .select_from(_versions_joined())
            .where(v.tenant == tenant, v.kind == kind.value, v.name == name)
            .order_by(v.version)
        )
        with self._engine.connect() as conn:
            return [_version(row) for row in conn.execute(query)]

    def next_version(self, tenant: str, kind: ObjectKind, name: str) -> int:
        """The number the next version of the object gets: above every number it was ever given (deleted ones
        included)."""
        c = object_counters.c
        with self._engine.connect() as conn:
            top = conn.execute(
                select(c.last_version).where(c.tenant == tenant, c.kind == kind.value, c.name == name)
            ).scalar()
        return int(top or 0) + 1

    @staticmethod
    def _take_number(conn: Connection, record: VersionRecord) -> None:
        """Records ``record.version`` as the object's highest number given; VersionTaken if it is not above it
        (another upload took it, or it was given before and its version deleted)."""
        c = object_counters.c
        key = (c.tenant == record.tenant, c.kind == record.kind.value, c.name == record.name)
        raised = conn.execute(
            update(object_counters).where(*key, c.last_version < record.version).values(last_version=record.version)
        )
        if raised.rowcount:
            return
        if conn.execute(select(c.last_version).where(*key)).first() is not None:
            raise VersionTaken(record.name)
        # The object's first version: a concurrent first upload makes this an IntegrityError (VersionTaken too).
        conn.execute(
            insert(object_counters).values(
                tenant=record.tenant, kind=record.kind.value, name=record.name, last_version=record.version
            )
        )

    def _lock_keyring(self, conn: Connection, tenant: str) -> bool:
        """Serializes this transaction with key changes of ``tenant``; False if the tenant has no keyring."""
        result = conn.execute(
            update(tenant_keyrings)
            .where(tenant_keyrings.c.tenant == tenant)
            .values(serial=tenant_keyrings.c.serial + 1)
        )
        return bool(result.rowcount)

    def commit_version(self, record: VersionRecord) -> None:
        """Makes an uploaded version visible and forgets its pending record, atomically.

        Raises VersionTaken (retry with the next number: numbers are never given twice), KeyUnusable (wrap again
        with the active key), UploadGone (the pending record was cleaned up), or NotFound-like errors left to the
        caller to check.
        """
        try:
            with self._engine.begin() as conn:
                self._lock_keyring(conn, record.tenant)
                state = conn.execute(select(tenant_keys.c.state).where(tenant_keys.c.key_id == record.key_id)).scalar()
                if state is None or state == KeyState.DESTROYED.value:
                    raise KeyUnusable(record.key_id)
                gone = conn.execute(delete(pending_uploads).where(pending_uploads.c.object_id == record.object_id))
                if not gone.rowcount:
                    raise UploadGone(record.object_id)
                if record.kind is ObjectKind.DATASET and not self._dataset_exists(conn, record.tenant, record.name):
                    raise DatasetGone(record.name)
                self._take_number(conn, record)
                conn.execute(insert(object_versions).values(**self._version_values(record)))
        except IntegrityError:
            raise VersionTaken(record.name) from None

    @staticmethod
    def _version_values(record: VersionRecord) -> dict[str, Any]:
        return {
            "object_id": record.object_id,
            "tenant": record.tenant,
            "kind": record.kind.value,
            "name": record.name,
            "version": record.version,
            "s3_key": record.s3_key,
            "size_bytes": record.size_bytes,
            "stored_bytes": record.stored_bytes,
            "sha256": record.sha256,
            "content_type": record.content_type,
            "created_at": record.created_at,
            "created_by": record.created_by,
            "format": record.format,
            "key_id": record.key_id,
            "wrapped_key": record.wrapped_key,
            "text_json": json.dumps(record.text.__dict__) if record.text else None,
            "masking_json": json.dumps(record.masking.__dict__) if record.masking else None,
            "metadata_json": json.dumps(record.metadata, sort_keys=True),
        }

    def delete_versions(self, versions: Sequence[VersionRecord], dataset: tuple[str, str] | None = None) -> None:
        """Removes versions (and, when given, the dataset (tenant, name)) in one transaction, recording their
        stored bytes as pending removal from the object store (so nothing is forgotten if that fails). Their numbers
        stay taken."""
        with self._engine.begin() as conn:
            if versions:
                ids = [v.object_id for v in versions]
                conn.execute(delete(object_versions).where(object_versions.c.object_id.in_(ids)))
                conn.execute(
                    insert(pending_uploads),
                    [
                        {
                            "object_id": v.object_id,
                            "tenant": v.tenant,
                            "s3_key": v.s3_key,
                            "instance_id": DELETED_MARK,
                            "started_at": datetime(1970, 1, 1, tzinfo=UTC),
                        }
                        for v in versions
                    ],
                )
            if dataset is not None:
                conn.execute(delete(datasets).where(datasets.c.tenant == dataset[0], datasets.c.name == dataset[1]))

    def stored_bytes(self, tenant: str) -> int:
        with self._engine.connect() as conn:
            total = conn.execute(
                select(func.coalesce(func.sum(object_versions.c.stored_bytes), 0)).where(
                    object_versions.c.tenant == tenant
                )
            ).scalar()
        return int(total or 0)

    def stored_bytes_by_tenant(self) -> dict[str, int]:
        """The stored volume of every tenant that stores anything."""
        v = object_versions.c
        with self._engine.connect() as conn:
            rows = conn.execute(select(v.tenant, func.sum(v.stored_bytes)).group_by(v.tenant)).all()
        return {tenant: int(total) for tenant, total in rows if total}

    def holdings_by_tenant(self) -> dict[str, tuple[int, int]]:
        """(stored bytes, object versions) of every tenant that stores anything (for the metrics)."""
        v = object_versions.c
        with self._engine.connect() as conn:
            rows = conn.execute(select(v.tenant, func.sum(v.stored_bytes), func.count()).group_by(v.tenant)).all()
        return {tenant: (int(total or 0), int(count)) for tenant, total, count in rows}

    # -- storage metering points -------------------------------------------------------------------------

    def metering_points(self, tenant: str | None = None) -> list[MeteringPoint]:
        """Every tenant's metering point, or only ``tenant``'s."""
        query = select(storage_metering)
        if tenant is not None:
            query = query.where(storage_metering.c.tenant == tenant)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            MeteringPoint(
                tenant=r.tenant,
                metered_until_ns=int(r.metered_until_ns),
                observed_until_ns=int(r.observed_until_ns),
                unbilled_byte_ns=int(r.unbilled_byte_ns),
                stored_bytes=int(r.stored_bytes),
                due_span_start_ns=None if r.due_span_start_ns is None else int(r.due_span_start_ns),
                due_quantity_nanos=None if r.due_quantity_nanos is None else int(r.due_quantity_nanos),
                revision=int(r.revision),
            )
            for r in rows
        ]

    def save_metering_points(self, changes: Sequence[tuple[MeteringPoint, MeteringPoint | None]]) -> list[bool]:
        """Saves (new point, the point it was computed from) pairs, each only if the stored point is still the one
        it was computed from (compare-and-set on ``revision``; None: the tenant has no point yet). Returns which
        were saved; the others lost to a concurrent meter and must be recomputed."""
        m = storage_metering.c
        saved: dict[int, bool] = {}
        # A tenant's first point is inserted once in its life: in a transaction of its own, so that losing the
        # race (IntegrityError) spoils nothing else.
        for i, (new, old) in enumerate(changes):
            if old is None:
                try:
                    with self._engine.begin() as conn:
                        conn.execute(insert(storage_metering).values(tenant=new.tenant, **_metering_values(new)))
                    saved[i] = True
                except IntegrityError:
                    saved[i] = False
        with self._engine.begin() as conn:
            for i, (new, old) in enumerate(changes):
                if old is not None:
                    result = conn.execute(
                        update(storage_metering)
                        .where(m.tenant == new.tenant, m.revision == old.revision)
                        .values(**_metering_values(new))
                    )
                    saved[i] = bool(result.rowcount)
        return [saved[i] for i in range(len(changes))]

    def clear_metering_due(self, spans: Sequence[tuple[str, int]]) -> None:
        """Forgets the due spans (tenant, span start) once their events are in the usage outbox."""
        m = storage_metering.c
        with self._engine.begin() as conn:
            for tenant, start in spans:
                conn.execute(
                    update(storage_metering)
                    .where(m.tenant == tenant, m.due_span_start_ns == start)
                    .values(due_span_start_ns=None, due_quantity_nanos=None)
                )

    # -- pending uploads ---------------------------------------------------------------------------------

    def add_pending(self, pending: PendingUpload) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                insert(pending_uploads).values(
                    object_id=pending.object_id,
                    tenant=pending.tenant,
                    s3_key=pending.s3_key,
                    instance_id=pending.instance_id,
                    started_at=pending.started_at,
                )
            )

    def remove_pending(self, object_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(delete(pending_uploads).where(pending_uploads.c.object_id == object_id))

    def stale_pending(self, instance_id: str, started_before: datetime) -> list[PendingUpload]:
        """Uploads left unfinished by other (stopped) instances, started before ``started_before``."""
        p = pending_uploads.c
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(pending_uploads).where(p.instance_id != instance_id, p.started_at < started_before)
            ).all()
        return [PendingUpload(r.object_id, r.tenant, r.s3_key, r.instance_id, _aware(r.started_at)) for r in rows]

    # -- tenant keys -------------------------------------------------------------------------------------

    def active_key(self, tenant: str) -> str | None:
        with self._engine.connect() as conn:
            return conn.execute(
                select(tenant_keyrings.c.active_key_id).where(tenant_keyrings.c.tenant == tenant)
            ).scalar()

    def install_key(self, tenant: str, key_id: str) -> list[str]:
        """Makes a new key the tenant's active one; the previously active key (if any) is retired. Returns the
        ids of the tenant's retired keys."""
        with self._engine.begin() as conn:
            now = _now()
            conn.execute(insert(tenant_keys).values(key_id=key_id, tenant=tenant, state="active", created_at=now))
            if self._lock_keyring(conn, tenant):
                conn.execute(
                    update(tenant_keys)
                    .where(
                        tenant_keys.c.tenant == tenant, tenant_keys.c.state == "active", tenant_keys.c.key_id != key_id
                    )
                    .values(state=KeyState.RETIRED.value)
                )
                conn.execute(
                    update(tenant_keyrings).where(tenant_keyrings.c.tenant == tenant).values(active_key_id=key_id)
                )
            else:
                conn.execute(insert(tenant_keyrings).values(tenant=tenant, active_key_id=key_id, serial=0))
            retired = conn.execute(
                select(tenant_keys.c.key_id).where(tenant_keys.c.tenant == tenant, tenant_keys.c.state == "retired")
            ).scalars()
            return list(retired)

    def install_first_key(self, tenant: str, key_id: str) -> bool:
        """Installs ``key_id`` as the tenant's first key; False (nothing changed) if it already has an active key."""
        try:
            with self._engine.begin() as conn:
                if self._lock_keyring(conn, tenant):
                    active = conn.execute(
                        select(tenant_keyrings.c.active_key_id).where(tenant_keyrings.c.tenant == tenant)
                    ).scalar()
                    if active is not None:
                        return False
                    conn.execute(
                        insert(tenant_keys).values(key_id=key_id, tenant=tenant, state="active", created_at=_now())
                    )
                    conn.execute(
                        update(tenant_keyrings).where(tenant_keyrings.c.tenant == tenant).values(active_key_id=key_id)
                    )
                    return True
                conn.execute(
                    insert(tenant_keys).values(key_id=key_id, tenant=tenant, state="active", created_at=_now())
                )
                conn.execute(insert(tenant_keyrings).values(tenant=tenant, active_key_id=key_id, serial=0))
                return True
        except IntegrityError:
            return False  # a concurrent first upload installed one

    def keys(self, tenant: str) -> list[TenantKeyRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(tenant_keys).where(tenant_keys.c.tenant == tenant).order_by(tenant_keys.c.created_at)
            ).all()
        return [TenantKeyRecord(r.key_id, r.tenant, KeyState(r.state), _aware(r.created_at)) for r in rows]

    def versions_to_rewrap(self, tenant: str, active_key_id: str, limit: int) -> list[VersionRecord]:
        """Versions of ``tenant`` still wrapped by a live key other than the active one."""
        query = (
            select(*_version_columns())
            .select_from(_versions_joined())
            .where(
                object_versions.c.tenant == tenant,
                object_versions.c.key_id != active_key_id,
                tenant_keys.c.state != KeyState.DESTROYED.value,
            )
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [_version(row) for row in conn.execute(query)]

    def rewrap(self, object_id: str, old_key_id: str, new_key_id: str, wrapped: bytes) -> bool:
        """Replaces a version's wrapped data key, if it is still wrapped by ``old_key_id``."""
        with self._engine.begin() as conn:
            result = conn.execute(
                update(object_versions)
                .where(object_versions.c.object_id == object_id, object_versions.c.key_id == old_key_id)
                .values(key_id=new_key_id, wrapped_key=wrapped)
            )
            return bool(result.rowcount)

    def destroy_if_unused(self, tenant: str, key_id: str) -> bool:
        """Marks a retired key destroyed if no version is wrapped by it any more."""
        with self._engine.begin() as conn:
            self._lock_keyring(conn, tenant)
            used = conn.execute(
                select(object_versions.c.object_id).where(object_versions.c.key_id == key_id).limit(1)
            ).first()
            wraps_pseudonyms = conn.execute(
                select(pseudonym_keys.c.tenant).where(pseudonym_keys.c.key_id == key_id)
            ).first()
            if used is not None or wraps_pseudonyms is not None:
                return False
            result = conn.execute(
                update(tenant_keys)
                .where(tenant_keys.c.key_id == key_id, tenant_keys.c.state == KeyState.RETIRED.value)
                .values(state=KeyState.DESTROYED.value, destroyed_at=_now())
            )
            return bool(result.rowcount)

    def destroy_all_keys(self, tenant: str) -> tuple[list[str], int]:
        """Marks every live key of ``tenant`` destroyed and forgets its pseudonym key; returns the keys' ids and how
        many versions they wrapped."""
        with self._engine.begin() as conn:
            self._lock_keyring(conn, tenant)
            conn.execute(delete(pseudonym_keys).where(pseudonym_keys.c.tenant == tenant))
            live = list(
                conn.execute(
                    select(tenant_keys.c.key_id).where(
                        tenant_keys.c.tenant == tenant, tenant_keys.c.state != KeyState.DESTROYED.value
                    )
                ).scalars()
            )
            shredded = 0
            if live:
                shredded = int(
                    conn.execute(
                        select(func.count()).select_from(object_versions).where(object_versions.c.key_id.in_(live))
                    ).scalar()
                    or 0
                )
                conn.execute(
                    update(tenant_keyrings).where(tenant_keyrings.c.tenant == tenant).values(active_key_id=None)
                )
                conn.execute(
                    update(tenant_keys)
                    .where(tenant_keys.c.key_id.in_(live))
                    .values(state=KeyState.DESTROYED.value, destroyed_at=_now())
                )
            return live, shredded

    def destroyed_key_ids(self) -> list[tuple[str, str]]:
        """(tenant, key id) of every destroyed key (the keyring's material for them must be gone)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(tenant_keys.c.tenant, tenant_keys.c.key_id).where(
                    tenant_keys.c.state == KeyState.DESTROYED.value
                )
            ).all()
        return [(r.tenant, r.key_id) for r in rows]

    # -- pseudonym keys ----------------------------------------------------------------------------------

    def pseudonym_key(self, tenant: str) -> PseudonymKeyRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(pseudonym_keys).where(pseudonym_keys.c.tenant == tenant)).first()
        if row is None:
            return None
        return PseudonymKeyRecord(
            row.tenant, row.pseudonym_key_id, row.key_id, bytes(row.wrapped), _aware(row.created_at)
        )

    def install_pseudonym_key(self, record: PseudonymKeyRecord) -> bool:
        """Installs the tenant's pseudonym key unless it has a usable one (False: use that one). KeyUnusable if the
        tenant key that wraps ``record`` was destroyed meanwhile."""
        with self._engine.begin() as conn:
            self._lock_keyring(conn, record.tenant)
            wrapping = conn.execute(select(tenant_keys.c.state).where(tenant_keys.c.key_id == record.key_id)).scalar()
            if wrapping is None or wrapping == KeyState.DESTROYED.value:
                raise KeyUnusable(record.key_id)
            current = conn.execute(
                select(tenant_keys.c.state)
                .select_from(pseudonym_keys.join(tenant_keys, pseudonym_keys.c.key_id == tenant_keys.c.key_id))
                .where(pseudonym_keys.c.tenant == record.tenant)
            ).scalar()
            if current is not None and current != KeyState.DESTROYED.value:
                return False
            conn.execute(delete(pseudonym_keys).where(pseudonym_keys.c.tenant == record.tenant))
            conn.execute(
                insert(pseudonym_keys).values(
                    tenant=record.tenant,
                    pseudonym_key_id=record.pseudonym_key_id,
                    key_id=record.key_id,
                    wrapped=record.wrapped,
                    created_at=record.created_at,
                )
            )
            return True

    def rewrap_pseudonym_key(self, tenant: str, old_key_id: str, new_key_id: str, wrapped: bytes) -> bool:
        """Replaces the tenant's wrapped pseudonym key, if it is still wrapped by ``old_key_id``."""
        with self._engine.begin() as conn:
            result = conn.execute(
                update(pseudonym_keys)
                .where(pseudonym_keys.c.tenant == tenant, pseudonym_keys.c.key_id == old_key_id)
                .values(key_id=new_key_id, wrapped=wrapped)
            )
            return bool(result.rowcount)

    # -- the local keyring's sealed keys (KeyringStore) --------------------------------------------------

    def put_sealed_key(self, key: SealedKey) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                insert(keyring_keys).values(
                    key_id=key.key_id, tenant=key.tenant, sealed=key.sealed, created_at=key.created_at
                )
            )

    def sealed_key(self, key_id: str) -> SealedKey | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(keyring_keys).where(keyring_keys.c.key_id == key_id)).first()
        if row is None:
            return None
        return SealedKey(row.key_id, row.tenant, bytes(row.sealed), _aware(row.created_at))

    def delete_sealed_key(self, key_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(delete(keyring_keys).where(keyring_keys.c.key_id == key_id))

    def any_sealed_key(self) -> SealedKey | None:
        """One sealed tenant key (the oldest), to check the master key against at start."""
        with self._engine.connect() as conn:
            row = conn.execute(select(keyring_keys).order_by(keyring_keys.c.created_at).limit(1)).first()
        return None if row is None else SealedKey(row.key_id, row.tenant, bytes(row.sealed), _aware(row.created_at))

    def sealed_key_ids(self, key_ids: Sequence[str]) -> list[str]:
        with self._engine.connect() as conn:
            return list(
                conn.execute(select(keyring_keys.c.key_id).where(keyring_keys.c.key_id.in_(list(key_ids)))).scalars()
            )
