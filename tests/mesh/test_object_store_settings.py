"""The object store's connection settings: one declaration (mesh.config.ObjectStoreConnection, extended by
ObjectStoreSettings) that the platform supervisor, the storage service and serving's S3 model repository all read,
so a value one refuses the others refuse too, with the same message."""

from __future__ import annotations

import pytest

from services.mesh.config import ObjectStoreSettings, load_settings
from services.platform.config import PlatformSettings
from services.serving.s3mirror import S3RepositoryMirror
from services.storage.config import StorageSettings

URL = "s3://127.0.0.1:50070/aidc-models/live"
KEYS = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AIDC_S3_ENDPOINT": "no-port"}, "AIDC_S3_ENDPOINT: not a host:port address"),
        ({"AWS_ACCESS_KEY_ID": "key"}, "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({"AWS_SECRET_ACCESS_KEY": "secret"}, "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({**KEYS, "AIDC_STORAGE_S3_TIMEOUT_SECONDS": "0"}, "AIDC_STORAGE_S3_TIMEOUT_SECONDS must be positive"),
        ({**KEYS, "AIDC_STORAGE_S3_SECURE": "maybe"}, "AIDC_STORAGE_S3_SECURE"),
    ],
)
def test_storage_and_the_model_repository_refuse_the_same_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StorageSettings.from_env(env)
    with pytest.raises(ValueError, match=message):
        S3RepositoryMirror.from_env(URL, env)


@pytest.mark.parametrize(
    "env",
    [
        {"AIDC_S3_ENDPOINT": "no-port"},
        {"AWS_ACCESS_KEY_ID": "key"},
        {"AWS_SECRET_ACCESS_KEY": "secret"},
    ],
)
def test_the_supervisor_refuses_a_connection_the_services_refuse_with_the_same_message(env: dict[str, str]) -> None:
    with pytest.raises(ValueError) as services:
        StorageSettings.from_env(env)
    with pytest.raises(ValueError) as supervisor:
        load_settings(PlatformSettings, env)
    assert str(supervisor.value) == str(services.value)


def test_the_supervisor_and_storage_read_the_same_connection() -> None:
    env = {**KEYS, "AIDC_S3_ENDPOINT": "10.0.0.5:9000"}
    platform = load_settings(PlatformSettings, env)
    storage = StorageSettings.from_env(env)
    for name in ("s3_endpoint", "aws_access_key_id", "aws_secret_access_key"):
        assert getattr(platform, name) == getattr(storage, name)


def test_storage_and_the_model_repository_read_the_same_values() -> None:
    env = {
        **KEYS,
        "AIDC_S3_ENDPOINT": "10.0.0.5:9000",
        "AIDC_STORAGE_S3_REGION": "eu-1",
        "AIDC_STORAGE_S3_TIMEOUT_SECONDS": "4.5",
        "AIDC_STORAGE_S3_SECURE": "true",
    }
    shared = load_settings(ObjectStoreSettings, env)
    storage = StorageSettings.from_env(env)
    for name in ("s3_endpoint", "aws_access_key_id", "aws_secret_access_key", "storage_s3_region"):
        assert getattr(storage, name) == getattr(shared, name)
    assert (shared.storage_s3_timeout_seconds, shared.storage_s3_secure) == (4.5, True)
    assert storage.storage_s3_timeout_seconds == 4.5
