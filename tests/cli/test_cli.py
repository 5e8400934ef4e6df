"""``aidc`` auth commands end to end: typer's CliRunner against a real auth service process."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import Result

from services.cli.main import documented_settings
from services.cli.serving_cmd import parse_model_ref
from tests.cli.conftest import AuthServer, Cli, cli_for
from tests.conftest import free_port

PASSWORD = "correct horse battery staple"


def _assert_error(result: Result, code: str, fragment: str = "") -> None:
    """A domain error: exit 1, one ``error: CODE: message`` line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {code}: "), result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def _credentials(cli: Cli) -> dict[str, object]:
    return json.loads(cli.credentials_file.read_text())


def test_login_stores_private_credentials_then_whoami(cli: Cli) -> None:
    result = cli.ok("login", "--tenant", "platform", "--user", "admin", input=f"{cli.server.admin_password}\n")
    assert "logged in to" in result.stdout and "user:platform/admin" in result.stdout
    assert stat.S_IMODE(cli.credentials_file.stat().st_mode) == 0o600
    stored = _credentials(cli)
    assert stored["auth_addr"] == cli.server.tenant_address  # the tenant path: no client certificate needed
    assert stored["access_token"] and stored["refresh_token"]

    whoami = cli.ok("whoami")
    assert "user:platform/admin" in whoami.stdout
    assert "platform-admin" in whoami.stdout

    assert "logged out" in cli.ok("logout").stdout
    assert not cli.credentials_file.exists()
    _assert_error(cli("whoami"), "UNAUTHENTICATED", "aidc login")


def test_wrong_password_is_unauthenticated_and_stores_nothing(cli: Cli) -> None:
    result = cli("login", "--tenant", "platform", "--user", "admin", "--password-stdin", input="not the password")
    _assert_error(result, "UNAUTHENTICATED")
    assert not cli.credentials_file.exists()


def test_tenant_and_user_create_then_the_user_logs_in(cli: Cli) -> None:
    cli.login_admin()
    assert "created tenant acme" in cli.ok("tenant", "create", "acme", "--display-name", "Acme Corp").stdout
    listed = cli.ok("tenant", "list").stdout
    assert "acme" in listed and "Acme Corp" in listed

    # The password is prompted twice (hidden); both entries come from stdin here.
    created = cli.ok("user", "create", "alice", "--tenant", "acme", "--role", "developer", input=f"{PASSWORD}\n" * 2)
    assert "user:acme/alice" in created.stdout
    assert "user:acme/alice" in cli.ok("user", "list", "--tenant", "acme").stdout

    cli.ok("login", "--tenant", "acme", "--user", "alice", "--password-stdin", input=PASSWORD)
    whoami = cli.ok("whoami").stdout
    assert "user:acme/alice" in whoami and "developer" in whoami and "acme" in whoami


def test_api_key_login_then_revoked_key_is_refused(cli: Cli) -> None:
    cli.login_admin()
    cli.ok("tenant", "create", "acme")
    assert "sa:acme/ci" in cli.ok("sa", "create", "ci", "--tenant", "acme", "--role", "viewer").stdout

    created = cli.ok("apikey", "create", "--tenant", "acme", "--subject", "sa:acme/ci", "--description", "ci runs")
    secret = created.stdout.strip()
    assert secret.startswith("aidc_") and "\n" not in secret  # stdout holds the secret alone
    assert "only time the secret is shown" in created.stderr
    key_id = created.stderr.split("created API key ", 1)[1].split()[0]
    assert key_id in secret

    listed = cli.ok("apikey", "list", "--tenant", "acme").stdout
    assert key_id in listed and "ci runs" in listed and "active" in listed
    assert secret not in listed

    cli.ok("login", "--api-key-stdin", input=f"{secret}\n")
    assert "sa:acme/ci" in cli.ok("whoami").stdout

    cli.login_admin()
    assert f"revoked API key {key_id}" in cli.ok("apikey", "revoke", key_id, "--tenant", "acme").stdout
    assert "revoked" in cli.ok("apikey", "list", "--tenant", "acme").stdout
    _assert_error(cli("login", "--api-key-stdin", input=secret), "UNAUTHENTICATED")


