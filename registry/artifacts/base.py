"""The content-addressed blob store interface shared by every backend.

A blob is stored under ``sha256/<first 2 hex>/<digest>``, where ``digest`` is the SHA-256 of its
content. The public methods live here, once: they validate digests (which also keeps every key
inside the store's directory or bucket), hash, verify on read and skip writes of blobs that are
already present. Backends only move bytes (``_stat``, ``_write_bytes``, ``_write_file``,
``_open_chunks``), so both backends share one behaviour and one test suite.

The bytes each process moves are counted here too, by backend (`strata_artifact_uploaded_bytes`
and `strata_artifact_downloaded_bytes`, README "Metrics"): blobs actually written (a blob that
was already stored costs no upload) and blobs read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from prometheus_client import Counter

from registry.errors import BlobNotFound, IntegrityError
from registry.validation import check_digest

logger = logging.getLogger(__name__)

BLOB_PREFIX = "sha256/"
_DIGEST = re.compile("[0-9a-f]{64}")
CHUNK_SIZE = 1024 * 1024
"""Bytes read or written at a time when streaming (files are never read whole)."""

UPLOADED = Counter(
    "strata_artifact_uploaded_bytes", "Bytes of blobs written to the artifact store", ["store"]
)
DOWNLOADED = Counter(
    "strata_artifact_downloaded_bytes", "Bytes of blobs read from the artifact store", ["store"]
)


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob as a listing shows it: `modified` is when it was last written or reused."""

    digest: str
    size: int
    modified: datetime


def blob_key(digest: str) -> str:
    """The store-relative key of a blob: ``sha256/<first 2 hex>/<digest>``."""
    check_digest(digest)
    return f"{BLOB_PREFIX}{digest[:2]}/{digest}"


