"""One CLI command's connection to the platform: settings, the stored login, and channels carrying its token.

The CLI is a tenant's client: it takes the tenant path (each service's tenant address, or one ``AIDC_ENDPOINT``
such as a cluster's Gateway), over TLS trusting a CA file, with no client certificate. Operators who hold a client
certificate of the mesh (``aidc certs issue``) may name it in ``AIDC_CLIENT_CERT`` to take the mesh path instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc

from services.auth.client import AuthClient
from services.cli.credentials import CredentialsStore, credentials_path
from services.mesh.channels import CallDetailsInterceptor, create_channel, tenant_channel, with_bearer
from services.mesh.config import MeshSettings, load_settings, setting
from services.mesh.errors import InvalidArgument

__all__ = ["BearerToken", "CliRoute", "CliSession", "bearer_channel", "cli_route", "cli_settings", "open_session"]


class BearerToken(CallDetailsInterceptor):
    """Sends ``authorization: Bearer <token>`` on every call once ``token`` is set (login sets it midway)."""

    def __init__(self, token: str = "") -> None:
        self.token = token

    def rewrite(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return with_bearer(details, self.token, details.timeout)


@dataclass(frozen=True)
class CliRoute:
    """Where the CLI's calls go (the variables only clients read)."""

    endpoint: str = setting(
        "",
        "The CLI's one tenant address for every service (a cluster's Gateway, routing by gRPC service name); empty: "
        "each service's AIDC_<SERVICE>_TENANT_ADDR.",
    )
    ca_file: str = setting(
        "",
        "CA certificate (PEM) the CLI trusts on the tenant path; empty: <certs dir>/ca.pem when the platform has "
        "certificates (`aidc up` prints it), else the system's CAs (plaintext to a loopback address in dev mode).",
    )
    client_cert: str = setting(
        "",
        "Name of a client certificate in the certs directory (`cli`, or one from `aidc certs issue`): the CLI then "
        "takes the mesh path (the services' mesh addresses, mutual TLS), as operators may; empty: the tenant path.",
    )

    def address(self, settings: MeshSettings, service: str) -> str:
        """The address the CLI calls ``service`` at."""
        if self.client_cert:
            return settings.address_of(service)
        if self.endpoint:
            return self.endpoint
        address = settings.tenant_address_of(service)
        if address is None:
            raise InvalidArgument(
                f"{service} has no tenant endpoint (AIDC_{service.upper()}_TENANT_ADDR=off): set AIDC_ENDPOINT, or "
                "AIDC_CLIENT_CERT to take the mesh path"
            )
        return address

    def channel(
        self,
        target: str,
        settings: MeshSettings,
        service: str,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        """A channel to ``service`` at ``target`` on this route."""
        if self.client_cert:
            # Only that service's certificate: every service certificate also names localhost and 127.0.0.1, so
            # checking the address alone would let any service (or its stolen key) answer for another.
            return create_channel(
                target,
                settings,
                identity=self.client_cert,
                extra_interceptors=interceptors,
                server_name=f"aidc-{service}",
            )
        ca_file = Path(self.ca_file) if self.ca_file else None
        return tenant_channel(target, settings, ca_file=ca_file, extra_interceptors=interceptors)


def cli_settings(env: Mapping[str, str] | None = None) -> MeshSettings:
    """The mesh settings from the environment; a bad value is the user's to fix, so it is InvalidArgument."""
    try:
        return load_settings(MeshSettings, env)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"bad configuration: {exc}") from None


def cli_route(env: Mapping[str, str] | None = None) -> CliRoute:
    """The CLI's route from the environment."""
    return load_settings(CliRoute, env)


def bearer_channel(
    target: str, settings: MeshSettings, service: str, bearer: BearerToken, route: CliRoute | None = None
) -> grpc.aio.Channel:
    """A channel to ``service`` on the CLI's route (from the environment unless given) carrying ``bearer``'s token."""
    # grpc-stubs types interceptors as a placeholder that every real interceptor must be cast to.
    return (route or cli_route()).channel(target, settings, service, [cast(grpc.aio.ClientInterceptor, bearer)])


@dataclass
class CliSession:
    """The settings, the credentials store and the channels of one command; closes its channels on exit."""

    settings: MeshSettings
    route: CliRoute
    store: CredentialsStore
    auth_addr: str
    bearer: BearerToken
    auth_channel: grpc.aio.Channel
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def auth(self) -> AuthClient:
        """A client of the auth service on this session's channel."""
        return AuthClient(self.auth_channel)

    async def authenticate(self) -> None:
        """Attaches the stored login's access token, refreshing it first if it is (nearly) expired."""
        self.bearer.token = await self.store.access_token(self.auth_addr, self.auth.refresh_token)

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to a mesh service carrying this session's token."""
        if service == "auth":
            return self.auth_channel
        address = self.route.address(self.settings, service)
        channel = bearer_channel(address, self.settings, service, self.bearer, self.route)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in [*self._channels, self.auth_channel]:
            await channel.close(None)


#: The variables that, when set, name the auth address a command uses on each route (else: the stored login's).
_AUTH_ADDRESS_VARIABLES = ("AIDC_CLIENT_CERT", "AIDC_AUTH_ADDR", "AIDC_ENDPOINT", "AIDC_AUTH_TENANT_ADDR")


@asynccontextmanager
async def open_session(
    *, authenticated: bool = True, env: Mapping[str, str] | None = None
) -> AsyncIterator[CliSession]:
    """A session for one command. Authenticated sessions talk to the auth service the login was made with
    (unless the environment names one: AIDC_ENDPOINT, AIDC_AUTH_TENANT_ADDR, or AIDC_AUTH_ADDR with a client
    certificate) and carry its access token; unauthenticated ones (``aidc login``) talk to the configured one.
    """
    env = os.environ if env is None else env
    settings = cli_settings(env)
    try:
        route = cli_route(env)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"bad configuration: {exc}") from None
    store = CredentialsStore(credentials_path(settings.data_dir, env))
    auth_addr = route.address(settings, "auth")
    if authenticated and not any(name in env for name in _AUTH_ADDRESS_VARIABLES):
        stored = store.load()
        if stored is not None:
            auth_addr = stored.auth_addr
    bearer = BearerToken()
    channel = bearer_channel(auth_addr, settings, "auth", bearer, route)
    session = CliSession(settings, route, store, auth_addr, bearer, channel)
    try:
        if authenticated:
            await session.authenticate()
        yield session
    finally:
        await session.close()
