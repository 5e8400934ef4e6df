"""Each stateful service's database: SQLAlchemy from a URL (a SQLite file per service by default, PostgreSQL
on a cluster) with ordered, recorded schema migrations, so no service is written SQLite-only."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url

__all__ = ["Migration", "Database", "open_database"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_meta = MetaData()
_migrations_table = Table(
    "schema_migrations",
    _meta,
    # Versions are counted per component, so services sharing one database keep separate histories.
    Column("component", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class Migration:
    """One schema step. Versions start at 1 and increase by one; applied steps are never edited."""

    version: int
    description: str
    apply: Callable[[Connection], None]


class Database:
    """An engine plus helpers to run blocking database work off the event loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Holds a lock named ``name`` across every process using this database, for start-up work that replicas
        starting at once must do one after the other (migrations, first-start bootstrap): a PostgreSQL advisory lock
        (released with its connection, so a crashed holder never blocks the others), or for a SQLite file a lock on
        a file beside it (the processes sharing a SQLite file share a machine)."""
        if self.is_sqlite:
            database = self.engine.url.database
            if not database or database == ":memory:":
                yield
                return
            with open(f"{database}.{name}.lock", "a+b") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
            return
        key = int.from_bytes(hashlib.sha256(f"aidc:{name}".encode()).digest()[:8], "big", signed=True)
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()

    def migrate(self, migrations: Sequence[Migration], component: str) -> int:
        """Applies ``component``'s migrations not yet applied, each in its own transaction; returns the schema
        version. Replicas starting at once migrate one after the other (the later ones find nothing to do)."""
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(migrations) + 1)):
            raise ValueError(f"migration versions must be 1..N in order, got {versions}")
        with self.exclusive("migrations"):
            return self._migrate(migrations, component)

    def _migrate(self, migrations: Sequence[Migration], component: str) -> int:
        _meta.create_all(self.engine, tables=[_migrations_table])
        with self.engine.connect() as conn:
            applied = set(
                conn.execute(
                    select(_migrations_table.c.version).where(_migrations_table.c.component == component)
                ).scalars()
            )
        for migration in migrations:
            if migration.version in applied:
                continue
            with self.engine.begin() as conn:
                migration.apply(conn)
                conn.execute(
                    _migrations_table.insert().values(
                        component=component,
                        version=migration.version,
                        description=migration.description,
                        applied_at=datetime.now(UTC),
                    )
                )
            log.info("applied %s migration %d: %s", component, migration.version, migration.description)
        return len(migrations)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Runs blocking database work in a worker thread."""
        return await asyncio.to_thread(fn, *args)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def open_database(url: str) -> Database:
    """Opens the database at ``url``; for SQLite, creates the directory and turns on WAL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return Database(engine)
