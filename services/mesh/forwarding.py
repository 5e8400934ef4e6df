"""Forwarding to the leader: a replica that is not its service's leader hands the RPCs only the leader serves (the
scheduler's, serving's deployment changes) to the leader, so clients may call any replica.

The forwarding replica has authenticated and authorized the caller already; it calls the leader's advertised address
(from the lease) with the caller's token and remaining deadline (as every mesh call does), its own certificate, and
the service the caller's certificate named in ``x-aidc-forwarded-peer`` ("-": none, e.g. on the tenant path). The
leader trusts that header only from a certificate of its own service (a replica), and authenticates and authorizes
the call again. Unary and server-streaming RPCs are forwarded; a call to a replica that no longer leads is answered
UNAVAILABLE (retried by mesh clients), never forwarded twice.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc.aio import ServicerContext

from services.mesh.channels import create_channel
from services.mesh.client import translate_rpc_error
from services.mesh.config import MeshSettings
from services.mesh.errors import Unavailable
from services.mesh.identity import current_peer_service
from services.mesh.interceptors import FORWARDED_PEER, Behavior, _WrappingInterceptor
from services.mesh.leader import LeaderElection

__all__ = ["LeaderForwarding", "FORWARDED_PEER"]

log = logging.getLogger(__name__)

_NO_PEER = "-"


def _message_types(method: str) -> tuple[Any, Any]:
    found = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    return message_factory.GetMessageClass(found.input_type), message_factory.GetMessageClass(found.output_type)


class LeaderForwarding(_WrappingInterceptor):
    """The innermost server interceptor of a service whose ``leader_only`` RPCs (full gRPC service names, every RPC
    of the service, or "<service>/<method>") only its leader serves: on a follower they go to the leader (see the
    module docstring)."""

    def __init__(
        self, election: LeaderElection, settings: MeshSettings, service: str, leader_only: Collection[str]
    ) -> None:
        self._election = election
        self._settings = settings
        self._service = service
        self._leader_only = frozenset(leader_only)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _forwards(self, method: str) -> bool:
        name = method.lstrip("/")
        return name in self._leader_only or name.split("/", 1)[0] in self._leader_only

    def _leader_channel(self, context: ServicerContext) -> grpc.aio.Channel:
        if any(key == FORWARDED_PEER for key, _ in context.invocation_metadata() or ()):
            raise Unavailable(f"this {self._service} replica no longer leads; retry")
        lease = self._election.lease
        if lease is None or lease.ours or not lease.address:
            raise Unavailable(f"no {self._service} leader is known yet; retry")
        channel = self._channels.get(lease.address)
        if channel is None:  # a channel per leader seen (few: one per failover), closed with the server
            channel = self._channels[lease.address] = create_channel(
                lease.address, self._settings, identity=self._service, server_name=f"aidc-{self._service}"
            )
        return channel

    @staticmethod
    def _metadata() -> tuple[tuple[str, str], ...]:
        return ((FORWARDED_PEER, current_peer_service.get() or _NO_PEER),)

    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        if request_streaming or not self._forwards(details.method):
            return behavior
        method = details.method
        request_type, response_type = _message_types(method)
        election = self._election

        def callable_on(channel: grpc.aio.Channel, streaming: bool) -> Callable[..., Any]:
            factory = channel.unary_stream if streaming else channel.unary_unary
            return factory(
                method,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )

        if not response_streaming:

            async def unary(request: Any, context: ServicerContext) -> Any:
                if election.is_leader:
                    return await behavior(request, context)
                call = callable_on(self._leader_channel(context), False)
                try:
                    return await call(request, metadata=self._metadata())
                except grpc.RpcError as error:
                    raise translate_rpc_error(error) from None

            return unary

        async def stream(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            if election.is_leader:
                async for response in behavior(request, context):
                    yield response
                return
            call = callable_on(self._leader_channel(context), True)(request, metadata=self._metadata())
            try:
                async for response in call:
                    yield response
            except grpc.RpcError as error:
                raise translate_rpc_error(error) from None
            finally:
                call.cancel()

        return stream

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
