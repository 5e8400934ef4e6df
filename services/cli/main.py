"""``aidc``: the command line of the platform (login, tenants, users, API keys, roles, audit, config, ...)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from services.auth.client import AuthClient, bootstrap_admin_file, take_bootstrap_admin
from services.cli import (
    billing_cmd,
    certs_cmd,
    platform_cmd,
    scheduler_cmd,
    serving_cmd,
    storage_cmd,
    trace_cmd,
    training_cmd,
)
from services.cli.credentials import Credentials, CredentialsStore, credentials_path
from services.cli.session import CliSession, cli_settings, open_session
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.gen.aidc.common.v1 import common_pb2
from services.mesh.config import SERVICE_NAMES, Setting, describe_settings
from services.mesh.errors import AidcError, FailedPrecondition, InvalidArgument, Unauthenticated, Unavailable

__all__ = ["app", "documented_settings", "settings_markdown"]

_T = TypeVar("_T")


class _AidcGroup(TyperGroup):
    """The root command group: the one place where domain errors become ``error: CODE: message``, exit 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except AidcError as exc:
            hint = " (is the platform running? `aidc up` starts it)" if isinstance(exc, Unavailable) else ""
            typer.echo(f"error: {exc.code.name}: {exc.message}{hint}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="aidc",
    cls=_AidcGroup,
    help=(
        "aidc: an AI model platform. A mesh of gRPC services (auth, storage, training, scheduler, billing, "
        "serving) in front of NVIDIA Triton, with tenants, role-based access, usage billing and tracing."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tenant_app = typer.Typer(help="Create and list tenants.", no_args_is_help=True)
user_app = typer.Typer(help="Create, list, disable and enable users of a tenant.", no_args_is_help=True)
sa_app = typer.Typer(
    help="Create service accounts (machine identities that log in with API keys).", no_args_is_help=True
)
apikey_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
role_app = typer.Typer(help="Grant, revoke and list role bindings.", no_args_is_help=True)
admin_app = typer.Typer(help="Platform administration.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(user_app, name="user")
app.add_typer(sa_app, name="sa")
app.add_typer(apikey_app, name="apikey")
app.add_typer(role_app, name="role")
app.add_typer(admin_app, name="admin")
platform_cmd.register(app)

_out = Console(highlight=False, soft_wrap=False)

TenantOption = Annotated[str, typer.Option("--tenant", "-t", help="The tenant.", show_default=False)]
RolesOption = Annotated[
    list[str] | None,
    typer.Option("--role", "-r", help="A role to grant in the tenant (repeatable).", show_default=False),
]
PasswordStdinOption = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input instead of prompting.")
]


# -- helpers ---------------------------------------------------------------------------------------------


def _run(work: Callable[[CliSession], Awaitable[_T]], *, authenticated: bool = True) -> _T:
    """Runs one command's RPCs in a fresh event loop with a session (token attached unless logging in)."""

    async def main() -> _T:
        async with open_session(authenticated=authenticated) as session:
            return await work(session)

    return asyncio.run(main())


class _CliAuthClient(AuthClient):
    """The auth client plus the whole-collection listings the CLI shows (every page, not just the first)."""

    async def all_tenants(self) -> list[pb.Tenant]:
        return await self._all(lambda page: (self.stub.ListTenants, pb.ListTenantsRequest(page=page), "tenants"))

    async def all_users(self, tenant: str) -> list[pb.User]:
        return await self._all(
            lambda page: (self.stub.ListUsers, pb.ListUsersRequest(tenant=tenant, page=page), "users")
        )

    async def all_api_keys(self, tenant: str) -> list[pb.ApiKey]:
        return await self._all(
            lambda page: (self.stub.ListApiKeys, pb.ListApiKeysRequest(tenant=tenant, page=page), "api_keys")
        )

    async def _all(self, request_for: Callable[[common_pb2.PageRequest], tuple[Any, Any, str]]) -> list[Any]:
        items: list[Any] = []
        token = ""
        while True:
            method, request, field = request_for(common_pb2.PageRequest(page_size=1000, page_token=token))
            response = await self._unary(method, request, idempotent=True)
            items.extend(getattr(response, field))
            token = response.page.next_page_token
            if not token:
                return items


def _client(session: CliSession) -> _CliAuthClient:
    return _CliAuthClient(session.auth_channel)


def _read_stdin(what: str) -> str:
    value = typer.get_text_stream("stdin").read().rstrip("\r\n")
    if not value:
        raise InvalidArgument(f"no {what} on standard input")
    return value


def _read_stdin_lines(first: str, second: str) -> tuple[str, str]:
    """The first line of standard input (required) and the second ("" when absent)."""
    lines = typer.get_text_stream("stdin").read().splitlines()
    if not lines or not lines[0]:
        raise InvalidArgument(f"no {first} on standard input")
    return lines[0], lines[1] if len(lines) > 1 else ""


def _prompt_new_password(prompt: str = "New password") -> str:
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=True))


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return datetime.fromtimestamp(stamp.seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _kind(kind: int) -> str:
    return pb.PrincipalKind.Name(kind).removeprefix("PRINCIPAL_KIND_").lower()  # type: ignore[arg-type]


def _table(*columns: str, rows: Iterable[Iterable[str]], title: str | None = None) -> Table:
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*row)
    return table


