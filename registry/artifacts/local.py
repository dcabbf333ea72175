"""The embedded artifact store: blobs as files under a local directory.

Every write goes to a temporary file in the blob's own directory, is fsynced, then renamed into
place with ``os.replace``, so a reader sees either no blob or a complete one, never a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from registry.artifacts.base import CHUNK_SIZE, ArtifactStore, blob_not_found, fsync_path
from registry.errors import IntegrityError, Unavailable

logger = logging.getLogger(__name__)


class LocalStore(ArtifactStore):
    """Content-addressed blobs under ``root`` (created if missing)."""

    backend = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def ping(self) -> None:
        if not self.root.is_dir():
            raise Unavailable("the artifact directory is missing")

    def _path(self, key: str) -> Path:
        # Keys come from blob_key(), which only accepts validated hex digests.
        return self.root / key

    def _stat(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def _write_bytes(self, key: str, data: bytes) -> None:
        def write(out: BinaryIO) -> None:
            out.write(data)

        self._atomic_write(key, write)

    def _write_file(self, key: str, path: Path, *, digest: str, size: int) -> None:
        def copy(out: BinaryIO) -> None:
            sha = hashlib.sha256()
            copied = 0
            with path.open("rb") as src:
                while chunk := src.read(CHUNK_SIZE):
                    sha.update(chunk)
                    out.write(chunk)
                    copied += len(chunk)
            if sha.hexdigest() != digest or copied != size:
                raise IntegrityError(f"{path} changed while it was being stored", field="path")

        self._atomic_write(key, copy)

    @contextmanager
    def _chunks(self, key: str) -> Iterator[Iterator[bytes]]:
        try:
            f = self._path(key).open("rb")
        except FileNotFoundError:
            raise blob_not_found(key) from None
        with f:
            yield iter(lambda: f.read(CHUNK_SIZE), b"")

    def _open_chunks(self, key: str) -> AbstractContextManager[Iterator[bytes]]:
        return self._chunks(key)

    def _list(self, prefix: str) -> Iterator[tuple[str, int, datetime]]:
        base = self._path(prefix.rstrip("/"))
        for path in sorted(base.glob("*/*")) if base.is_dir() else []:
            if path.name.startswith(".tmp-"):  # a write in progress (or one that died)
                continue
            with contextlib.suppress(FileNotFoundError):  # removed since it was listed
                st = path.stat()
                yield path.relative_to(self.root).as_posix(), st.st_size, _time(st.st_mtime)

    def _modified(self, key: str) -> datetime | None:
        try:
            return _time(self._path(key).stat().st_mtime)
        except FileNotFoundError:
            return None

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        fsync_path(self._path(key).parent)

    def _freshen(self, key: str) -> bool:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            return False
        return True

    def _atomic_write(self, key: str, fill: Callable[[BinaryIO], None]) -> None:
        """Write via ``fill`` to a temp file next to the target, fsync, rename into place."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            tmp.chmod(0o444)  # blobs are immutable; replacing one is a rename, still allowed
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(target.parent)


def _time(mtime: float) -> datetime:
    return datetime.fromtimestamp(mtime, UTC)
