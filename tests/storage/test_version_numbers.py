"""A version number names one content forever: numbers of deleted versions are never given again (serving fetches
exports by (name, version), lineage records dataset versions), on SQLite and on PostgreSQL, and databases written
before the per-object counters existed keep working after their migration."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh import errors
from services.storage.config import StorageSettings
from services.storage.schema import object_counters
from tests.conftest import RunningAuth
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.storage.conftest import RunningStorage, start_storage, storage_database, storage_env
from tests.storage.seaweed import SeaweedFS

ARTIFACT = pb.OBJECT_KIND_ARTIFACT


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Empty (the default SQLite file) or the URL of a fresh PostgreSQL database."""
    yield "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def _settings(tmp_path: Path, auth: RunningAuth, seaweed: SeaweedFS, database_url: str, bucket: str) -> StorageSettings:
    env = storage_env(tmp_path / "data", auth.address, seaweed, AIDC_STORAGE_BUCKET=bucket)
    if database_url:
        env["AIDC_DATABASE_URL"] = database_url
    return StorageSettings.from_env(env)


async def test_a_deleted_versions_number_is_never_given_again(storage: RunningStorage) -> None:
    """The swap behind issue 11 item 1: delete an export's latest version, upload other bytes, and they must not
    appear under the deleted version's number (whoever pinned that number gets NOT_FOUND, never other bytes)."""
    client = storage.client("acme/dev")
    name = "training/job-1/model.pt"
    assert (await client.upload("acme", name, b"trained weights", kind=ARTIFACT)).version == 1
    assert await client.delete("acme", name, kind=ARTIFACT, version=1) == [1]
    swapped = await client.upload("acme", name, b"swapped in by hand", kind=ARTIFACT)
    assert swapped.version == 2
    with pytest.raises(errors.NotFound):
        await client.download_bytes("acme", name, kind=ARTIFACT, version=1)

    # Deleting every version, and a dataset itself, retires its numbers too.
    await client.create_dataset("acme", "tweets")
    for n in (1, 2):
        assert (await client.upload("acme", "tweets", f"v{n}".encode())).version == n
    assert await client.delete("acme", "tweets", all_versions=True) == [1, 2]
    await client.create_dataset("acme", "tweets")
    assert (await client.upload("acme", "tweets", b"another corpus")).version == 3
    [dataset] = await client.list_datasets("acme")
    assert dataset.latest_version == 3
    # Counters are per tenant and object: another tenant's object of the same name starts at 1.
    globex = storage.client("globex/dev")
    assert (await globex.upload("globex", name, b"theirs", kind=ARTIFACT)).version == 1


async def test_databases_from_before_the_counters_keep_their_numbers(
    auth: RunningAuth, tokens: dict[str, str], seaweed: SeaweedFS, tmp_path: Path, database_url: str
) -> None:
    """A database whose schema predates migration 4 (no counters) is migrated at start: each object continues
    above its highest version, and from then on deleted numbers stay retired; on SQLite and PostgreSQL."""
    settings = _settings(tmp_path, auth, seaweed, database_url, f"test-{secrets.token_hex(6)}")
    running = await start_storage(settings, tokens)
    try:
        client = running.client("acme/dev")
        for n in (1, 2, 3):
            await client.upload("acme", "exports/model.pt", f"v{n}".encode(), kind=ARTIFACT)
        await client.delete("acme", "exports/model.pt", kind=ARTIFACT, version=2)
    finally:
        await running.close()
        await running.server.stop(0)

    # Back to the schema of the code before the counters: table and migration record gone.
    with storage_database(settings) as engine, engine.begin() as conn:
        object_counters.drop(conn)
        conn.execute(text("DELETE FROM schema_migrations WHERE component = 'storage' AND version = 4"))

    running = await start_storage(settings, tokens)
    try:
        client = running.client("acme/dev")
        assert (await client.upload("acme", "exports/model.pt", b"v4", kind=ARTIFACT)).version == 4
        assert await client.delete("acme", "exports/model.pt", kind=ARTIFACT, version=4) == [4]
        assert (await client.upload("acme", "exports/model.pt", b"v5", kind=ARTIFACT)).version == 5
        listed = await client.list_all("acme", name_prefix="exports/", all_versions=True)
        assert [o.version for o in listed] == [1, 3, 5]
        assert await client.download_bytes("acme", "exports/model.pt", kind=ARTIFACT, version=3) == b"v3"
    finally:
        await running.close()
        await running.server.stop(0)

    with storage_database(settings) as engine, engine.connect() as conn:
        assert engine.dialect.name == ("postgresql" if database_url else "sqlite")
        migrations = conn.execute(
            text("SELECT version FROM schema_migrations WHERE component = 'storage' ORDER BY version")
        ).scalars()
        assert list(migrations) == [1, 2, 3, 4]
        counters = conn.execute(select(object_counters.c.name, object_counters.c.last_version)).all()
        assert [tuple(row) for row in counters] == [("exports/model.pt", 5)]