# -- login -----------------------------------------------------------------------------------------------


@app.command()
def login(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant of the user.")] = "",
    user: Annotated[str, typer.Option("--user", "-u", help="The user name.")] = "",
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the password from standard input instead of prompting (a new one, if any, on the second line).",
        ),
    ] = False,
    new_password: Annotated[
        bool,
        typer.Option(
            "--new-password",
            help="Set a new password as part of this login (asked for, or read from the second line of standard "
            "input). Asked for anyway when the password has expired, as the first-start admin's has.",
        ),
    ] = False,
    api_key_stdin: Annotated[
        bool, typer.Option("--api-key-stdin", help="Log in with an API key read from standard input.")
    ] = False,
) -> None:
    """Log in (user and password, or an API key) and store the tokens for later commands."""
    replacement = ""
    if api_key_stdin:
        if tenant or user or password_stdin or new_password:
            raise typer.BadParameter("--api-key-stdin takes no --tenant, --user, --password-stdin or --new-password")
        secret = _read_stdin("API key")
    else:
        if not tenant or not user:
            raise typer.BadParameter("give --tenant and --user (or --api-key-stdin)")
        if password_stdin:
            password, replacement = _read_stdin_lines("password", "new password")
            if new_password and not replacement:
                raise InvalidArgument("--new-password with --password-stdin: give the new password on the second line")
        else:
            password = typer.prompt("Password", hide_input=True)
            replacement = _prompt_new_password() if new_password else ""

    async def work(session: CliSession) -> Credentials:
        client = session.auth
        if api_key_stdin:
            tokens = await client.exchange_api_key(secret)
        else:
            tokens = await client.login(tenant, user, password, new_password=replacement)
        session.bearer.token = tokens.access_token
        me = await client.whoami()
        credentials = Credentials.from_token_pair(session.auth_addr, tokens, me.subject, me.tenant)
        session.store.save(credentials)
        return credentials

    try:
        credentials = _run(work, authenticated=False)
    except FailedPrecondition as expired:
        if api_key_stdin or replacement:
            raise
        if password_stdin:
            raise FailedPrecondition(f"{expired.message} (give the new password on the second line of stdin)") from None
        typer.echo("Your password has expired: choose a new one.", err=True)
        replacement = _prompt_new_password()
        credentials = _run(work, authenticated=False)
    typer.echo(f"logged in to {credentials.auth_addr} as {credentials.subject} (tenant {credentials.tenant})")
    if replacement:
        typer.echo("password changed", err=True)


@app.command()
def logout() -> None:
    """End the stored login (its tokens are refused everywhere) and forget it."""
    path = credentials_path(cli_settings().data_dir)
    store = CredentialsStore(path)
    stored = store.load()
    ended = ""
    if stored is not None and stored.refresh_token:

        async def end(session: CliSession) -> None:
            await session.auth.logout(stored.refresh_token)

        try:
            _run(end, authenticated=False)
            ended = "; the login was ended"
        except (Unauthenticated, Unavailable) as exc:
            ended = f"; the auth service did not end the login ({exc.message})"
    if store.delete():
        typer.echo(f"logged out (removed {path}){ended}")
    else:
        typer.echo("not logged in")


