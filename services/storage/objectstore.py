"""The object store (S3 API through the ``minio`` SDK): blocking calls, run in worker threads by the core.

Every failure to reach the store, or a 5xx from it, becomes ``Unavailable`` with a message naming the endpoint;
the urllib3 pool reconnects on its own, so calls succeed again as soon as the store is back.

Large objects go up as multipart uploads whose parts the caller sends in parallel. Part bodies travel as
``UNSIGNED-PAYLOAD`` (a presigned part URL), as the SDK already sends them over TLS: a SigV4 payload hash would
cost a SHA-256 pass over every byte (the largest CPU cost of a plain-HTTP put) and adds nothing to what is
stored here, which is AEAD ciphertext whose every segment is authenticated at every read; the stored size is
checked after the upload.
"""

from __future__ import annotations

import http.client
import io
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Protocol

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import genheaders
from minio.sse import SseS3
from urllib3.util import Retry, Timeout

from services.mesh.errors import Unavailable
from services.storage.config import StorageSettings

__all__ = ["ObjectStore", "S3ObjectStore", "StoredObjectMissing", "ReadableObject"]

log = logging.getLogger(__name__)

_MISSING_CODES = ("NoSuchKey", "NoSuchObject", "NoSuchVersion")
_CREDENTIAL_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
#: Lifetime of a presigned part URL: it is used at once.
_PART_URL_SECONDS = 900


class StoredObjectMissing(Exception):
    """The object store has no object under a key the metadata names, or fewer bytes than a read asked for."""


def _body_reader(response: Any) -> Any:
    """What reads ``response``'s body: the standard library's HTTP response under urllib3's, which reads from the
    socket straight into a caller's buffer (urllib3's own ``read`` and ``readinto`` allocate and copy every block),
    or urllib3's response when it has a content encoding to decode. The body is then read through one of them only,
    so neither sees part of it."""
    raw = getattr(response, "_fp", None)
    if isinstance(raw, http.client.HTTPResponse) and not response.headers.get("Content-Encoding"):
        return raw
    return response


class ReadableObject(io.RawIOBase):
    """A stored object's bytes as a file object; remembers the store error that broke a read (if any), because
    a decryptor reading it would otherwise report that as corrupt data."""

    def __init__(self, response: Any, describe: str) -> None:
        super().__init__()
        self._response = response
        self._body = _body_reader(response)
        self._describe = describe
        self.error: Unavailable | None = None

    def readable(self) -> bool:
        return True

    def _broken(self, what: str) -> Unavailable:
        self.error = Unavailable(f"object store at {self._describe} failed mid-transfer: {what}")
        return self.error

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise self._broken(type(exc).__name__) from None

    def _ended(self) -> None:
        """After a read that returned nothing: the body ended. If the response announced more, the connection was
        cut (an outage, Unavailable), which urllib3 would have raised; the object itself is never short here."""
        if isinstance(self._body, http.client.HTTPResponse) and self._body.length:
            raise self._broken("the connection ended before the announced length")

    def readinto(self, buffer: Any) -> int:
        with self._reading():
            got = int(self._body.readinto(buffer) or 0)
        if not got and len(buffer):
            self._ended()
        return got

    def readinto_exact(self, buffer: memoryview) -> int:
        """Fills ``buffer`` from the socket (no copy in between); fewer bytes (their count) only at the end of the
        object."""
        filled, size = 0, len(buffer)
        while filled < size and (got := self.readinto(buffer[filled:])):
            filled += got
        return filled

    def _read(self, size: int) -> bytes:
        with self._reading():
            data: bytes = self._body.read(size)
        if not data and size:
            self._ended()
        return data

    def read_exact(self, size: int) -> bytes:
        """``size`` bytes, or fewer only at the end of the object."""
        data = self._read(size)
        if len(data) == size or not data:
            return data
        pieces = [data]
        got = len(data)
        while got < size and (more := self._read(size - got)):
            pieces.append(more)
            got += len(more)
        return b"".join(pieces)

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
                self._response.release_conn()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
                pass
        super().close()


class ObjectStore(Protocol):
    """What the storage core needs from an object store."""

    def ensure_bucket(self) -> None: ...

    def put(self, key: str, data: bytes | bytearray | memoryview, content_type: str) -> None: ...

    def start_multipart(self, key: str, content_type: str) -> str: ...

    def put_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray | memoryview) -> str: ...

    def complete_multipart(self, key: str, upload_id: str, etags: Sequence[str]) -> None: ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    def size_of(self, key: str) -> int: ...

    def open(self, key: str, offset: int = 0, length: int = 0) -> ReadableObject: ...

    def remove(self, key: str) -> None: ...

    def keys(self, prefix: str) -> Iterator[str]: ...

    def abort_incomplete_uploads(self, key: str) -> int: ...


