"""The storage suite's PostgreSQL variant: chosen tests of tests/storage run again with the auth and storage services
on PostgreSQL (a database each, on tests/postgres.py's private cluster) instead of their SQLite files: objects,
versions and listings, a dataset with its text checks, tenant isolation, key rotation and crypto-shredding, and every
bad-input case of test_bad_input.py (PostgreSQL can't store what SQLite can, e.g. NUL or an over-long name), those on
one service each to keep the variant short. (Version numbers on PostgreSQL: test_version_numbers.py.)"""

from __future__ import annotations

import pytest

from services.auth.store import MIGRATIONS as AUTH_MIGRATIONS
from services.storage.schema import MIGRATIONS as STORAGE_MIGRATIONS
from tests.conftest import RunningAuth
from tests.postgres import (  # noqa: F401 - fixtures
    assert_migrated_on_postgres,
    postgres_cluster,
    postgres_services_url,
    services_on_postgres,
)
from tests.storage.conftest import RunningStorage
from tests.storage.test_bad_input import OTHER_CALLS, UPLOADS, refuse_request, refuse_upload
from tests.storage.test_roundtrip import (  # noqa: F401 - run here on PostgreSQL
    test_round_trip,
    test_versions_listing_pagination_and_delete,
)
from tests.storage.test_security import (  # noqa: F401 - run here on PostgreSQL
    test_after_crypto_shredding_nothing_reads,
    test_after_key_rotation_every_object_still_reads,
    test_another_tenant_cannot_see_objects_or_whether_they_exist,
)
from tests.storage.test_text_datasets import test_csv_dataset_is_validated_and_described  # noqa: F401

pytestmark = pytest.mark.slow


async def test_every_bad_upload_is_refused_and_writes_nothing(storage: RunningStorage) -> None:
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "ok")
    for case, messages, error, message in UPLOADS:
        try:
            await refuse_upload(storage, client, messages, error, message)
        except BaseException as failure:  # pytest.raises' "DID NOT RAISE" is no AssertionError
            failure.add_note(f"case: {case}")
            raise


async def test_every_bad_request_gets_its_status_and_changes_nothing(storage: RunningStorage) -> None:
    client = storage.client("acme/tadmin")
    await client.create_dataset("acme", "ok")
    await client.upload("acme", "ok", b"0123456789")
    for case, call, error, message in OTHER_CALLS:
        try:
            await refuse_request(storage, client, call, error, message)
        except BaseException as failure:  # pytest.raises' "DID NOT RAISE" is no AssertionError
            failure.add_note(f"case: {case}")
            raise


async def test_auth_and_storage_run_on_postgresql_with_their_migrations_recorded(
    auth: RunningAuth,
    storage: RunningStorage,
    postgres_services_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    assert auth.settings.database_url == storage.settings.database_url == postgres_services_url
    assert_migrated_on_postgres(postgres_services_url, {"auth": AUTH_MIGRATIONS, "storage": STORAGE_MIGRATIONS})