@app.command()
def password(
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin", help="Read the current and the new password from two lines of standard input."
        ),
    ] = False,
) -> None:
    """Change your password (your other logins end; this one goes on)."""
    if password_stdin:
        current, new = _read_stdin_lines("current password", "new password")
        if not new:
            raise InvalidArgument("no new password on the second line of standard input")
    else:
        current = typer.prompt("Current password", hide_input=True)
        new = _prompt_new_password()
    _run(lambda session: session.auth.change_password(current, new))
    typer.echo("password changed; your other logins were ended")


@app.command()
def whoami() -> None:
    """Show who the stored login is and its role bindings."""
    me = _run(lambda session: session.auth.whoami())
    typer.echo(f"subject: {me.subject}\ntenant:  {me.tenant}\nkind:    {_kind(me.kind)}")
    if me.role_bindings:
        _out.print(_table("role", "tenant", rows=((b.role, b.tenant) for b in me.role_bindings)))


# -- tenants, users, service accounts --------------------------------------------------------------------


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits and '-', 3 to 40 characters.")],
    display_name: Annotated[str, typer.Option("--display-name", help="A human-friendly name.")] = "",
) -> None:
    """Create a tenant (platform admins only)."""
    tenant = _run(lambda session: session.auth.create_tenant(name, display_name))
    typer.echo(f"created tenant {tenant.name}")


@tenant_app.command("list")
def tenant_list() -> None:
    """List the tenants you may see."""
    tenants = _run(lambda session: _client(session).all_tenants())
    _out.print(
        _table(
            "name",
            "display name",
            "created",
            rows=((t.name, t.display_name, _when(t.create_time)) for t in tenants),
        )
    )


@user_app.command("create")
def user_create(
    name: Annotated[str, typer.Argument(help="User name: lowercase letters, digits, '.', '_' and '-'.")],
    tenant: TenantOption,
    roles: RolesOption = None,
    password_stdin: PasswordStdinOption = False,
) -> None:
    """Create a user with a password (at least 12 characters), optionally granting roles."""
    if password_stdin:
        password = _read_stdin("password")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    created = _run(lambda session: session.auth.create_user(tenant, name, password, roles or []))
    typer.echo(f"created user {created.subject}")


@user_app.command("list")
def user_list(tenant: TenantOption) -> None:
    """List the users and service accounts of a tenant."""
    users = _run(lambda session: _client(session).all_users(tenant))
    _out.print(
        _table(
            "subject",
            "name",
            "kind",
            "created",
            "state",
            rows=(
                (u.subject, u.name, _kind(u.kind), _when(u.create_time), "disabled" if u.disabled else "active")
                for u in users
            ),
        )
    )


@user_app.command("disable")
def user_disable(
    subject: Annotated[str, typer.Argument(help="e.g. user:acme/alice or sa:acme/ci.")], tenant: TenantOption
) -> None:
    """Disable a user or service account: its logins, API keys, job delegations and every token it holds stop
    working (other services refuse its tokens within AIDC_REVOCATION_REFRESH_SECONDS)."""
    user = _run(lambda session: session.auth.disable_user(tenant, subject))
    typer.echo(f"disabled {user.subject}")


@user_app.command("enable")
def user_enable(
    subject: Annotated[str, typer.Argument(help="e.g. user:acme/alice or sa:acme/ci.")], tenant: TenantOption
) -> None:
    """Enable a disabled user or service account (it logs in again; tokens from before stay refused)."""
    user = _run(lambda session: session.auth.enable_user(tenant, subject))
    typer.echo(f"enabled {user.subject}")


