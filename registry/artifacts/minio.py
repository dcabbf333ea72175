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
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, cast

from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError

from registry.artifacts.base import CHUNK_SIZE, ArtifactStore, blob_not_found
from registry.errors import IntegrityError, InvalidValue, Unavailable

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


@contextmanager
def _reachable(operation: str) -> Iterator[None]:
    """Connection failures (after the client's own retries) as `Unavailable`: the caller may
    retry later; nothing half-written is ever registered (blobs go before rows)."""
    try:
        yield
    except HTTPError as exc:
        raise Unavailable(f"the object store is unavailable ({operation}): {exc}") from exc


class MinioStore(ArtifactStore):
    """Content-addressed blobs in ``bucket`` (created if missing).

    Pass ``client`` to reuse a configured :class:`minio.Minio`; ``endpoint``, the keys, ``secure``
    and ``region`` are then not used to build one.
    """

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
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise InvalidValue(f"must be at least {MIN_PART_SIZE} bytes", field="part_size")
        self.client = client or Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )
        self.bucket = bucket
        self.part_size = part_size
        self._ensure_bucket(region)

    def __repr__(self) -> str:
        return f"MinioStore(bucket={self.bucket!r})"

    def _ensure_bucket(self, region: str | None) -> None:
        with _reachable("bucket check"):
            self._make_bucket(region)

    def _make_bucket(self, region: str | None) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket, location=region)
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
        try:
            with _reachable("upload"):
                # minio's put_object turns unknown headers into user metadata, so the
                # conditional create goes through the single-request call put_object makes.
                self.client._put_object(
                    self.bucket, key, data,
                    headers={"Content-Type": "application/octet-stream", "If-None-Match": "*"},
                )  # fmt: skip
            return True
        except S3Error as exc:
            if exc.code not in _TAKEN_CODES:
                raise
        # Something is stored under the key: keep it, unless it is the wrong size (see
        # _should_write: the right bytes repair it).
        return super()._create_bytes(key, data)

    def _stat(self, key: str) -> int | None:
        try:
            with _reachable("stat"):
                stat = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise
        return int(stat.size or 0)

    def _write_bytes(self, key: str, data: bytes) -> None:
        with _reachable("upload"):
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data),
                part_size=self._part_size_for(len(data)),
            )  # fmt: skip

    def _write_file(self, key: str, path: Path, *, digest: str, size: int) -> None:
        with path.open("rb") as f, _reachable("upload"):
            reader = _HashingReader(cast(BinaryIO, f))
            self.client.put_object(
                self.bucket,
                key,
                cast(BinaryIO, reader),
                size,
                part_size=self._part_size_for(size),
            )
        if reader.hexdigest() != digest or reader.count != size:
            # What we uploaded is not what the key names: take it back out.
            self.client.remove_object(self.bucket, key)
            raise IntegrityError(f"{path} changed while it was being stored", field="path")

    @contextmanager
    def _chunks(self, key: str) -> Iterator[Iterator[bytes]]:
        try:
            with _reachable("download"):
                response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise blob_not_found(key) from None
            raise
        try:
            with _reachable("download"):
                yield response.stream(CHUNK_SIZE)
        finally:
            response.close()
            response.release_conn()

    def _open_chunks(self, key: str) -> AbstractContextManager[Iterator[bytes]]:
        return self._chunks(key)

    def _part_size_for(self, size: int) -> int:
        # Grow parts for huge objects so that they fit S3's 10,000-part limit.
        return max(self.part_size, -(-size // _MAX_PARTS))
