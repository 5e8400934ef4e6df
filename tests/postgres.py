"""A private, throwaway PostgreSQL cluster for tests, and the ``postgres_url`` fixture built on it.

Tests that need PostgreSQL import the fixtures (``from tests.postgres import postgres_cluster, postgres_url``).
One cluster starts per test session (initdb into a temp dir, loopback port, unix socket in that dir, fsync off)
and each test gets a fresh database in it. The machine's own PostgreSQL cluster, if any, is never touched.
Without the PostgreSQL server binaries the tests skip, except when ``CI=true``: there they fail.

By hand: ``python -m tests.postgres`` starts a cluster, prints its SQLAlchemy URL, and removes it on Ctrl-C or
SIGTERM. A cluster whose owner was killed outright is removed by the next run.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from services.mesh.db import Migration
from tests.conftest import free_port

__all__ = [
    "PostgresCluster",
    "find_bin_dir",
    "postgres_cluster",
    "postgres_url",
    "postgres_services_url",
    "services_on_postgres",
    "assert_migrated_on_postgres",
]

_OS_USER = "postgres"  # root may not run the server; Debian's package creates this user
_PREFIX = "aidc-pg-"


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin dir (Debian: /usr/lib/postgresql/<major>/bin), or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        return Path(max(found, key=lambda p: int(Path(p).parent.parent.name))).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("pg_ctl") else None


class PostgresCluster:
    """initdb + pg_ctl in a temp dir; speaks TCP on 127.0.0.1 with a password, for one test session."""

    def __init__(self, bin_dir: Path, directory: Path | None = None) -> None:
        self._bin = bin_dir
        self._as_root = os.geteuid() == 0
        self.dir = directory or Path(tempfile.mkdtemp(prefix=_PREFIX))
        self.data = self.dir / "data"
        self.user = "aidc"
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        if self._as_root:
            shutil.chown(self.dir, _OS_USER, _OS_USER)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", _OS_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stdout}{result.stderr}")

    @classmethod
    def reap_orphans(cls, bin_dir: Path) -> None:
        """Stops and removes clusters whose owning process died without cleaning up (e.g. a killed pytest)."""
        for owner_file in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*/owner.pid"):
            try:
                os.kill(int(owner_file.read_text()), 0)
                continue  # its owner still runs
            except ProcessLookupError:
                pass
            except (ValueError, OSError):
                continue
            try:
                cls(bin_dir, owner_file.parent).stop()
            except RuntimeError:
                pass  # its server is gone too (a stale postmaster.pid): stop() removed the files all the same

    def start(self) -> None:
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(pwfile, _OS_USER, _OS_USER)
        self._run(
            "initdb",
            f"--pgdata={self.data}",
            f"--username={self.user}",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        # A port picked free may be taken before the server binds it; try a few.
        for attempt in range(3):
            self.port = free_port()
            # Durability off (throwaway data); a non-UTC zone so code that assumes the database hands back
            # UTC wall-clock times fails here rather than on some operator's cluster.
            options = (
                f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c TimeZone=Asia/Kolkata"
            )
            try:
                self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options)
                return
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError(f"PostgreSQL did not start; its log:\n{self.log_text()}") from None
                time.sleep(0.2)

    @property
    def log(self) -> Path:
        return self.dir / "postgres.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of ``database`` in this cluster."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        """Creates an empty database and returns its URL."""
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stops the server (if it runs) and removes every file of the cluster."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _unavailable(reason: str) -> NoReturn:
    """Skips, or fails under CI (where the PostgreSQL tests must really run)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run; `make postgres-server` installs it)")
    pytest.skip(f"{reason}; install it with `make postgres-server`")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install -e '.[dev]')")
    PostgresCluster.reap_orphans(bin_dir)
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh, empty database on the session's private PostgreSQL cluster."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_cluster.create_database(name)
    yield url
    postgres_cluster.drop_database(name)


@pytest.fixture
def postgres_services_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """An AIDC_DATABASE_URL giving every mesh service a fresh database of its own on the session's cluster (the URL
    names them with '{service}', as a cluster's configuration does)."""
    from services.mesh.config import SERVICE_NAMES

    prefix = f"test_{uuid.uuid4().hex[:12]}"
    for service in SERVICE_NAMES:
        postgres_cluster.create_database(f"{prefix}_{service}")
    yield postgres_cluster.url(f"{prefix}_{{service}}")
    for service in SERVICE_NAMES:
        postgres_cluster.drop_database(f"{prefix}_{service}")


@pytest.fixture(name="service_database")
def services_on_postgres(postgres_services_url: str) -> str:
    """tests/conftest.py's ``service_database`` overridden: every service a suite's fixtures start runs on
    PostgreSQL, a database each. A suite's PostgreSQL variant (tests/<svc>/test_postgres.py) imports this."""
    return postgres_services_url


def assert_migrated_on_postgres(url_template: str, migrations: Mapping[str, Sequence[Migration]]) -> None:
    """Each service's database (``url_template`` with '{service}' replaced by its name) is PostgreSQL and has every
    one of the service's migrations recorded."""
    from sqlalchemy import create_engine, text

    assert url_template.startswith("postgresql+psycopg://"), url_template
    for service, expected in migrations.items():
        engine = create_engine(url_template.replace("{service}", service))
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT version, description FROM schema_migrations WHERE component = :c ORDER BY version"),
                    {"c": service},
                ).all()
        finally:
            engine.dispose()
        assert [tuple(row) for row in rows] == [(m.version, m.description) for m in expected], service


def main() -> None:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL server binaries not found; run `make postgres-server`")
    PostgresCluster.reap_orphans(bin_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up on a plain kill, too
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        print(cluster.create_database("aidc"), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
