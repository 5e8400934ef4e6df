"""The master keys auth and storage protect their key material with: configured, or a 0600 file made once."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from services.auth.config import AuthSettings
from services.mesh.config import check_master_key, master_key
from services.storage.config import StorageSettings


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