def test_role_grant_list_revoke(cli: Cli) -> None:
    cli.login_admin()
    cli.ok("tenant", "create", "acme")
    cli.ok("user", "create", "bob", "--tenant", "acme", "--password-stdin", input=PASSWORD)

    assert "granted viewer" in cli.ok("role", "grant", "user:acme/bob", "viewer", "--tenant", "acme").stdout
    listed = cli.ok("role", "list", "--tenant", "acme", "--subject", "user:acme/bob").stdout
    assert "user:acme/bob" in listed and "viewer" in listed

    cli.ok("role", "revoke", "user:acme/bob", "viewer", "--tenant", "acme")
    assert "viewer" not in cli.ok("role", "list", "--tenant", "acme", "--subject", "user:acme/bob").stdout

    audit = cli.ok("audit", "--tenant", "acme", "--limit", "50").stdout
    assert "role.assign" in audit and "role.revoke" in audit and "user:acme/bob" in audit


def test_bad_input_is_reported_with_its_code(cli: Cli) -> None:
    cli.login_admin()
    cli.ok("tenant", "create", "acme")
    cases: list[tuple[list[str], str | None, str]] = [
        (["tenant", "create", ""], None, "INVALID_ARGUMENT"),
        (["tenant", "create", "x" * 41], None, "INVALID_ARGUMENT"),
        (["tenant", "create", "acme"], None, "ALREADY_EXISTS"),
        (["user", "create", "eve", "--tenant", "nosuch", "--password-stdin"], PASSWORD, "NOT_FOUND"),
        (["user", "create", "eve", "--tenant", "acme", "--password-stdin"], "short", "INVALID_ARGUMENT"),
        (["role", "grant", "user:acme/eve", "no-such-role", "--tenant", "acme"], None, "INVALID_ARGUMENT"),
    ]
    for args, stdin, code in cases:
        _assert_error(cli(*args, input=stdin), code)
    assert "nosuch" not in cli.ok("tenant", "list").stdout
    assert "eve" not in cli.ok("user", "list", "--tenant", "acme").stdout