@sa_app.command("create")
def sa_create(
    name: Annotated[str, typer.Argument(help="Service account name.")],
    tenant: TenantOption,
    roles: RolesOption = None,
) -> None:
    """Create a service account; give it an API key with `aidc apikey create --subject`."""
    account = _run(lambda session: session.auth.create_service_account(tenant, name, roles or []))
    typer.echo(f"created service account {account.subject}")
    typer.echo(f"next: aidc apikey create --tenant {tenant} --subject {account.subject}", err=True)


# -- API keys --------------------------------------------------------------------------------------------


@apikey_app.command("create")
def apikey_create(
    tenant: TenantOption,
    subject: Annotated[str, typer.Option("--subject", "-s", help="Who the key authenticates as; default: you.")] = "",
    description: Annotated[str, typer.Option("--description", "-d", help="What the key is for.")] = "",
    ttl: Annotated[int, typer.Option("--ttl", min=0, help="Lifetime in seconds; 0 means no expiry.")] = 0,
) -> None:
    """Create an API key. The secret goes to standard output, once; everything else to standard error."""
    created = _run(lambda session: session.auth.create_api_key(tenant, subject, description, ttl))
    key = created.api_key
    expires = _when(key.expire_time) or "never"
    typer.echo(f"created API key {key.key_id} for {key.subject} (expires: {expires})", err=True)
    typer.echo(created.secret)
    typer.echo(
        "warning: this is the only time the secret is shown; it cannot be recovered. Store it now "
        "(e.g. in a secret manager); if it is lost, revoke the key and create another.",
        err=True,
    )


@apikey_app.command("list")
def apikey_list(tenant: TenantOption) -> None:
    """List a tenant's API keys (never their secrets)."""
    keys = _run(lambda session: _client(session).all_api_keys(tenant))
    rows = (
        (
            k.key_id,
            k.subject,
            k.description,
            _when(k.create_time),
            _when(k.expire_time) or "never",
            "revoked" if k.revoked else "active",
        )
        for k in keys
    )
    _out.print(_table("key id", "subject", "description", "created", "expires", "state", rows=rows))


@apikey_app.command("revoke")
def apikey_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (from `aidc apikey list`).")],
    tenant: TenantOption,
) -> None:
    """Revoke an API key: it can no longer be exchanged for tokens."""
    key = _run(lambda session: session.auth.revoke_api_key(tenant, key_id))
    typer.echo(f"revoked API key {key.key_id} of {key.subject}")


# -- roles, audit ----------------------------------------------------------------------------------------

SubjectArgument = Annotated[str, typer.Argument(help="A subject, e.g. user:acme/alice or sa:acme/ci.")]
RoleArgument = Annotated[str, typer.Argument(help="platform-admin, tenant-admin, developer, viewer or billing-viewer.")]


@role_app.command("grant")
def role_grant(subject: SubjectArgument, role: RoleArgument, tenant: TenantOption) -> None:
    """Grant a role to a subject in a tenant."""
    _run(lambda session: session.auth.assign_role(subject, role, tenant))
    typer.echo(f"granted {role} to {subject} in {tenant}")


@role_app.command("revoke")
def role_revoke(subject: SubjectArgument, role: RoleArgument, tenant: TenantOption) -> None:
    """Revoke a role from a subject in a tenant."""
    _run(lambda session: session.auth.revoke_role(subject, role, tenant))
    typer.echo(f"revoked {role} from {subject} in {tenant}")


@role_app.command("list")
def role_list(
    tenant: TenantOption,
    subject: Annotated[str, typer.Option("--subject", "-s", help="Only this subject's bindings.")] = "",
) -> None:
    """List the role bindings of a tenant."""
    bindings = _run(lambda session: session.auth.list_role_bindings(tenant, subject))
    _out.print(_table("subject", "role", "tenant", rows=((b.subject, b.role, b.tenant) for b in bindings)))


@app.command()
def audit(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Only this tenant; default: all you may read.")] = "",
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="How many events, newest first.")] = 50,
) -> None:
    """Show the audit log of security-relevant changes, newest first."""
    events = _run(lambda session: session.auth.list_audit_events(tenant, limit))
    rows = (
        (
            _when(e.time),
            e.actor,
            e.tenant,
            e.action,
            e.target,
            e.trace_id,
            e.details_json if e.details_json != "{}" else "",
        )
        for e in events
    )
    _out.print(_table("time", "actor", "tenant", "action", "target", "trace id", "details", rows=rows))


