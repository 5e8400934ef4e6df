"""A bare gRPC stream, the ceiling of any download through a Python gRPC service on this machine: a server process
whose one server-streaming method sends the requested number of bytes from memory, in messages the size of a
download's, with nothing else (no object store, no cipher, no authentication, no interceptors). Benchmark only.

Run as ``python -m tests.bench.grpc_stream PORT``; ``read(channel, size)`` drains one stream of ``size`` bytes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import grpc

from services.mesh.memory import tune_allocator

MESSAGE_BYTES = 3 * 1024 * 1024
_SERVICE, _METHOD = "bench.Stream", "Read"


async def _serve(port: int) -> None:
    block = os.urandom(MESSAGE_BYTES)

    async def read(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        left = int(request)
        while left > 0:
            yield block[:left] if left < MESSAGE_BYTES else block
            left -= MESSAGE_BYTES

    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(read)  # type: ignore[arg-type]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def read(channel: grpc.aio.Channel, size: int) -> int:
    """Bytes received from one stream of ``size``."""
    call = channel.unary_stream(f"/{_SERVICE}/{_METHOD}", None, None)(str(size).encode())
    received = 0
    async for message in call:
        received += len(message)
    return received


if __name__ == "__main__":
    tune_allocator()  # as every service does
    asyncio.run(_serve(int(sys.argv[1])))