class S3ObjectStore:
    """ObjectStore on one bucket of an S3 server (MinIO in production, SeaweedFS locally)."""

    def __init__(self, settings: StorageSettings) -> None:
        self._endpoint = settings.s3_endpoint
        self._bucket = settings.storage_bucket
        self._sse = SseS3() if settings.storage_s3_sse == "s3" else None
        timeout = settings.storage_s3_timeout_seconds
        self._http = http = urllib3.PoolManager(
            timeout=Timeout(connect=timeout, read=max(timeout, 30.0)),
            maxsize=max(10, settings.storage_max_concurrent_transfers * settings.storage_parallel_parts),
            cert_reqs="CERT_REQUIRED" if settings.storage_s3_secure else "CERT_NONE",
            ca_certs=settings.storage_s3_ca_file or certifi.where(),
            # A few quick retries ride over a blip; a store that is down fails the call within seconds.
            retries=Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(
            settings.s3_endpoint,
            access_key=settings.aws_access_key_id or None,
            secret_key=settings.aws_secret_access_key or None,
            secure=settings.storage_s3_secure,
            region=settings.storage_s3_region or None,
            http_client=http,
        )

    @property
    def client(self) -> Minio:
        """The underlying SDK client (tests and benchmarks read raw objects with it)."""
        return self._client

    @property
    def bucket(self) -> str:
        return self._bucket

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except S3Error as exc:
            if exc.code in _MISSING_CODES or exc.code == "InvalidRange":
                raise StoredObjectMissing(what) from None
            if exc.code in _CREDENTIAL_CODES:
                raise Unavailable(
                    f"object store at {self._endpoint} refused the storage service's credentials ({exc.code})"
                ) from None
            raise Unavailable(f"object store at {self._endpoint} failed to {what}: {exc.code}") from None
        except (ServerError, InvalidResponseError) as exc:
            raise Unavailable(f"object store at {self._endpoint} failed to {what}: {exc}") from None
        except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
            log.info("object store unreachable: %s", exc)
            raise Unavailable(f"object store at {self._endpoint} is unreachable ({type(exc).__name__})") from None
        except MinioException as exc:
            raise Unavailable(f"object store at {self._endpoint} failed to {what}: {exc}") from None

    def ensure_bucket(self) -> None:
        """Creates the bucket unless it exists."""
        with self._errors("create the bucket"):
            if not self._client.bucket_exists(self._bucket):
                try:
                    self._client.make_bucket(self._bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                log.info("created bucket %s", self._bucket)

    def put(self, key: str, data: bytes | bytearray | memoryview, content_type: str) -> None:
        """Stores a small object in one request."""
        with self._errors("store an object"):
            self._client.put_object(
                self._bucket, key, io.BytesIO(data), len(data), content_type=content_type, sse=self._sse
            )

    def start_multipart(self, key: str, content_type: str) -> str:
        """Starts a multipart upload of ``key``; its id."""
        headers = genheaders(None, self._sse, None, None, False)
        headers["Content-Type"] = content_type
        with self._errors("start an upload"):
            return self._client._create_multipart_upload(self._bucket, key, headers)

    def put_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray | memoryview) -> str:
        """Stores part ``number`` (from 1) of a multipart upload; its ETag."""
        with self._errors("store a part"):
            url = self._client.get_presigned_url(
                "PUT",
                self._bucket,
                key,
                expires=timedelta(seconds=_PART_URL_SECONDS),
                extra_query_params={"uploadId": upload_id, "partNumber": str(number)},
            )
            # urllib3 sends any buffer (it takes a memoryview's nbytes as the length): no copy of the part.
            body: Any = data
            response = self._http.request("PUT", url, body=body, headers={"Content-Length": str(len(data))})
            if response.status != 200:
                found = _ERROR_CODE.search(response.data or b"")
                code = found.group(1).decode(errors="replace") if found else f"HTTP {response.status}"
                if code in _CREDENTIAL_CODES:
                    raise Unavailable(
                        f"object store at {self._endpoint} refused the storage service's credentials ({code})"
                    )
                raise Unavailable(f"object store at {self._endpoint} failed to store a part: {code}")
            return str(response.headers.get("ETag", "")).strip('"')

    def complete_multipart(self, key: str, upload_id: str, etags: Sequence[str]) -> None:
        """Completes a multipart upload of the parts 1..n with these ETags: the object appears whole."""
        parts = [Part(number, etag) for number, etag in enumerate(etags, start=1)]
        with self._errors("complete an upload"):
            self._client._complete_multipart_upload(self._bucket, key, upload_id, parts)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Aborts a multipart upload; its stored parts are dropped."""
        with self._errors("abort an upload"):
            self._client._abort_multipart_upload(self._bucket, key, upload_id)

    def size_of(self, key: str) -> int:
        with self._errors("stat an object"):
            size = self._client.stat_object(self._bucket, key).size
        return int(size or 0)

    def open(self, key: str, offset: int = 0, length: int = 0) -> ReadableObject:
        """The stored bytes of ``key`` from ``offset`` (``length`` of them, 0: to the end), streamed;
        StoredObjectMissing if there are none there."""
        with self._errors("read an object"):
            response = self._client.get_object(self._bucket, key, offset=offset, length=length)
        return ReadableObject(response, self._endpoint)

    def remove(self, key: str) -> None:
        """Removes an object; removing a missing one is fine."""
        with self._errors("delete an object"):
            self._client.remove_object(self._bucket, key)

    def keys(self, prefix: str) -> Iterator[str]:
        with self._errors("list objects"):
            for item in self._client.list_objects(self._bucket, prefix=prefix, recursive=True):
                if item.object_name:
                    yield item.object_name

    def abort_incomplete_uploads(self, key: str) -> int:
        """Aborts multipart uploads left open under ``key`` by a process that died mid-upload (best effort: the
        SDK exposes these calls only privately, and some servers don't list uploads)."""
        aborted = 0
        with self._errors("abort incomplete uploads"):
            try:
                result = self._client._list_multipart_uploads(self._bucket, prefix=key)
            except S3Error as exc:
                log.info("cannot list incomplete uploads: %s", exc.code)
                return 0
            for upload in result.uploads:
                if upload.object_name == key and upload.upload_id:
                    self._client._abort_multipart_upload(self._bucket, key, upload.upload_id)
                    aborted += 1
        return aborted
