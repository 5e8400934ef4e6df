"""Download's chunk messages encoded and decoded by hand: a ``DownloadResponse`` holding only ``chunk`` (field 2) is
its tag, a varint length and the bytes, so the service sends it without building a protobuf message and
serializing it (two copies of every megabyte) and the client takes the chunk out without parsing one or copying
it. Any other message (the first one, with the object's metadata) goes through protobuf as usual; both sides stay
wire compatible with any gRPC client or server of the contract."""

from __future__ import annotations

import grpc

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.gen.aidc.storage.v1 import storage_service_pb2_grpc

__all__ = ["encode_chunk", "serialize_download", "deserialize_download", "add_storage_service"]

_SERVICE = "aidc.storage.v1.StorageService"
_CHUNK_TAG = 0x12  # field 2 (chunk), wire type 2 (length-delimited)
_MAX_VARINT = 10


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(data: bytes | memoryview) -> bytes:
    """The encoded DownloadResponse whose chunk is ``data``."""
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(data)), data))


def serialize_download(message: pb.DownloadResponse | bytes) -> bytes:
    """Download's response serializer: encoded chunks (bytes) as they are, messages serialized."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def deserialize_download(data: bytes) -> pb.DownloadResponse | memoryview:
    """Download's response deserializer: the chunk of a message that holds only a chunk, as a view of the message
    (slicing it out would copy every megabyte once more), else the parsed message."""
    if len(data) > 1 and data[0] == _CHUNK_TAG:
        length = shift = 0
        for position in range(1, min(len(data), 1 + _MAX_VARINT)):
            byte = data[position]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if position + 1 + length == len(data):
                    return memoryview(data)[position + 1 :]
                break
    return pb.DownloadResponse.FromString(data)


class _Handlers:
    """Stands in for a server to take the generated registration's method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def add_storage_service(servicer: storage_service_pb2_grpc.StorageServiceServicer, server: grpc.aio.Server) -> None:
    """The generated registration of StorageService, except that Download may yield encoded chunks."""
    generated = _Handlers()
    storage_service_pb2_grpc.add_StorageServiceServicer_to_server(servicer, generated)  # type: ignore[arg-type]
    handlers = generated.handlers
    download = handlers["Download"]
    assert download.unary_stream is not None
    handlers["Download"] = grpc.unary_stream_rpc_method_handler(
        download.unary_stream,
        request_deserializer=download.request_deserializer,
        response_serializer=serialize_download,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)  # type: ignore[attr-defined]
