"""The object store (S3 API through the ``minio`` SDK): blocking calls, run in worker threads by the core.

Every failure to reach the store, or a 5xx from it, becomes ``Unavailable`` with a message naming the endpoint;
the urllib3 pool reconnects on its own, so calls succeed again as soon as the store is back.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, Protocol, cast

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.sse import SseS3
from urllib3.util import Retry, Timeout

from services.mesh.errors import Unavailable
from services.storage.config import StorageSettings

__all__ = ["ObjectStore", "S3ObjectStore", "StoredObjectMissing", "ReadableObject"]

log = logging.getLogger(__name__)

_MISSING_CODES = ("NoSuchKey", "NoSuchObject", "NoSuchVersion")
_CREDENTIAL_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


class StoredObjectMissing(Exception):
    """The object store has no object under a key the metadata names."""


class ReadableObject(io.RawIOBase):
    """A stored object's bytes as a file object; remembers the store error that broke a read (if any), because
    a decryptor reading it would otherwise report that as corrupt data."""

    def __init__(self, response: Any, describe: str) -> None:
        super().__init__()
        self._response = response
        self._describe = describe
        self.error: Unavailable | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._response.read(len(buffer))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self.error = Unavailable(f"object store at {self._describe} failed mid-transfer: {type(exc).__name__}")
            raise self.error from None
        n = len(data)
        buffer[:n] = data
        return n

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

    def put_stream(self, key: str, data: io.RawIOBase | BinaryIO, content_type: str) -> None: ...

    def size_of(self, key: str) -> int: ...

    def open(self, key: str) -> ReadableObject: ...

    def remove(self, key: str) -> None: ...

    def keys(self, prefix: str) -> Iterator[str]: ...

    def abort_incomplete_uploads(self, key: str) -> int: ...


class S3ObjectStore:
    """ObjectStore on one bucket of an S3 server (MinIO in production, SeaweedFS locally)."""

    def __init__(self, settings: StorageSettings) -> None:
        self._endpoint = settings.s3_endpoint
        self._bucket = settings.storage_bucket
        self._part_size = settings.storage_part_size_bytes
        self._parallel = settings.storage_parallel_parts
        self._sse = SseS3() if settings.storage_s3_sse == "s3" else None
        timeout = settings.storage_s3_timeout_seconds
        http = urllib3.PoolManager(
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
            if exc.code in _MISSING_CODES:
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

    def put_stream(self, key: str, data: io.RawIOBase | BinaryIO, content_type: str) -> None:
        """Uploads a stream of unknown length in parts (multipart beyond one part); a read error from ``data``
        aborts the multipart upload and propagates as it is."""
        with self._errors("store an object"):
            self._client.put_object(
                self._bucket,
                key,
                cast(BinaryIO, data),
                length=-1,
                part_size=self._part_size,
                num_parallel_uploads=self._parallel,
                content_type=content_type,
                sse=self._sse,
            )

    def size_of(self, key: str) -> int:
        with self._errors("stat an object"):
            size = self._client.stat_object(self._bucket, key).size
        return int(size or 0)

    def open(self, key: str) -> ReadableObject:
        """The stored bytes of ``key``, streamed (StoredObjectMissing if there are none)."""
        with self._errors("read an object"):
            response = self._client.get_object(self._bucket, key)
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