def test_unreachable_auth_service_is_unavailable(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIDC_AUTH_TENANT_ADDR", f"127.0.0.1:{free_port()}")
    result = cli("login", "--tenant", "platform", "--user", "admin", "--password-stdin", input="x" * 12)
    _assert_error(result, "UNAVAILABLE", "aidc up")


def test_expired_access_token_is_refreshed_transparently(
    start_auth_server: Callable[..., AuthServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_auth_server(AIDC_AUTH_ACCESS_TOKEN_TTL_SECONDS="1")
    cli = cli_for(server, tmp_path, monkeypatch)
    cli.login_admin()
    at_login = _credentials(cli)
    # Past the expiry plus the verifiers' clock-skew leeway (5 s): the stored access token is now refused.
    time.sleep(max(0.0, float(at_login["access_expires_at"]) + 6.5 - time.time()))  # type: ignore[arg-type]

    stale = dict(at_login, access_expires_at=time.time() + 3600)  # lie about expiry: no refresh attempted
    cli.credentials_file.write_text(json.dumps(stale))
    _assert_error(cli("whoami"), "UNAUTHENTICATED")

    cli.credentials_file.write_text(json.dumps(at_login))
    assert "user:platform/admin" in cli.ok("whoami").stdout
    refreshed = _credentials(cli)
    assert refreshed["refresh_token"] != at_login["refresh_token"]  # rotated pair written back
    assert refreshed["access_token"] != at_login["access_token"]
    assert refreshed["subject"] == "user:platform/admin"
    assert stat.S_IMODE(cli.credentials_file.stat().st_mode) == 0o600


def test_admin_init_shows_the_bootstrap_password_once(cli: Cli) -> None:
    first = cli.ok("admin", "init")
    assert cli.server.bootstrap_password in first.stdout
    assert "shown only this once" in first.stderr
    assert not (cli.server.data_dir / "auth" / "bootstrap-admin.json").exists()
    _assert_error(cli("admin", "init"), "FAILED_PRECONDITION", "already shown")
    cli.login_admin()  # the password set at the first login keeps working


def test_config_markdown_lists_every_variable_once(cli: Cli) -> None:
    markdown = cli.ok("config", "--markdown").stdout
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    names = [row.split("`")[1] for row in rows]
    assert len(names) == len(set(names))
    for expected in (
        "AIDC_AUTH_ADDR",
        "AIDC_DATA_DIR",
        "AIDC_AUTH_ACCESS_TOKEN_TTL_SECONDS",
        "AIDC_CREDENTIALS_FILE",
    ):
        assert expected in names
    assert "| `AIDC_AUTH_ADDR` | `127.0.0.1:50051` |" in markdown
    telemetry = {s.env for s in documented_settings(["services.mesh.telemetry"])}
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in telemetry:
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in names
    assert "AIDC_AUTH_ADDR" in cli.ok("config").stdout


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [("bert", ("bert", 0, "")), ("bert:3", ("bert", 3, "")), ("bert@production", ("bert", 0, "production"))],
)
def test_model_references(ref: str, parsed: tuple[str, int, str]) -> None:
    assert parse_model_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["bert:x", "bert@Prod", "bert:3@production", ":3", ""])
def test_bad_model_references(ref: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_model_ref(ref)


def test_the_first_login_of_the_first_start_admin_sets_a_new_password(
    start_auth_server: Callable[..., AuthServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_auth_server(first_login=False)
    cli = cli_for(server, tmp_path, monkeypatch)
    admin = ["login", "--tenant", "platform", "--user", "admin"]
    # A script without the new password is told what to do, and nothing is stored.
    _assert_error(
        cli(*admin, "--password-stdin", input=server.bootstrap_password), "FAILED_PRECONDITION", "second line"
    )
    assert not cli.credentials_file.exists()
    # Interactively, aidc login asks for the new password (twice) once the server says the password has expired.
    result = cli.ok(*admin, input=f"{server.bootstrap_password}\n{PASSWORD}\n{PASSWORD}\n")
    assert "user:platform/admin" in result.stdout and "password changed" in result.stderr
    assert "expired" in result.stderr
    _assert_error(cli(*admin, "--password-stdin", input=server.bootstrap_password), "UNAUTHENTICATED")
    cli.ok(*admin, "--password-stdin", input=PASSWORD)
    # A script may change it at login too: the new password on the second line.
    cli.ok(*admin, "--password-stdin", "--new-password", input=f"{PASSWORD}\nanother passphrase\n")
    cli.ok(*admin, "--password-stdin", input="another passphrase")


def test_password_change_disable_enable_and_logout(cli: Cli) -> None:
    cli.login_admin()
    cli.ok("tenant", "create", "acme")
    cli.ok("user", "create", "alice", "--tenant", "acme", "--role", "developer", "--password-stdin", input=PASSWORD)
    alice = ["login", "--tenant", "acme", "--user", "alice", "--password-stdin"]
    cli.ok(*alice, input=PASSWORD)
    assert (
        "password changed" in cli.ok("password", "--password-stdin", input=f"{PASSWORD}\nalice's new passphrase").stdout
    )
    assert "user:acme/alice" in cli.ok("whoami").stdout  # the login that changed it goes on
    _assert_error(cli(*alice, input=PASSWORD), "UNAUTHENTICATED")

    # Logout ends the login on the server: its stored tokens are refused even if kept.
    cli.ok(*alice, input="alice's new passphrase")
    kept = cli.credentials_file.read_text()
    assert "the login was ended" in cli.ok("logout").stdout
    cli.credentials_file.write_text(kept)
    _assert_error(cli("whoami"), "UNAUTHENTICATED", "revoked")

    cli.login_admin()
    assert "disabled user:acme/alice" in cli.ok("user", "disable", "user:acme/alice", "--tenant", "acme").stdout
    row = [line for line in cli.ok("user", "list", "--tenant", "acme").stdout.splitlines() if "user:acme/alice" in line]
    assert "disabled" in row[0]
    _assert_error(cli(*alice, input="alice's new passphrase"), "UNAUTHENTICATED", "disabled")
    cli.login_admin()
    _assert_error(cli("user", "disable", "user:acme/nobody", "--tenant", "acme"), "NOT_FOUND")
    assert "enabled user:acme/alice" in cli.ok("user", "enable", "user:acme/alice", "--tenant", "acme").stdout
    cli.ok(*alice, input="alice's new passphrase")
