"""The server artifact store: blobs as objects in a MinIO (or any S3) bucket.

A blob that fits in one request (at most ``part_size`` bytes) is read once, hashed, and sent as
one conditional PUT (``If-None-Match: *``): the server creates the object only if the key is
free, so an existing blob is never rewritten and no existence check (a HEAD, one more round trip)
comes first. The bytes sent are the bytes hashed, so the key always names what was stored. (A
server that ignores the header, such as a MinIO older than 2024, rewrites the same bytes.)

Larger files are checked for first, then streamed in parts through a hashing reader, so a file
that changed after ``put_file`` hashed it is caught (the object is removed again and
IntegrityError raised). Downloads stream the response in chunks; the base class verifies the
digest.

A store that stops answering is never waited on for long: every connect and read gives up after
``timeout_s``, and an operation that failed for a transient reason (no connection, a timeout, a
5xx) is tried again with exponential backoff and jitter for up to ``retry_s`` of sleeps
(`registry.backoff`) before it raises `Unavailable`. Workers are patient (`STRATA_STORE_RETRY_S`,
2 minutes), the API is not (`STRATA_API_STORE_RETRY_S`: its clients are waiting). A store that
is down when the process starts is not fatal: the bucket is checked again on the next use.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.datatypes import Object
from minio.error import S3Error, ServerError
from urllib3.exceptions import HTTPError

from registry.artifacts.base import CHUNK_SIZE, ArtifactStore, blob_not_found
from registry.backoff import backoff
from registry.errors import IntegrityError, InvalidValue, Unavailable

T = TypeVar("T")

logger = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024
"""S3's smallest multipart part (except the last)."""
DEFAULT_PART_SIZE = 16 * 1024 * 1024
"""Bytes per multipart part; the client holds about one part per upload thread in memory."""
_MAX_PARTS = 10_000
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})
_TAKEN_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
"""A conditional create was refused: the key holds an object (or another upload is writing
one)."""
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})
"""S3 errors that say "try again later" rather than "this request is wrong"."""
DEFAULT_TIMEOUT_S = 5.0


class _HashingReader:
    """A read-only stream over ``raw`` that hashes and counts what it hands out."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._sha.update(data)
        self.count += len(data)
        return data

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _transient(exc: Exception) -> bool:
    """A failure that another try may not meet: the store unreachable, slow or overloaded."""
    if isinstance(exc, HTTPError | ServerError):
        return True
    return isinstance(exc, S3Error) and exc.code in _TRANSIENT_CODES


def http_client(*, timeout_s: float, secure: bool) -> urllib3.PoolManager:
    """minio's own client, but bounded: connects and reads give up after `timeout_s` (minio's
    default is 5 minutes each), and urllib3 does not retry by itself (its retries came 0.2 s
    apart, with no backoff): `MinioStore` retries with backoff instead."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=0, redirect=0, raise_on_status=False),
    )


