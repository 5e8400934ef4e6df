"""One CLI command's connection to the mesh: settings, the stored login, and channels carrying its token."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import grpc

from services.auth.client import AuthClient
from services.cli.credentials import CredentialsStore, credentials_path
from services.mesh.channels import CallDetailsInterceptor, create_channel, with_bearer
from services.mesh.config import MeshSettings, load_settings
from services.mesh.errors import InvalidArgument

__all__ = ["BearerToken", "CliSession", "bearer_channel", "cli_settings", "open_session"]


class BearerToken(CallDetailsInterceptor):
    """Sends ``authorization: Bearer <token>`` on every call once ``token`` is set (login sets it midway)."""

    def __init__(self, token: str = "") -> None:
        self.token = token

    def rewrite(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return with_bearer(details, self.token, details.timeout)


def cli_settings(env: Mapping[str, str] | None = None) -> MeshSettings:
    """The mesh settings from the environment; a bad value is the user's to fix, so it is InvalidArgument."""
    try:
        return load_settings(MeshSettings, env)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"bad configuration: {exc}") from None


def bearer_channel(target: str, settings: MeshSettings, bearer: BearerToken) -> grpc.aio.Channel:
    # grpc-stubs types interceptors as a placeholder that every real interceptor must be cast to.
    return create_channel(target, settings, extra_interceptors=[cast(grpc.aio.ClientInterceptor, bearer)])


@dataclass
class CliSession:
    """The settings, the credentials store and the channels of one command; closes its channels on exit."""

    settings: MeshSettings
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
        channel = bearer_channel(self.settings.address_of(service), self.settings, self.bearer)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in [*self._channels, self.auth_channel]:
            await channel.close(None)


@asynccontextmanager
async def open_session(
    *, authenticated: bool = True, env: Mapping[str, str] | None = None
) -> AsyncIterator[CliSession]:
    """A session for one command. Authenticated sessions talk to the auth service the login was made with
    (unless ``AIDC_AUTH_ADDR`` says otherwise) and carry its access token; unauthenticated ones
    (``aidc login``) talk to ``AIDC_AUTH_ADDR``.
    """
    env = os.environ if env is None else env
    settings = cli_settings(env)
    store = CredentialsStore(credentials_path(settings.data_dir, env))
    auth_addr = settings.auth_addr
    if authenticated and "AIDC_AUTH_ADDR" not in env:
        stored = store.load()
        if stored is not None:
            auth_addr = stored.auth_addr
    bearer = BearerToken()
    session = CliSession(settings, store, auth_addr, bearer, bearer_channel(auth_addr, settings, bearer))
    try:
        if authenticated:
            await session.authenticate()
        yield session
    finally:
        await session.close()