# -- administration --------------------------------------------------------------------------------------


@admin_app.command("rotate-signing-key")
def admin_rotate_signing_key() -> None:
    """Sign tokens with a new key; tokens signed with older keys keep verifying until they expire."""
    kid = _run(lambda session: session.auth.rotate_signing_key())
    typer.echo(f"new signing key: {kid}")


@admin_app.command("init")
def admin_init() -> None:
    """Show the first-start platform admin's one-time password, once (the file holding it is then deleted)."""
    data_dir = cli_settings().data_dir
    admin = take_bootstrap_admin(data_dir)
    if admin is None:
        path = bootstrap_admin_file(data_dir)
        raise FailedPrecondition(
            f"{path} does not exist: the platform admin's one-time password was already shown (and its file "
            "deleted), or the auth service has not started yet with this data directory (AIDC_DATA_DIR)"
        )
    typer.echo(f"platform admin: tenant {admin.tenant}, user {admin.user}")
    typer.echo(f"password: {admin.password}")
    typer.echo(
        "warning: this password is shown only this once and has now been deleted from disk. It works for one\n"
        "login, which must set a new password (aidc login asks for it):\n"
        f"  aidc login --tenant {admin.tenant} --user {admin.user}\n"
        "Then create named administrators; do not share this account.",
        err=True,
    )


trace_cmd.register(app)
certs_cmd.register(app)
storage_cmd.register(app)
billing_cmd.register(app)
training_cmd.register(app)
scheduler_cmd.register(app)
serving_cmd.register(app)

# -- configuration ---------------------------------------------------------------------------------------

#: Modules whose settings dataclasses (declared with ``setting()``) or ``Setting`` lists are documented.
_SETTINGS_MODULES: tuple[str, ...] = (
    "services.mesh.config",
    *(f"services.{name}.config" for name in SERVICE_NAMES),
    "services.platform.config",
    "services.collector.config",
    "services.mesh.telemetry",
    "services.cli.credentials",
    "services.cli.session",
)


def _documented(obj: object) -> list[Setting]:
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        fields = dataclasses.fields(obj)
        if fields and all(f.metadata.get("doc") for f in fields):
            return describe_settings(obj)
        return []
    if isinstance(obj, list | tuple) and obj and all(isinstance(item, Setting) for item in obj):
        return list(obj)
    return []


def documented_settings(modules: Iterable[str] = _SETTINGS_MODULES) -> list[Setting]:
    """Every documented environment variable of the platform, each once (the first declaration wins)."""
    found: dict[str, Setting] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # that part of the platform has not landed yet
            raise
        for name in getattr(module, "__all__", ()):
            for item in _documented(getattr(module, name, None)):
                found.setdefault(item.env, item)
    return list(found.values())


def _cell(text: str) -> str:
    """Text safe in a markdown table cell; ``<name>`` outside code spans would vanish as an HTML tag."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    parts[::2] = [part.replace("<", "&lt;").replace(">", "&gt;") for part in parts[::2]]
    return "`".join(parts)


def settings_markdown(settings: Iterable[Setting]) -> str:
    """The configuration table the README embeds."""
    lines = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for item in settings:
        escaped = item.default.replace("|", "\\|")
        default = f"`{escaped}`" if item.default else "*(empty)*"
        lines.append(f"| `{item.env}` | {default} | {_cell(item.doc)} |")
    return "\n".join(lines)


@app.command("config")
def config(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a markdown table (as in the README).")] = False,
) -> None:
    """List every environment variable aidc reads, with its default and meaning."""
    settings = documented_settings()
    if markdown:
        typer.echo(settings_markdown(settings))
        return
    table = Table()
    table.add_column("variable", no_wrap=True)
    table.add_column("default", overflow="fold")
    table.add_column("description", ratio=1)
    for item in settings:
        table.add_row(item.env, item.default, item.doc)
    _out.print(table)
