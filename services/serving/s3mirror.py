"""Mirrors the live model repository's local staging directory into S3, where Triton reads it (``s3://`` URL).

Triton takes an S3 repository as ``s3://[http://|https://]host:port/bucket/prefix`` (credentials from ``AWS_*``);
the serving service writes each deployment locally first (repository.LiveRepository) and then makes the objects
under ``<prefix>/<model>/`` equal to ``<local_root>/<model>/``. The order keeps every state Triton may load whole:
new and changed files first, then config.pbtxt, then deletions (a version is deleted only once the config that
stops listing it is up). A file is uploaded only when its sha256 differs from the one stored with the object.

S3 has no directories: an empty local directory (the libtorch ensemble's version directories) is kept as a
zero-byte "directory marker" object whose key ends in "/", which Triton lists as a directory.

Triton refuses to start on a repository that does not exist yet: a missing bucket ("Unable to create S3 filesystem
client. Check account credentials") or a prefix without objects ("repository path is not a valid directory"). The
mirror creates both (the prefix as ``<prefix>/.keep``, as deploy/k8s's MinIO setup job does), and
``python -m services.serving.s3mirror URL -- tritonserver ...`` does so before it becomes Triton (`aidc up`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import DictType
from urllib3.util import Retry, Timeout

from services.mesh.config import ObjectStoreSettings, load_settings, parse_address
from services.mesh.errors import InvalidArgument, Unavailable
from services.mesh.files import sha256_file

__all__ = ["S3RepositoryMirror", "S3RepositoryURL", "is_s3_url"]

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
CONFIG_PBTXT = "config.pbtxt"
#: The object that makes a repository prefix exist while no model is in it (Triton lists only its directories).
KEEP_OBJECT = ".keep"
#: User metadata holding the hex sha256 of an object's bytes (sent as x-amz-meta-sha256).
SHA256_METADATA = "sha256"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_CREDENTIAL_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def is_s3_url(value: str) -> bool:
    """True for a repository given as an S3 URL rather than a local directory."""
    return value.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3RepositoryURL:
    """A Triton S3 repository URL, taken apart: ``s3://[https://]host:port/bucket[/prefix]``."""

    endpoint: str
    secure: bool
    bucket: str
    #: Key prefix of the repository, without leading or trailing "/"; empty: the bucket's root.
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3RepositoryURL:
        """InvalidArgument naming what is wrong unless ``url`` is a repository URL Triton and this mirror share."""

        def bad(problem: str) -> InvalidArgument:
            return InvalidArgument(
                f"{url!r} is not an S3 model repository URL: {problem} "
                "(expected s3://host:port/bucket/prefix, or s3://https://host:port/bucket/prefix)"
            )

        if not is_s3_url(url):
            raise bad("it does not start with s3://")
        rest = url[len(S3_SCHEME) :]
        scheme, separator, after_scheme = rest.partition("://")
        if separator and scheme not in ("http", "https"):
            raise bad(f"unknown endpoint scheme {scheme!r}")
        secure = scheme == "https" if separator else False
        endpoint, _, path = (after_scheme if separator else rest).partition("/")
        try:
            host, _ = parse_address(endpoint)
        except ValueError:
            # Triton reads s3://bucket/path as AWS itself; this mirror needs the endpoint spelled out.
            raise bad("it lacks the endpoint's host:port") from None
        if not _HOST.fullmatch(host):
            raise bad(f"bad host {host!r}")
        bucket, _, prefix = path.partition("/")
        if not bucket:
            raise bad("it lacks a bucket")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise bad(f"bad bucket name {bucket!r} (3-63 lowercase letters, digits, '.' or '-')")
        prefix = prefix.rstrip("/")
        if any(segment in ("", ".", "..") for segment in prefix.split("/") if prefix):
            raise bad(f"the prefix {prefix!r} has an empty, '.' or '..' segment")
        return cls(endpoint=endpoint, secure=secure, bucket=bucket, prefix=prefix)

    def key(self, relative: str) -> str:
        """The object key of a path relative to the repository's root."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        scheme = "https://" if self.secure else ""
        path = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return f"{S3_SCHEME}{scheme}{self.endpoint}/{path}"


@dataclass(frozen=True)
class _LocalEntry:
    """A file (path) or an empty directory (path None) of the local model directory, with its content's sha256."""

    path: Path | None
    sha256: str


