"""The master keys auth, storage and the scheduler protect their secrets with: configured, or a 0600 file made once;
and what they protect, read from the services' own database files: passwords and API keys only as Argon2id hashes,
signing and tenant keys and jobs' secret_env only sealed, no secret anywhere in the files, and a service given the
wrong master key refuses to start rather than answer with keys (or hold jobs) it cannot open."""

from __future__ import annotations

import base64
import secrets
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from services.auth.config import AuthSettings
from services.auth.core.tokens import KeyWrapper
from services.auth.store import AuthStore, api_keys, principals
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.mesh.config import check_master_key, master_key
from services.mesh.db import open_database
from services.mesh.sealing import WrongMasterKey, unseal
from services.scheduler.client import resources
from services.scheduler.config import SchedulerSettings
from services.storage.config import StorageSettings
from services.storage.core.crypto import LocalKeyring
from services.storage.schema import keyring_keys
from tests.at_rest import stored_bytes, stored_in_clear
from tests.conftest import ADMIN_PASSWORD, start_auth
from tests.scheduler.service_support import GIB, runner_command, scheduler_env, set_quota, start_scheduler
from tests.scheduler.service_support import user_tokens as scheduler_users
from tests.storage.conftest import seaweed, start_storage, storage_env, user_tokens  # noqa: F401 - fixture
from tests.storage.seaweed import SeaweedFS


def test_key_file_is_created_private_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "svc" / "master.key"
    first = master_key("", path)
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert master_key("", path) == first
    configured = base64.b64encode(b"k" * 32).decode()
    assert master_key(configured, path) == b"k" * 32
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        master_key("", path)


@pytest.mark.parametrize(("value", "message"), [("not base64!", "not valid base64"), ("YWJj", "32 bytes")])
def test_bad_configured_keys_fail_fast(value: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        check_master_key(value, "AIDC_X_MASTER_KEY")
    for cls, name in ((AuthSettings, "AIDC_AUTH_MASTER_KEY"), (StorageSettings, "AIDC_STORAGE_MASTER_KEY")):
        with pytest.raises(ValueError, match=name):
            cls.from_env({"AIDC_DATA_DIR": str(tmp_path), name: value})


PASSWORD = "correct horse battery staple"


def _other_master_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


async def test_auth_keeps_only_argon2id_hashes_and_sealed_signing_keys(settings: AuthSettings) -> None:
    auth = await start_auth(settings)
    try:
        admin = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
        await admin.create_tenant("acme")
        await admin.create_user("acme", "alice", PASSWORD, ["developer"])
        alice = auth.client((await auth.client().login("acme", "alice", PASSWORD)).access_token)
        key = await alice.create_api_key("acme", description="ci")
    finally:
        await auth.server.stop(0)

    db = open_database(settings.database_url_for("auth"))
    try:
        with db.engine.connect() as conn:
            password_hashes = [h for (h,) in conn.execute(select(principals.c.password_hash)) if h]
            key_hashes = [h for (h,) in conn.execute(select(api_keys.c.secret_hash))]
        signing = AuthStore(db).signing_keys()
    finally:
        db.dispose()
    assert len(password_hashes) == 2 and len(key_hashes) == 1  # the admin and alice; alice's key
    assert all(h.startswith("$argon2id$") for h in password_hashes + key_hashes), password_hashes + key_hashes
    raw_keys = [KeyWrapper(settings.master_key()).unwrap(row.kid, row.private_key) for row in signing]
    private = [k.private_bytes_raw() for k in raw_keys]
    held = [PASSWORD.encode(), ADMIN_PASSWORD.encode(), key.secret.encode(), *private]
    assert not stored_in_clear(settings.auth_dir, held), "a secret is stored in the clear"

    # Another master key opens none of the sealed signing keys: auth refuses to start rather than sign with new ones.
    wrong = replace(settings, auth_master_key=_other_master_key())
    with pytest.raises(WrongMasterKey, match="signing key .* does not open with this master key"):
        await start_auth(wrong)


async def test_storage_keeps_tenant_keys_only_sealed_and_refuses_a_wrong_master_key(
    settings: AuthSettings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s3: SeaweedFS = request.getfixturevalue("seaweed")  # the session's (tests/storage/conftest.py)
    auth = await start_auth(settings)
    env = storage_env(tmp_path / "storage", auth.address, s3)
    storage_settings = StorageSettings.from_env(env)
    try:
        storage = await start_storage(storage_settings, await user_tokens(auth))
        try:
            await storage.client("acme/dev").upload(
                "acme", "weights.bin", b"secret weights", kind=storage_pb.OBJECT_KIND_ARTIFACT
            )
        finally:
            await storage.close()
            await storage.server.stop(0)

        db = open_database(storage_settings.database_url_for("storage"))
        try:
            with db.engine.connect() as conn:
                sealed = list(conn.execute(select(keyring_keys)))
        finally:
            db.dispose()
        assert [row.tenant for row in sealed] == ["acme"]
        master = storage_settings.master_key()
        material = [unseal(master, bytes(row.sealed), LocalKeyring._aad(row.tenant, row.key_id)) for row in sealed]
        assert all(len(key) == 32 for key in material)
        assert not stored_in_clear(storage_settings.storage_dir, material)

        wrong = StorageSettings.from_env({**env, "AIDC_STORAGE_MASTER_KEY": _other_master_key()})
        with pytest.raises(WrongMasterKey, match="tenant key tk-.* does not open with this master key"):
            await start_storage(wrong, {})
    finally:
        await auth.server.stop(0)


async def test_scheduler_keeps_secret_env_only_sealed_and_refuses_a_wrong_master_key(
    settings: AuthSettings, mesh_certs: Path, tmp_path: Path
) -> None:
    """A job waiting (over its tenant's quota) with a secret: the scheduler's files hold it only sealed, and a
    scheduler given another master key refuses to start, naming it (it used to start, and fail each such job at its
    launch as "lost: internal error of the scheduler", saying nothing of the key)."""
    secret = "s3cret-" + secrets.token_hex(16)
    auth = await start_auth(replace(settings, certs_dir=str(mesh_certs)))
    env = scheduler_env(tmp_path / "scheduler", auth.address, AIDC_CERTS_DIR=str(mesh_certs))
    scheduler_settings = SchedulerSettings.from_env(env)
    try:
        scheduler = await start_scheduler(scheduler_settings, await scheduler_users(auth))
        try:
            await set_quota(scheduler.client("platform/admin"), "acme", 500)  # below the job's one core: it waits
            submitted = await scheduler.submitter("acme/dev").submit_job(
                runner_command(1), resources=resources(1000, GIB), secret_env={"API_TOKEN": secret}
            )
        finally:
            await scheduler.stop()
        assert submitted.job.job_id.encode() in stored_bytes(scheduler_settings.scheduler_dir)  # the job is there ...
        assert not stored_in_clear(scheduler_settings.scheduler_dir, [secret.encode()])  # ... its secret only sealed

        wrong = SchedulerSettings.from_env({**env, "AIDC_SCHEDULER_MASTER_KEY": _other_master_key()})
        with pytest.raises(WrongMasterKey, match=f"job {submitted.job.job_id} does not open with this master key"):
            await start_scheduler(wrong, {})
    finally:
        await auth.server.stop(0)
