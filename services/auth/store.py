"""Persistence of the auth service: tenants, principals, API keys, refresh tokens, job delegations, revocations,
signing keys, the Casbin policy and the audit log, in one SQLAlchemy database. Each change and its audit event
commit together, and so does a step of the change counter its kind of state keeps (``auth_changes``): the policy,
the signing keys, the revocations. Replicas sharing the database poll the counters and reload what another replica
changed (``changed_elsewhere``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import casbin.persist
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from services.mesh.db import Database, Migration
from services.mesh.errors import AlreadyExists

__all__ = [
    "AuthStore",
    "AuditRecord",
    "PolicyLine",
    "MIGRATIONS",
    "CasbinAdapter",
    "CHANGE_KINDS",
]

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("display_name", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

principals = Table(
    "principals",
    metadata,
    Column("subject", String(200), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("name", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("password_hash", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Added in migration 2: a disabled principal cannot authenticate; an expired password must be replaced.
    Column("disabled_at", DateTime(timezone=True)),
    Column("password_expires_at", DateTime(timezone=True)),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("subject", String(200), nullable=False, index=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("secret_hash", String(200), nullable=False),
    Column("description", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_id", String(64), primary_key=True),
    Column("family_id", String(64), nullable=False, index=True),
    Column("subject", String(200), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("secret_hash", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
    Column("revoked", Boolean, nullable=False, default=False),
    # Added in migration 2: the absolute end of the login (the family), carried to every rotated token.
    Column("family_expires_at", DateTime(timezone=True)),
)

delegations = Table(
    "delegations",
    metadata,
    Column("delegation_id", String(64), primary_key=True),
    Column("subject", String(200), nullable=False, index=True),
    Column("tenant", String(64), nullable=False),
    Column("job_id", String(128), nullable=False),
    Column("delegate", String(64), nullable=False),
    Column("secret_hash", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)

#: Tokens bearing ``credential`` ("rf:", "ak:", "dg:" id, or a subject) issued before ``issued_before`` are refused.
revocations = Table(
    "revocations",
    metadata,
    Column("credential", String(220), primary_key=True),
    Column("issued_before", DateTime(timezone=True), nullable=False, index=True),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("private_key", LargeBinary, nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("retired_at", DateTime(timezone=True)),
)

casbin_rules = Table(
    "casbin_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ptype", String(8), nullable=False),
    Column("v0", String(200), nullable=False, default=""),
    Column("v1", String(200), nullable=False, default=""),
    Column("v2", String(200), nullable=False, default=""),
    Column("v3", String(200), nullable=False, default=""),
    Index("ix_casbin_rules_line", "ptype", "v0", "v1", "v2", "v3", unique=True),
)

#: Kinds of state each replica holds in memory, each with a counter stepped in every transaction that changes it.
CHANGE_KINDS = ("policy", "keys", "revocations")
auth_changes = Table(
    "auth_changes",
    metadata,
    Column("kind", String(32), primary_key=True),
    Column("version", BigInteger, nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(300), nullable=False),
    Column("trace_id", String(32), nullable=False),
    Column("details_json", Text, nullable=False),
    Index("ix_audit_tenant_seq", "tenant", "seq"),
)


def _add_missing(conn: Connection) -> None:
    """Creates the tables and columns of this schema that the database lacks (databases made by migration 1 on an
    older schema; on a new database migration 1 already made them all)."""
    metadata.create_all(conn, tables=[delegations, revocations])
    found = inspect(conn)
    for table, names in (
        (principals, ("disabled_at", "password_expires_at")),
        (refresh_tokens, ("family_expires_at",)),
    ):
        present = {c["name"] for c in found.get_columns(table.name)}
        for name in names:
            if name not in present:
                kind = table.c[name].type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


def _add_change_counters(conn: Connection) -> None:
    metadata.create_all(conn, tables=[auth_changes])
    conn.execute(insert(auth_changes), [{"kind": kind, "version": 0} for kind in CHANGE_KINDS])


MIGRATIONS = [
    Migration(1, "auth: initial schema", lambda conn: metadata.create_all(conn)),
    Migration(
        2, "auth: disabled principals, expiring passwords, login lifetime, revocations, delegations", _add_missing
    ),
    Migration(
        3,
        "auth: change counters (replicas reload the policy, keys and revocations others changed)",
        _add_change_counters,
    ),
]


@dataclass(frozen=True)
class AuditRecord:
    """One security-relevant change."""

    id: str
    time: datetime
    actor: str
    tenant: str
    action: str
    target: str
    trace_id: str
    details: dict[str, Any]


#: A Casbin policy line: ("p", sub, dom, obj, act) or ("g", sub, role, dom).
PolicyLine = tuple[str, ...]


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything in aidc is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _findable(*keys: str | None) -> bool:
    """PostgreSQL text cannot hold NUL characters, so no stored key contains one: a lookup by such a key finds
    nothing, as it does on SQLite, rather than failing in the driver."""
    return not any(key and "\x00" in key for key in keys)


def _rule_values(line: PolicyLine) -> dict[str, str]:
    ptype, *values = line
    row = {"ptype": ptype}
    for i in range(4):
        row[f"v{i}"] = values[i] if i < len(values) else ""
    return row


class AuthStore:
    """All of the auth service's reads and writes."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # The counter of each kind up to which this process's memory holds every change (see changed_elsewhere).
        self._seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()

    # -- change counters ----------------------------------------------------------------------------
    def _versions(self) -> dict[str, int]:
        with self.db.engine.connect() as conn:
            return {row.kind: int(row.version) for row in conn.execute(select(auth_changes))}

    def mark_loaded(self) -> None:
        """Records that memory now holds everything (called before loading it all at start)."""
        versions = self._versions()
        with self._seen_lock:
            self._seen = versions

    def changed_elsewhere(self) -> set[str]:
        """The kinds another process changed since this one last looked; they count as seen from now on, so the
        caller reloads them (the counters are read before the caller reloads: a change landing in between is
        reloaded again next time, never missed)."""
        versions = self._versions()
        with self._seen_lock:
            changed = {kind for kind, version in versions.items() if version > self._seen.get(kind, 0)}
            for kind in changed:
                self._seen[kind] = versions[kind]
        return changed

    @staticmethod
    def _step(conn: Connection, kind: str) -> int:
        return int(
            conn.execute(
                update(auth_changes)
                .where(auth_changes.c.kind == kind)
                .values(version=auth_changes.c.version + 1)
                .returning(auth_changes.c.version)
            ).scalar_one()
        )

    def _stepped(self, steps: dict[str, int]) -> None:
        """After a commit: a counter this process stepped from the version it had seen is still seen (this process
        applies its own change to its memory); one that others stepped meanwhile is left for changed_elsewhere."""
        with self._seen_lock:
            for kind, version in steps.items():
                if self._seen.get(kind) == version - 1:
                    self._seen[kind] = version

    # -- transactions -------------------------------------------------------------------------------
    def _write(
        self,
        audit: AuditRecord | None,
        *statements: Any,
        policy_add: Iterable[PolicyLine] = (),
        policy_remove: Iterable[PolicyLine] = (),
    ) -> None:
        """Runs statements, policy changes, counter steps and the audit insert in one transaction."""
        policy_add, policy_remove = list(policy_add), list(policy_remove)
        steps: dict[str, int] = {}
        try:
            with self.db.engine.begin() as conn:
                for statement in statements:
                    conn.execute(statement)
                self._policy_changes(conn, policy_add, policy_remove)
                if policy_add or policy_remove:
                    steps["policy"] = self._step(conn, "policy")
                if any(getattr(statement, "table", None) is revocations for statement in statements):
                    steps["revocations"] = self._step(conn, "revocations")
                if audit is not None:
                    self._insert_audit(conn, audit)
        except IntegrityError as exc:
            raise AlreadyExists("it already exists") from exc
        self._stepped(steps)

    @staticmethod
    def _policy_changes(conn: Connection, add: Iterable[PolicyLine], remove: Iterable[PolicyLine]) -> None:
        rows = [_rule_values(line) for line in add]
        if rows:
            conn.execute(insert(casbin_rules), rows)
        for line in remove:
            values = _rule_values(line)
            conn.execute(delete(casbin_rules).where(and_(*(casbin_rules.c[k] == v for k, v in values.items()))))

    @staticmethod
    def _insert_audit(conn: Connection, audit: AuditRecord) -> None:
        conn.execute(
            insert(audit_events).values(
                id=audit.id,
                time=audit.time,
                actor=audit.actor,
                tenant=audit.tenant,
                action=audit.action,
                target=audit.target,
                trace_id=audit.trace_id,
                details_json=json.dumps(audit.details, sort_keys=True),
            )
        )

    def record_audit(self, audit: AuditRecord) -> None:
        with self.db.engine.begin() as conn:
            self._insert_audit(conn, audit)

    # -- tenants ------------------------------------------------------------------------------------
    def create_tenant(
        self, name: str, display_name: str, now: datetime, policy: Sequence[PolicyLine], audit: AuditRecord
    ) -> None:
        self._write(
            audit,
            insert(tenants).values(name=name, display_name=display_name, created_at=now),
            policy_add=policy,
        )

    def get_tenant(self, name: str) -> Row[Any] | None:
        if not _findable(name):
            return None
        with self.db.engine.connect() as conn:
            return conn.execute(select(tenants).where(tenants.c.name == name)).first()

    def list_tenants(self, after: str, limit: int) -> list[Row[Any]]:
        with self.db.engine.connect() as conn:
            query = select(tenants).where(tenants.c.name > after).order_by(tenants.c.name).limit(limit)
            return list(conn.execute(query))

    # -- principals ---------------------------------------------------------------------------------
    def create_principal(
        self,
        subject: str,
        tenant: str,
        name: str,
        kind: str,
        password_hash: str | None,
        now: datetime,
        policy: Sequence[PolicyLine],
        audit: AuditRecord | None,
        password_expires_at: datetime | None = None,
    ) -> None:
        self._write(
            audit,
            insert(principals).values(
                subject=subject,
                tenant=tenant,
                name=name,
                kind=kind,
                password_hash=password_hash,
                created_at=now,
                password_expires_at=password_expires_at,
            ),
            policy_add=policy,
        )

    def get_principal(self, subject: str) -> Row[Any] | None:
        if not _findable(subject):
            return None
        with self.db.engine.connect() as conn:
            return conn.execute(select(principals).where(principals.c.subject == subject)).first()

    def list_principals(self, tenant: str, after: str, limit: int) -> list[Row[Any]]:
        with self.db.engine.connect() as conn:
            query = (
                select(principals)
                .where(principals.c.tenant == tenant, principals.c.subject > after)
                .order_by(principals.c.subject)
                .limit(limit)
            )
            return list(conn.execute(query))

    def set_disabled(
        self, subject: str, disabled_at: datetime | None, audit: AuditRecord, revoke_delegations: bool = False
    ) -> None:
        """Disables (``disabled_at`` set: every token of the subject issued before it is refused, its delegations are
        revoked) or enables (None) a principal."""
        statements: list[Any] = [
            update(principals).where(principals.c.subject == subject).values(disabled_at=disabled_at)
        ]
        if disabled_at is not None:
            statements += self._revocation(subject, disabled_at)
            if revoke_delegations:
                statements.append(
                    update(delegations)
                    .where(delegations.c.subject == subject, delegations.c.revoked_at.is_(None))
                    .values(revoked_at=disabled_at)
                )
        self._write(audit, *statements)

    def set_password(
        self, subject: str, password_hash: str, now: datetime, end_families: Sequence[str], audit: AuditRecord
    ) -> None:
        """Replaces a password (no longer expired) and ends the given logins (refresh families) of the subject."""
        statements: list[Any] = [
            update(principals)
            .where(principals.c.subject == subject)
            .values(password_hash=password_hash, password_expires_at=None)
        ]
        for family in end_families:
            statements += self._family_revocation(family, now)
        self._write(audit, *statements)

    def count_principals(self) -> int:
        with self.db.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(principals)).scalar_one())

    # -- API keys -----------------------------------------------------------------------------------
    def create_api_key(
        self,
        key_id: str,
        subject: str,
        tenant: str,
        secret_hash: str,
        description: str,
        now: datetime,
        expires_at: datetime | None,
        audit: AuditRecord,
    ) -> None:
        self._write(
            audit,
            insert(api_keys).values(
                key_id=key_id,
                subject=subject,
                tenant=tenant,
                secret_hash=secret_hash,
                description=description,
                created_at=now,
                expires_at=expires_at,
            ),
        )

    def get_api_key(self, key_id: str) -> Row[Any] | None:
        if not _findable(key_id):
            return None
        with self.db.engine.connect() as conn:
            return conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()

    def list_api_keys(self, tenant: str, after: str, limit: int) -> list[Row[Any]]:
        with self.db.engine.connect() as conn:
            query = (
                select(api_keys)
                .where(api_keys.c.tenant == tenant, api_keys.c.key_id > after)
                .order_by(api_keys.c.key_id)
                .limit(limit)
            )
            return list(conn.execute(query))

    def revoke_api_key(self, key_id: str, now: datetime, audit: AuditRecord) -> None:
        self._write(
            audit,
            update(api_keys).where(api_keys.c.key_id == key_id).values(revoked_at=now),
            *self._revocation(f"ak:{key_id}", now),
        )

    # -- revocations --------------------------------------------------------------------------------
    @staticmethod
    def _revocation(credential: str, issued_before: datetime) -> list[Any]:
        return [
            delete(revocations).where(revocations.c.credential == credential),
            insert(revocations).values(credential=credential, issued_before=issued_before),
        ]

    def revocations_since(self, since: datetime) -> dict[str, datetime]:
        """Revocations made after ``since`` (older ones concern only expired tokens)."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(revocations).where(revocations.c.issued_before > since))
            return {r.credential: _utc(r.issued_before) or since for r in rows}

    # -- refresh tokens -----------------------------------------------------------------------------
    def insert_refresh_token(
        self,
        token_id: str,
        family_id: str,
        subject: str,
        tenant: str,
        secret_hash: str,
        now: datetime,
        expires_at: datetime,
        family_expires_at: datetime,
    ) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(
                insert(refresh_tokens).values(
                    token_id=token_id,
                    family_id=family_id,
                    subject=subject,
                    tenant=tenant,
                    secret_hash=secret_hash,
                    created_at=now,
                    expires_at=expires_at,
                    revoked=False,
                    family_expires_at=family_expires_at,
                )
            )

    def get_refresh_token(self, token_id: str) -> Row[Any] | None:
        if not _findable(token_id):
            return None
        with self.db.engine.connect() as conn:
            return conn.execute(select(refresh_tokens).where(refresh_tokens.c.token_id == token_id)).first()

    def use_refresh_token(self, token_id: str, now: datetime) -> bool:
        """Marks a refresh token used; False if it already was (a reuse), atomically."""
        with self.db.engine.begin() as conn:
            result = conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.token_id == token_id, refresh_tokens.c.used_at.is_(None))
                .values(used_at=now)
            )
            return bool(result.rowcount == 1)

    @classmethod
    def _family_revocation(cls, family_id: str, now: datetime) -> list[Any]:
        return [
            update(refresh_tokens).where(refresh_tokens.c.family_id == family_id).values(revoked=True),
            *cls._revocation(f"rf:{family_id}", now),
        ]

    def revoke_refresh_family(self, family_id: str, now: datetime, audit: AuditRecord) -> None:
        """Ends a login: its refresh tokens, and the access tokens issued from them."""
        self._write(audit, *self._family_revocation(family_id, now))

    def live_families(self, subject: str, now: datetime) -> list[str]:
        """The logins (refresh families) of a subject that can still be refreshed."""
        with self.db.engine.connect() as conn:
            query = select(refresh_tokens.c.family_id).where(
                refresh_tokens.c.subject == subject,
                refresh_tokens.c.revoked.is_(False),
                refresh_tokens.c.expires_at > now,
            )
            return sorted(set(conn.execute(query.distinct()).scalars()))

    # -- delegations --------------------------------------------------------------------------------
    def create_delegation(
        self,
        delegation_id: str,
        subject: str,
        tenant: str,
        job_id: str,
        delegate: str,
        secret_hash: str,
        now: datetime,
        expires_at: datetime,
        audit: AuditRecord,
    ) -> None:
        self._write(
            audit,
            insert(delegations).values(
                delegation_id=delegation_id,
                subject=subject,
                tenant=tenant,
                job_id=job_id,
                delegate=delegate,
                secret_hash=secret_hash,
                created_at=now,
                expires_at=expires_at,
            ),
        )

    def get_delegation(self, delegation_id: str) -> Row[Any] | None:
        if not _findable(delegation_id):
            return None
        with self.db.engine.connect() as conn:
            return conn.execute(select(delegations).where(delegations.c.delegation_id == delegation_id)).first()

    def revoke_delegation(self, delegation_id: str, now: datetime, audit: AuditRecord) -> None:
        self._write(
            audit,
            update(delegations).where(delegations.c.delegation_id == delegation_id).values(revoked_at=now),
            *self._revocation(f"dg:{delegation_id}", now),
        )

    # -- signing keys -------------------------------------------------------------------------------
    def insert_signing_key(
        self, kid: str, private_key: bytes, public_jwk: str, now: datetime, audit: AuditRecord | None
    ) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(update(signing_keys).where(signing_keys.c.retired_at.is_(None)).values(retired_at=now))
            conn.execute(
                insert(signing_keys).values(kid=kid, private_key=private_key, public_jwk=public_jwk, created_at=now)
            )
            if audit is not None:
                self._insert_audit(conn, audit)
            version = self._step(conn, "keys")
        self._stepped({"keys": version})

    def signing_keys(self) -> list[Row[Any]]:
        with self.db.engine.connect() as conn:
            return list(conn.execute(select(signing_keys).order_by(signing_keys.c.created_at)))

    # -- policy -------------------------------------------------------------------------------------
    def change_policy(self, add: Sequence[PolicyLine], remove: Sequence[PolicyLine], audit: AuditRecord) -> None:
        self._write(audit, policy_add=add, policy_remove=remove)

    def policy_lines(self) -> list[PolicyLine]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(casbin_rules).order_by(casbin_rules.c.id))
            return [tuple(v for v in (r.ptype, r.v0, r.v1, r.v2, r.v3) if v != "") for r in rows]

    # -- audit --------------------------------------------------------------------------------------
    def list_audit(self, tenant: str | None, before_seq: int | None, limit: int) -> list[Row[Any]]:
        if not _findable(tenant):
            return []
        with self.db.engine.connect() as conn:
            query = select(audit_events)
            if tenant is not None:
                query = query.where(audit_events.c.tenant == tenant)
            if before_seq is not None:
                query = query.where(audit_events.c.seq < before_seq)
            return list(conn.execute(query.order_by(audit_events.c.seq.desc()).limit(limit)))


class CasbinAdapter(casbin.persist.Adapter):  # type: ignore[misc]
    """Loads the policy from the auth database. Writes go through AuthStore transactions (with their audit
    events), then into the in-memory enforcer; so auto-save is off and the write hooks do nothing."""

    def __init__(self, store: AuthStore) -> None:
        self._store = store

    def load_policy(self, model: Any) -> None:
        for line in self._store.policy_lines():
            casbin.persist.load_policy_line(", ".join(line), model)
