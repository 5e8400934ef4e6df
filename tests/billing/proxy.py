"""A TCP proxy for fault injection: forwards bytes both ways, and can hold back the server's answers.

Holding answers back while the server works makes "the server committed, the client never heard" happen on
purpose rather than by luck of timing.
"""

from __future__ import annotations

import asyncio
import contextlib


class HoldingProxy:
    """Listens on 127.0.0.1:<port> and forwards each connection to ``upstream`` (host:port)."""

    def __init__(self, upstream: str) -> None:
        self._host, port = upstream.rsplit(":", 1)
        self._port = int(port)
        self._answers = asyncio.Event()
        self._answers.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{self.port}"

    def hold_answers(self) -> None:
        self._answers.clear()

    def release(self) -> None:
        """Lets answers through again and drops every open connection (their held answers are lost)."""
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        self._answers.set()

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            client_writer.close()
            return
        self._writers.update((client_writer, upstream_writer))
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer, hold=False),
            self._pipe(upstream_reader, client_writer, hold=True),
            return_exceptions=True,
        )
        for writer in (client_writer, upstream_writer):
            writer.close()
            self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if hold:
                    await self._answers.wait()
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
        writer.close()
