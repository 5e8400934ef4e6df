"""The credentials file without a server: storage, when a refresh happens, and what fails how.

The refresh RPC is replaced by a recording function here, so each case controls the returned token pair; the
real RefreshToken round trip is covered in test_cli.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.auth.client import BootstrapAdmin, take_bootstrap_admin
from services.auth.config import AuthSettings
from services.cli.credentials import (
    REFRESH_MARGIN_SECONDS,
    Credentials,
    CredentialsStore,
    credentials_path,
)
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.mesh.errors import Unauthenticated

NOW = 1_800_000_000.0
ADDR = "127.0.0.1:50051"


def _pair(access: str, refresh: str, access_expires: float, refresh_expires: float | None = None) -> pb.TokenPair:
    pair = pb.TokenPair(access_token=access, refresh_token=refresh)
    pair.access_token_expire_time.CopyFrom(Timestamp(seconds=int(access_expires)))
    if refresh_expires is not None:
        pair.refresh_token_expire_time.CopyFrom(Timestamp(seconds=int(refresh_expires)))
    return pair


class _Refresher:
    def __init__(self, reply: pb.TokenPair | Exception) -> None:
        self.reply = reply
        self.calls: list[str] = []

    async def __call__(self, refresh_token: str) -> pb.TokenPair:
        self.calls.append(refresh_token)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


@pytest.fixture
def store(tmp_path: Path) -> CredentialsStore:
    return CredentialsStore(tmp_path / "cli" / "credentials.json", clock=lambda: NOW)


def _login(store: CredentialsStore, access_expires: float, refresh: str = "r1") -> Credentials:
    credentials = Credentials.from_token_pair(
        ADDR, _pair("a1", refresh, access_expires, NOW + 86400), "user:acme/alice", "acme"
    )
    store.save(credentials)
    return credentials


def test_path_defaults_under_the_data_dir_and_env_overrides(tmp_path: Path) -> None:
    assert credentials_path(tmp_path, {}) == tmp_path / "cli" / "credentials.json"
    assert credentials_path(tmp_path, {"AIDC_CREDENTIALS_FILE": "/x/c.json"}) == Path("/x/c.json")


def test_save_is_private_and_round_trips(store: CredentialsStore) -> None:
    saved = _login(store, NOW + 900)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert store.load() == saved
    assert saved.access_expires_at == NOW + 900 and saved.refresh_expires_at == NOW + 86400
    assert store.delete() and store.load() is None and not store.delete()


async def test_a_fresh_token_is_used_without_refreshing(store: CredentialsStore) -> None:
    _login(store, NOW + REFRESH_MARGIN_SECONDS + 60)
    refresher = _Refresher(AssertionError("must not refresh"))
    assert await store.access_token(ADDR, refresher) == "a1"
    assert refresher.calls == []


@pytest.mark.parametrize("expires_in", [-100.0, 0.0, REFRESH_MARGIN_SECONDS - 1])
async def test_an_expired_or_expiring_token_is_refreshed_and_written_back(
    store: CredentialsStore, expires_in: float
) -> None:
    _login(store, NOW + expires_in)
    refresher = _Refresher(_pair("a2", "r2", NOW + 900, NOW + 86400))
    assert await store.access_token(ADDR, refresher) == "a2"
    assert refresher.calls == ["r1"]
    stored = store.load()
    assert stored is not None
    assert (stored.access_token, stored.refresh_token, stored.access_expires_at) == ("a2", "r2", NOW + 900)
    assert (stored.subject, stored.tenant) == ("user:acme/alice", "acme")  # kept across refreshes


async def test_an_expired_api_key_login_asks_to_log_in_again(store: CredentialsStore) -> None:
    store.save(Credentials.from_token_pair(ADDR, _pair("a1", "", NOW - 1)))
    with pytest.raises(Unauthenticated, match="aidc login"):
        await store.access_token(ADDR, _Refresher(AssertionError("no refresh token to use")))


async def test_a_refused_refresh_asks_to_log_in_again(store: CredentialsStore) -> None:
    _login(store, NOW - 1)
    with pytest.raises(Unauthenticated, match="refresh token reused.*aidc login"):
        await store.access_token(ADDR, _Refresher(Unauthenticated("refresh token reused")))


async def test_missing_mismatched_and_corrupt_credentials(store: CredentialsStore) -> None:
    refresher = _Refresher(AssertionError("unused"))
    with pytest.raises(Unauthenticated, match="not logged in"):
        await store.access_token(ADDR, refresher)
    _login(store, NOW + 900)
    with pytest.raises(Unauthenticated, match="logged in to 127.0.0.1:50051, not 10.0.0.1:1"):
        await store.access_token("10.0.0.1:1", refresher)
    store.path.write_text("{not json")
    with pytest.raises(Unauthenticated, match="unreadable"):
        await store.access_token(ADDR, refresher)


def test_bootstrap_admin_is_taken_once_from_where_auth_writes_it(tmp_path: Path) -> None:
    path = AuthSettings(data_dir=tmp_path).bootstrap_file
    path.parent.mkdir()
    path.write_text(json.dumps({"tenant": "platform", "user": "admin", "password": "s3cret"}))
    assert take_bootstrap_admin(tmp_path) == BootstrapAdmin("platform", "admin", "s3cret", path)
    assert not path.exists()
    assert take_bootstrap_admin(tmp_path) is None