class S3RepositoryMirror:
    """Keeps ``<prefix>/<model>/`` of one S3 bucket equal to a local model directory (blocking calls).

    Safe for concurrent syncs of different models; like the local writer, not for concurrent syncs of one model.
    """

    def __init__(
        self,
        url: str,
        access_key: str,
        secret_key: str,
        *,
        region: str = "",
        ca_file: str = "",
        timeout_seconds: float = 10.0,
    ) -> None:
        self._url = S3RepositoryURL.parse(url)
        http = urllib3.PoolManager(
            timeout=Timeout(connect=timeout_seconds, read=max(timeout_seconds, 30.0)),
            cert_reqs="CERT_REQUIRED" if self._url.secure else "CERT_NONE",
            ca_certs=ca_file or certifi.where(),
            # A few quick retries ride over a blip; a store that is down fails the call within seconds.
            retries=Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(
            self._url.endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=self._url.secure,
            region=region or None,
            http_client=http,
        )
        self._repository_ready = False

    @classmethod
    def from_settings(cls, url: str, settings: ObjectStoreSettings) -> S3RepositoryMirror:
        """The mirror with the object store settings the storage service reads too (AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY, AIDC_STORAGE_S3_REGION, _CA_FILE, _TIMEOUT_SECONDS); the URL names the endpoint."""
        return cls(
            url,
            settings.aws_access_key_id,
            settings.aws_secret_access_key,
            region=settings.storage_s3_region,
            ca_file=settings.storage_s3_ca_file,
            timeout_seconds=settings.storage_s3_timeout_seconds,
        )

    @classmethod
    def from_env(cls, url: str, env: Mapping[str, str] | None = None) -> S3RepositoryMirror:
        """from_settings with the object store settings read from ``env`` (default: os.environ)."""
        return cls.from_settings(url, load_settings(ObjectStoreSettings, env))

    @property
    def url(self) -> S3RepositoryURL:
        return self._url

    @property
    def client(self) -> Minio:
        """The underlying SDK client (tests read raw objects with it)."""
        return self._client

    def model_prefix(self, triton_name: str) -> str:
        """The key prefix ("/"-terminated) under which a Triton model's files are stored."""
        _check_model_name(triton_name)
        return self._url.key(triton_name) + "/"

    def sync(self, local_root: Path, triton_name: str) -> None:
        """Make the objects under ``<prefix>/<triton_name>/`` equal to ``<local_root>/<triton_name>/``: uploads of
        new and changed files, config.pbtxt last of them, then deletions of objects without a local file (all of
        them when the local directory is gone). Unavailable when the object store fails."""
        base = self.model_prefix(triton_name)
        local = _local_tree(local_root / triton_name)
        self.ensure_repository()
        with self._errors(f"mirror {triton_name}"):
            remote = {
                item.object_name[len(base) :]
                for item in self._client.list_objects(self._url.bucket, prefix=base, recursive=True)
                if item.object_name and item.object_name.startswith(base) and item.object_name != base
            }
            uploads = [
                relative
                for relative, entry in local.items()
                if relative not in remote or self._stored_sha256(base + relative) != entry.sha256
            ]
            # Triton must never read a config naming versions whose files are not all up yet.
            uploads.sort(key=lambda relative: (relative == CONFIG_PBTXT, relative))
            for relative in uploads:
                self._upload(base + relative, local[relative])
            # A config gone locally goes first, so that what is left is never a model with missing files.
            deletions = sorted(remote - local.keys(), key=lambda relative: (relative != CONFIG_PBTXT, relative))
            for relative in deletions:
                self._client.remove_object(self._url.bucket, base + relative)
        if uploads or deletions:
            log.info(
                "mirrored %s to %s: %d uploaded, %d deleted",
                triton_name,
                self._url,
                len(uploads),
                len(deletions),
            )

    def ensure_repository(self) -> None:
        """Create the bucket and the prefix's .keep object unless they exist (once per mirror): what Triton needs
        to start on the repository. Unavailable when the object store fails."""
        if self._repository_ready:
            return
        with self._errors("create the model repository"):
            if not self._client.bucket_exists(self._url.bucket):
                try:
                    self._client.make_bucket(self._url.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                log.info("created bucket %s for the model repository", self._url.bucket)
            keep = self._url.key(KEEP_OBJECT)
            if self._url.prefix and self._stored_sha256(keep) is None:
                self._client.put_object(self._url.bucket, keep, io.BytesIO(), 0)
        self._repository_ready = True

    def _stored_sha256(self, key: str) -> str | None:
        """The sha256 stored with the object ("" if it has none), None if there is no object."""
        try:
            stat = self._client.stat_object(self._url.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise
        value = (stat.metadata or {}).get(f"x-amz-meta-{SHA256_METADATA}")
        return value if isinstance(value, str) else ""

    def _upload(self, key: str, entry: _LocalEntry) -> None:
        metadata: DictType = {SHA256_METADATA: entry.sha256}
        if entry.path is None:
            self._client.put_object(self._url.bucket, key, io.BytesIO(), 0, metadata=metadata)
        else:
            self._client.fput_object(self._url.bucket, key, str(entry.path), metadata=metadata)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        where = f"object store at {self._url.endpoint}"
        try:
            yield
        except S3Error as exc:
            if exc.code in _CREDENTIAL_CODES:
                raise Unavailable(f"{where} refused the model repository's credentials ({exc.code})") from None
            raise Unavailable(f"{where} failed to {what}: {exc.code}") from None
        except (ServerError, InvalidResponseError) as exc:
            raise Unavailable(f"{where} failed to {what}: {exc}") from None
        except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
            log.info("object store unreachable: %s", exc)
            raise Unavailable(f"{where} is unreachable ({type(exc).__name__})") from None
        except MinioException as exc:
            raise Unavailable(f"{where} failed to {what}: {exc}") from None


def _check_model_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise InvalidArgument(f"{name!r} is not a Triton model name")


def _local_tree(directory: Path) -> dict[str, _LocalEntry]:
    """Every file (and empty directory, as "<dir>/") under ``directory`` by its "/"-separated relative path;
    hidden entries (the writer's staging names) left out. Empty when the directory does not exist."""
    out: dict[str, _LocalEntry] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            out[relative.as_posix()] = _LocalEntry(path, sha256_file(path))
        elif path.is_dir() and not any(not child.name.startswith(".") for child in path.iterdir()):
            out[relative.as_posix() + "/"] = _LocalEntry(None, _EMPTY_SHA256)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.serving.s3mirror [--wait SECONDS] URL -- COMMAND...``: create the S3 repository (waiting
    for the object store to answer), then exec COMMAND, normally tritonserver (same process, same pid)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.serving.s3mirror",
        description="Create Triton's S3 model repository (bucket and prefix), then run Triton.",
    )
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the object store")
    parser.add_argument("url", help="s3://host:port/bucket/prefix; credentials from AWS_ACCESS_KEY_ID/..._SECRET_...")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- and the command to exec")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        mirror = S3RepositoryMirror.from_env(args.url)
    except (InvalidArgument, ValueError) as exc:
        parser.error(str(exc))
    deadline = time.monotonic() + args.wait
    while True:
        try:
            mirror.ensure_repository()
            break
        except Unavailable as exc:
            if time.monotonic() >= deadline:
                sys.exit(f"cannot create the model repository {mirror.url} after {args.wait:g}s: {exc}")
            time.sleep(0.5)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.exit(f"cannot start {command[0]}: {exc.strerror or exc}")


if __name__ == "__main__":
    main()
