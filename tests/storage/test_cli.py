"""``aidc dataset ...`` against real auth and storage processes (the CLI runs in-process, as a user would)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from services.cli.main import _AidcGroup
from services.cli.main import app as main_app
from services.cli.storage_cmd import register
from tests.storage.conftest import PASSWORD, StorageProcess, process_client


@pytest.fixture
def dataset_cli(storage_process: StorageProcess, monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    """An app carrying the dataset commands (the lead wires them into services/cli/main.py)."""
    auth = storage_process.auth
    monkeypatch.setenv("AIDC_AUTH_TENANT_ADDR", auth.env["AIDC_AUTH_TENANT_ADDR"])
    monkeypatch.setenv("AIDC_STORAGE_TENANT_ADDR", storage_process.env["AIDC_STORAGE_TENANT_ADDR"])
    monkeypatch.setenv("AIDC_DATA_DIR", str(auth.data_dir))
    monkeypatch.setenv("AIDC_CREDENTIALS_FILE", str(auth.data_dir / "cli-credentials.json"))
    monkeypatch.setenv("COLUMNS", "200")
    app = typer.Typer(cls=_AidcGroup)
    register(app)
    return app


async def _create_user(storage_process: StorageProcess) -> None:
    client, _ = await process_client(storage_process, "acme", "dev")  # creates the tenant and the user
    await client.close()


def test_dataset_commands(dataset_cli: typer.Typer, storage_process: StorageProcess, tmp_path: Path) -> None:
    asyncio.run(_create_user(storage_process))
    runner = CliRunner()
    login = runner.invoke(main_app, ["login", "-t", "acme", "-u", "dev", "--password-stdin"], input=PASSWORD)
    assert login.exit_code == 0, login.output

    def ok(*args: str) -> str:
        result = runner.invoke(dataset_cli, ["dataset", *args])
        assert result.exit_code == 0, f"{args}: {result.output}"
        return result.output

    source = tmp_path / "reviews.csv"
    source.write_bytes(b"text,label\nmail me at a@b.io,contact\nfine,other\n")
    out = ok("upload", "reviews", str(source), "--format", "csv", "--mask", "--description", "first", "-m", "src=web")
    assert "version 1" in out and "rows" in out and "email=1" in out and "src" in out
    out = ok("upload", "reviews", str(source), "--format", "csv")
    assert "version 2" in out
    assert "reviews" in ok("list") and "first" in ok("list")
    shown = ok("show", "reviews", "--version", "1")
    assert "contact (1)" in shown and "user:acme/dev" in shown
    target = tmp_path / "out.csv"
    ok("download", "reviews", "--version", "1", "-o", str(target))
    assert target.read_bytes() == b"text,label\nmail me at [EMAIL],contact\nfine,other\n"
    assert "versions 1" in ok("delete", "reviews", "--version", "1")
    missing = runner.invoke(dataset_cli, ["dataset", "show", "reviews", "--version", "1"])
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output
    bad = runner.invoke(dataset_cli, ["dataset", "upload", "../up", str(source)])
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output
    chinese = tmp_path / "kefu.csv"
    chinese.write_text(
        "text,label\n请打13800138000找我,contact\n同一个号码+86 138 0013 8000,contact\n", encoding="utf-8"
    )
    out = ok("upload", "kefu", str(chinese), "--format", "csv", "--pseudonymize", "--phone-region", "cn")
    assert "phone=2" in out and "pseudonyms (pseudonym key pk-" in out and "phone regions CN" in out
    ok("download", "kefu", "-o", str(target))
    first, second = target.read_text(encoding="utf-8").splitlines()[1:]
    token = first.removeprefix("请打").removesuffix("找我,contact")
    assert token.startswith("[PHONE:") and second == f"同一个号码{token},contact"
    assert "versions 2" in ok("delete", "reviews", "--yes")
    assert "reviews" not in ok("list")