def hash_file(path: Path) -> tuple[str, int]:
    """Stream ``path`` once; return its sha256 hex digest and size in bytes."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def fsync_path(path: Path) -> None:
    """Make a file's content, or a directory's entries (a rename, a new file), durable (POSIX;
    a no-op where a directory cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if Path(path).is_dir():  # e.g. Windows cannot open directories
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


BlobGuard = Callable[[str], AbstractContextManager[object]]
"""Excludes, across processes, a put's reuse of blob ``digest`` and gc's removal of it."""


class ArtifactStore(ABC):
    """Immutable content-addressed blobs, keyed by the sha256 of their content."""

    backend: ClassVar[str] = "other"
    """The `store` label of this backend's metrics."""
    _guard: BlobGuard | None = None

    def set_guard(self, guard: BlobGuard) -> None:
        """Coordinate reuses and removals of a blob through ``guard`` (an `Instance` sets the
        registry's leases): without it, a put that reuses a blob between gc's last look at it and
        its removal would count on a blob that is gone."""
        self._guard = guard

    # -- public API -------------------------------------------------------------------------

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256 hex digest. Idempotent."""
        digest = hashlib.sha256(data).hexdigest()
        if self._create_bytes(blob_key(digest), data):
            UPLOADED.labels(self.backend).inc(len(data))
            logger.debug("stored blob %s (%d bytes)", digest, len(data))
        return digest

    def put_file(self, path: Path) -> str:
        """Store the file at ``path`` without reading it whole; return its digest. Idempotent.

        The file is hashed in a first streamed pass; the backend re-hashes while copying and
        raises IntegrityError (storing nothing) if the file changed in between.
        """
        path = Path(path)
        digest, size = hash_file(path)
        key = blob_key(digest)
        if self._should_write(key, size):
            self._write_file(key, path, digest=digest, size=size)
            UPLOADED.labels(self.backend).inc(size)
            logger.debug("stored blob %s from %s (%d bytes)", digest, path, size)
        return digest

    def get_bytes(self, digest: str) -> bytes:
        """Return the content of blob ``digest``, verified against the digest.

        Raises BlobNotFound if absent and IntegrityError if the stored content does not match.
        """
        key = blob_key(digest)
        sha = hashlib.sha256()
        parts: list[bytes] = []
        try:
            with self._open_chunks(key) as chunks:
                for chunk in chunks:
                    sha.update(chunk)
                    parts.append(chunk)
        finally:
            DOWNLOADED.labels(self.backend).inc(sum(map(len, parts)))
        _check_match(digest, sha.hexdigest())
        return b"".join(parts)

    def get_file(
        self,
        digest: str,
        dest: Path,
        *,
        durable: bool = True,
        tee: Callable[[bytes], None] | None = None,
    ) -> Path:
        """Stream blob ``digest`` to ``dest`` (replaced atomically), verified; return ``dest``.

        The content goes to a temporary file next to ``dest`` and is renamed over it only once its
        digest matched; on any failure the temporary file is removed and ``dest`` is untouched.
        ``durable=False`` leaves out the fsyncs, for a caller that makes several files durable
        at once. ``tee`` is handed each chunk once it is written, before the digest is checked.
        """
        key = blob_key(digest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        read = 0
        try:
            sha = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self._open_chunks(key) as chunks:
                for chunk in chunks:
                    read += len(chunk)
                    sha.update(chunk)
                    out.write(chunk)
                    if tee is not None:
                        tee(chunk)
                _check_match(digest, sha.hexdigest())
                if durable:
                    out.flush()
                    os.fsync(out.fileno())
            tmp.chmod(0o644)  # mkstemp made it private to us
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            DOWNLOADED.labels(self.backend).inc(read)
        if durable:
            fsync_path(dest.parent)
        return dest

    def exists(self, digest: str) -> bool:
        """Whether blob ``digest`` is stored (its content is not verified)."""
        return self._stat(blob_key(digest)) is not None

    def size(self, digest: str) -> int:
        """The stored size of blob ``digest`` in bytes; BlobNotFound if absent."""
        key = blob_key(digest)
        size = self._stat(key)
        if size is None:
            raise blob_not_found(digest)
        return size

    def ping(self) -> None:
        """Return if the store answers; `Unavailable` if it does not."""
        self._stat(blob_key("0" * 64))

    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every stored blob (anything else under the store's prefix is not listed)."""
        for key, size, modified in self._list(BLOB_PREFIX):
            digest = key.rsplit("/", 1)[-1]
            if _DIGEST.fullmatch(digest) and key == f"{BLOB_PREFIX}{digest[:2]}/{digest}":
                yield BlobInfo(digest, size, modified)

    def delete_unless_used_since(self, digest: str, cutoff: datetime) -> bool:
        """Remove blob ``digest`` unless it was written or reused at or after ``cutoff``, as the
        store says now (a put of the same content since it was listed keeps it); whether it
        was removed. Only garbage collection deletes blobs (`services.gc`)."""
        key = blob_key(digest)
        with self._guarded(digest):
            modified = self._modified(key)
            if modified is None or modified >= cutoff:
                return False
            self._delete(key)
        logger.info("removed blob %s (last used %s)", digest, modified.isoformat())
        return True

    # -- backend primitives -----------------------------------------------------------------

    @abstractmethod
    def _stat(self, key: str) -> int | None:
        """Size of the object at ``key``, or None if there is none."""

    @abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None:
        """Create (or atomically replace) the object at ``key`` with ``data``."""

    @abstractmethod
    def _write_file(self, key: str, path: Path, *, digest: str, size: int) -> None:
        """Stream ``path`` to ``key``; IntegrityError, storing nothing, if it no longer hashes
        to ``digest`` (the file changed after it was hashed)."""

    @abstractmethod
    def _open_chunks(self, key: str) -> AbstractContextManager[Iterator[bytes]]:
        """Open the object at ``key`` as an iterator of chunks; BlobNotFound if absent."""

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[tuple[str, int, datetime]]:
        """(key, size, last modified) of every object whose key starts with ``prefix``."""

    @abstractmethod
    def _modified(self, key: str) -> datetime | None:
        """When the object at ``key`` was last written or freshened; None if there is none."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove the object at ``key`` (no error if it is already gone)."""

    @abstractmethod
    def _freshen(self, key: str) -> bool:
        """Mark the object at ``key`` as used now (its modified time); False if it is gone."""

    # -- helpers ----------------------------------------------------------------------------

    def _create_bytes(self, key: str, data: bytes) -> bool:
        """Store ``data`` at ``key`` unless an intact object is there; whether it wrote.

        This asks first and writes second. A backend that can create an object only if the key
        is free, in one request, overrides it to save the round trip.
        """
        if not self._should_write(key, len(data)):
            return False
        self._write_bytes(key, data)
        return True

    def _guarded(self, digest: str) -> AbstractContextManager[object]:
        return (self._guard or _guarded_none)(digest)

    def _should_write(self, key: str, size: int) -> bool:
        """False if the object is already there (objects are immutable, never rewritten).

        An object of the wrong size is corrupt for sure; since the key pins the content, putting
        the right bytes back repairs it without changing what the key means.
        """
        stored = self._stat(key)
        if stored is None:
            return True
        if stored == size:
            # A put that finds its content stored reuses it: the blob counts as written now, so
            # a garbage collection that listed it as old and unused does not remove it (see
            # `delete_unless_used_since`); gone meanwhile, it is written again.
            with self._guarded(key.rsplit("/", 1)[-1]):
                return not self._freshen(key)
        logger.warning("blob %s has %d bytes instead of %d; repairing it", key, stored, size)
        return True


def _guarded_none(_digest: str) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


def _check_match(expected: str, actual: str) -> None:
    if actual != expected:
        logger.error("blob %s is corrupt: its content hashes to %s", expected, actual)
        raise IntegrityError(f"stored content hashes to {actual}, not {expected}", field="digest")


def blob_not_found(key: str) -> BlobNotFound:
    """The error a backend raises for a missing object ``key`` (a key or a bare digest)."""
    return BlobNotFound(f"no blob {key.rsplit('/', 1)[-1]}", field="digest")
