"""The collector's HTTP server: OTLP/HTTP ``POST /v1/traces`` (JSON or protobuf) into the span store.

Endpoints:

* ``POST /v1/traces`` with ``Content-Type: application/json`` (what Triton sends) or
  ``application/x-protobuf`` (what the Python SDK sends), optionally ``Content-Encoding: gzip``.
  On success: 200 with ``{}`` or an empty ``ExportTraceServiceResponse``. A body that doesn't decode:
  400 with a ``google.rpc.Status`` carrying the reason (JSON or protobuf, like the request, as OTLP/HTTP
  specifies), and nothing is written.
* ``GET /healthz``: 200 ``ok``.

The collector does not trace itself: its own spans would loop back into it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from services.collector.config import CollectorConfig
from services.mesh.spanstore import (
    OtlpDecodeError,
    SpanRecord,
    SpanStoreWriter,
    spans_from_otlp_json,
    spans_from_otlp_proto,
    store_file,
)

__all__ = ["CollectorServer", "build_server", "serve"]

_log = logging.getLogger(__name__)

_JSON = "application/json"
_PROTOBUF = "application/x-protobuf"
_DECODERS: dict[str, Callable[[bytes], list[SpanRecord]]] = {
    _JSON: spans_from_otlp_json,
    _PROTOBUF: spans_from_otlp_proto,
}
_INVALID_ARGUMENT = 3  # google.rpc.Code
_INTERNAL = 13


class _BodyError(Exception):
    """A request the collector refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _OtlpHttpServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its span writer and how many requests are in flight."""

    daemon_threads = True  # idle keep-alive connections must not hold up shutdown; in-flight ones are waited for

    def __init__(self, address: tuple[str, int], writer: SpanStoreWriter, max_body_bytes: int) -> None:
        self.writer = writer
        self.max_body_bytes = max_body_bytes
        self._idle = threading.Condition()
        self._inflight = 0
        super().__init__(address, _OtlpHandler)

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Counts a request as in flight for the duration of the block."""
        with self._idle:
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight; False if some still were after ``timeout`` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


class _OtlpHandler(BaseHTTPRequestHandler):
    """One HTTP connection; keep-alive, as Triton's exporter reuses connections."""

    server: _OtlpHttpServer
    protocol_version = "HTTP/1.1"
    server_version = "aidc-collector"
    timeout = 60  # drop idle keep-alive connections

    def do_GET(self) -> None:
        """``/healthz`` only."""
        if urlsplit(self.path).path == "/healthz":
            self._reply(200, b"ok", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        """``/v1/traces`` only."""
        with self.server.tracking():
            self._export()

    def _export(self) -> None:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        try:
            body = self._read_body()
            if urlsplit(self.path).path != "/v1/traces":
                raise _BodyError(404, "not found: only POST /v1/traces is served")
            decode = _DECODERS.get(content_type)
            if decode is None:
                raise _BodyError(415, f"Content-Type must be {_JSON} or {_PROTOBUF}, not {content_type!r}")
            try:
                records = decode(body)
            except OtlpDecodeError as exc:
                raise _BodyError(400, str(exc)) from None
        except _BodyError as exc:
            _log.warning("rejected a trace export: %s", exc.message, extra={"status": exc.status})
            self._reply_error(exc.status, exc.message, content_type)
            return
        try:
            self.server.writer.append(records)
        except OSError:
            _log.exception("could not write %d spans", len(records))
            self._reply_error(500, "could not write spans", content_type, code=_INTERNAL)
            return
        _log.debug("stored %d spans", len(records))
        if content_type == _JSON:
            self._reply(200, b"{}", _JSON)
        else:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

            self._reply(200, ExportTraceServiceResponse().SerializeToString(), _PROTOBUF)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise _BodyError(411, "chunked bodies are not supported; send Content-Length")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or not raw_length.strip().isdigit():
            self.close_connection = True
            raise _BodyError(411, "a Content-Length header is required")
        length = int(raw_length)
        if length > self.server.max_body_bytes:
            self.close_connection = True  # the unread body would otherwise be parsed as the next request
            raise _BodyError(413, f"body of {length} bytes exceeds the {self.server.max_body_bytes}-byte limit")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _BodyError(400, f"body ended after {len(body)} of {length} bytes")
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            return _gunzip(body, self.server.max_body_bytes)
        raise _BodyError(415, f"Content-Encoding must be gzip or none, not {encoding!r}")

    def _reply_error(self, status: int, message: str, content_type: str, code: int = _INVALID_ARGUMENT) -> None:
        if content_type == _PROTOBUF:
            from google.rpc.status_pb2 import Status

            self._reply(status, Status(code=code, message=message).SerializeToString(), _PROTOBUF)
        elif content_type == _JSON:
            self._reply(status, json.dumps({"code": code, "message": message}).encode(), _JSON)
        else:
            self._reply(status, message.encode(), "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        """Access log lines go to the debug log, not to raw stderr."""
        _log.debug("%s - %s", self.address_string(), format % args)


def _gunzip(body: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _BodyError(400, f"body is not valid gzip: {exc}") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise _BodyError(413, f"decompressed body exceeds the {limit}-byte limit")
    return data


class CollectorServer:
    """The receiver bound to its address, with the span file it appends to."""

    def __init__(self, config: CollectorConfig, writer: SpanStoreWriter) -> None:
        self._config = config
        self._writer = writer
        self._httpd = _OtlpHttpServer((config.host, config.port), writer, config.max_body_bytes)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when configured with port 0)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def span_file(self) -> Path:
        """The JSONL file received spans are appended to."""
        return self._writer.path

    @property
    def url(self) -> str:
        """The traces endpoint to give exporters, e.g. Triton's ``opentelemetry,url=``."""
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1/traces"

    def start(self) -> None:
        """Serves on a background thread."""
        if self._thread is not None:
            raise RuntimeError("collector already started")
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="collector-http", daemon=True)
        self._thread.start()

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stops accepting, lets in-flight exports finish (up to the grace period), closes the span file."""
        grace = self._config.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        if not self._httpd.wait_idle(grace):
            _log.warning("stopping with exports still in flight after %.1f s", grace)
        self._httpd.server_close()
        self._writer.close()


def build_server(config: CollectorConfig) -> CollectorServer:
    """Binds the receiver and prepares its own span file, ``collector-<pid>.jsonl``."""
    return CollectorServer(config, SpanStoreWriter(store_file(config.traces_dir, "collector")))


def serve(server: CollectorServer, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Serves until one of ``signals`` arrives, then stops gracefully (main thread only: it sets handlers)."""
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        _log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        server.start()
        _log.info("collector listening on %s", server.url, extra={"span_file": str(server.span_file)})
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _log.info("collector stopped")