class MinioStore(ArtifactStore):
    """Content-addressed blobs in ``bucket`` (created if missing).

    Pass ``client`` to reuse a configured :class:`minio.Minio`; ``endpoint``, the keys, ``secure``,
    ``region`` and ``timeout_s`` are then not used to build one. ``retry_s`` bounds the sleeps
    between tries of an operation that failed for a transient reason (0: one try).
    """

    backend = "minio"

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        client: Minio | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry_s: float = 0.0,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise InvalidValue(f"must be at least {MIN_PART_SIZE} bytes", field="part_size")
        self.client = client or Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
            http_client=http_client(timeout_s=timeout_s, secure=secure),
        )  # fmt: skip
        self.bucket = bucket
        self.part_size = part_size
        self.retry_s = retry_s
        self._region = region
        self._bucket_ready = False
        try:
            self._ensure_bucket()
        except Unavailable as exc:  # not fatal: checked again on the next use
            logger.warning("%s; the bucket is checked again on the next use", exc.reason)

    def __repr__(self) -> str:
        return f"MinioStore(bucket={self.bucket!r})"

    def ping(self) -> None:
        """One try at the bucket (`Unavailable` if the store does not answer in time)."""
        self._call("health check", lambda: self.client.bucket_exists(self.bucket), retry_s=0)

    def _call(self, operation: str, fn: Callable[[], T], *, retry_s: float | None = None) -> T:
        """`fn()`, tried again after a transient failure with backoff for up to `retry_s`
        (the store's own by default) of sleeps; then `Unavailable`: the caller may retry later,
        and nothing half-written is ever registered (blobs go before rows)."""
        delays = backoff(budget_s=self.retry_s if retry_s is None else retry_s)
        tries = 0
        while True:
            tries += 1
            try:
                return fn()
            except (HTTPError, S3Error, ServerError) as exc:
                if not _transient(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise Unavailable(
                        f"the object store is unavailable ({operation}, {tries} tries): {exc}"
                    ) from exc
                logger.warning("object store %s failed (%s); retrying in %.1f s", operation,
                               exc, delay)  # fmt: skip
                time.sleep(delay)

    def _ensure_bucket(self) -> None:
        if not self._bucket_ready:
            self._call("bucket check", self._make_bucket)
            self._bucket_ready = True

    def _make_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket, location=self._region)
                logger.info("created bucket %s", self.bucket)
        except S3Error as exc:
            # Another process created it between our check and our request.
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    def put_file(self, path: Path) -> str:
        """Store the file at ``path``; return its digest. Idempotent.

        A file of at most ``part_size`` bytes is read once and stored like ``put_bytes`` (the
        client would hold that one part in memory anyway); a larger one is streamed.
        """
        path = Path(path)
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= self.part_size:
                data = f.read(size + 1)  # not part_size + 1: read(n) allocates n bytes first
                if len(data) <= size:  # all of it: the file did not grow meanwhile
                    return self.put_bytes(data)
        return super().put_file(path)

    def _create_bytes(self, key: str, data: bytes) -> bool:
        if len(data) > self.part_size:
            return super()._create_bytes(key, data)
        self._ensure_bucket()
        try:
            # minio's put_object turns unknown headers into user metadata, so the conditional
            # create goes through the single-request call put_object makes.
            self._call("upload", lambda: self.client._put_object(
                self.bucket, key, data,
                headers={"Content-Type": "application/octet-stream", "If-None-Match": "*"},
            ))  # fmt: skip
            return True
        except S3Error as exc:
            if exc.code not in _TAKEN_CODES:
                raise
        # Something is stored under the key: keep it, unless it is the wrong size (see
        # _should_write: the right bytes repair it).
        return super()._create_bytes(key, data)

    def _stat_object(self, key: str) -> Object | None:
        self._ensure_bucket()
        try:
            return self._call("stat", lambda: self.client.stat_object(self.bucket, key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise

    def _stat(self, key: str) -> int | None:
        stat = self._stat_object(key)
        return None if stat is None else int(stat.size or 0)

    def _modified(self, key: str) -> datetime | None:
        stat = self._stat_object(key)
        return None if stat is None else stat.last_modified

    def _list(self, prefix: str) -> Iterator[tuple[str, int, datetime]]:
        self._ensure_bucket()
        objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
        for obj in self._call("list", lambda: iter(objects)):
            if obj.object_name and obj.last_modified:
                yield obj.object_name, int(obj.size or 0), obj.last_modified

    def _delete(self, key: str) -> None:
        self._call("delete", lambda: self.client.remove_object(self.bucket, key))

    def _freshen(self, key: str) -> bool:
        # S3 has no "touch": copying the object onto itself with new metadata renews its
        # modified time, inside the store (no bytes pass through here).
        used = {"strata-used": datetime.now(UTC).isoformat()}
        try:
            self._call("freshen", lambda: self.client.copy_object(
                self.bucket, key, CopySource(self.bucket, key),
                metadata=cast(Any, used), metadata_directive=REPLACE,
            ))  # fmt: skip
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return False
            raise
        return True

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        self._call("upload", lambda: self.client.put_object(
            self.bucket, key, io.BytesIO(data), len(data),
            part_size=self._part_size_for(len(data)),
        ))  # fmt: skip

    def _write_file(self, key: str, path: Path, *, digest: str, size: int) -> None:
        self._ensure_bucket()

        def upload() -> _HashingReader:  # each try reads the file from its start
            with path.open("rb") as f:
                reader = _HashingReader(cast(BinaryIO, f))
                self.client.put_object(
                    self.bucket, key, cast(BinaryIO, reader), size,
                    part_size=self._part_size_for(size),
                )  # fmt: skip
            return reader

        reader = self._call("upload", upload)
        if reader.hexdigest() != digest or reader.count != size:
            # What we uploaded is not what the key names: take it back out.
            self.client.remove_object(self.bucket, key)
            raise IntegrityError(f"{path} changed while it was being stored", field="path")

    @contextmanager
    def _chunks(self, key: str) -> Iterator[Iterator[bytes]]:
        self._ensure_bucket()
        try:
            response = self._call("download", lambda: self.client.get_object(self.bucket, key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise blob_not_found(key) from None
            raise
        try:  # a cut mid-stream is not retried here: the caller has part of the content
            yield response.stream(CHUNK_SIZE)
        except HTTPError as exc:
            raise Unavailable(f"the object store is unavailable (download): {exc}") from exc
        finally:
            response.close()
            response.release_conn()

    def _open_chunks(self, key: str) -> AbstractContextManager[Iterator[bytes]]:
        return self._chunks(key)

    def _part_size_for(self, size: int) -> int:
        # Grow parts for huge objects so that they fit S3's 10,000-part limit.
        return max(self.part_size, -(-size // _MAX_PARTS))
