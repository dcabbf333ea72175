"""Stored trees as tar archives for download, streamed while they are produced.

Nothing is written to a temporary archive or held whole in memory. A tree this process already
holds a verified local copy of is read from that copy. Otherwise the tree is fetched into the
local cache on a thread while its bytes are passed on to the response, so the download runs
alongside the fetch rather than after it; the archive's end is withheld until every file matched
its digest, so a client never receives a whole archive of unverified content (a failure cuts the
response short of its announced length).

A plain `tar` (the default) has a size known before its first byte, so a response can announce it
(`Content-Length`) and a client can show progress. `tar.gz` is offered for those who want it, but
model weights barely compress (about 7% for fp32 or bf16 tensors) and deflate runs at about
20 MB/s on one core: for a large tree it is what limits the download.

Archives are deterministic: the same tree, name and `mtime` give the same bytes, whether they were
read from the local copy or from the store.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import tarfile
import threading
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from registry.artifacts import TreeManifest, get_tree, read_manifest
from registry.artifacts.base import CHUNK_SIZE
from registry.errors import IntegrityError, InvalidValue
from registry.instance import Instance
from services.trees import tree_cache_path

logger = logging.getLogger(__name__)

ArchiveFormat = Literal["tar", "tar.gz"]
ARCHIVE_FORMATS: tuple[ArchiveFormat, ...] = ("tar", "tar.gz")
GZIP_LEVEL = 6  # gzip's own default
QUEUED_CHUNKS = 16  # between the fetching thread and the response: at most ~16 MiB in memory
MEDIA_TYPES: dict[ArchiveFormat, str] = {"tar": "application/x-tar", "tar.gz": "application/gzip"}


@dataclass(frozen=True)
class _Member:
    header: bytes  # the member's tar header block(s)
    rel: str | None  # the file's path in the tree; None for a directory
    size: int


class _Content(Protocol):
    def read(self, rel: str, size: int) -> Iterator[bytes]: ...

    def verified(self) -> None:
        """Return once every file read so far matched its digest (raise if one did not)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class TreeArchive:
    """One stored tree as an archive whose top folder is `name/`; `chunks()` produces it once."""

    name: str
    format: ArchiveFormat
    members: tuple[_Member, ...]
    content: _Content

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.format}"

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def size(self) -> int | None:
        """The archive's exact length in bytes; None for `tar.gz` (known only once compressed)."""
        return _tar_size(self.members) if self.format == "tar" else None

    def chunks(self) -> Generator[bytes]:
        tar = _tar_chunks(self.members, self.content)
        return tar if self.format == "tar" else _gzip(tar)


def tree_archive(
    inst: Instance, digest: str, *, name: str, format: ArchiveFormat = "tar", mtime: int = 0
) -> TreeArchive:
    """The stored tree `digest` as an archive; its files are dated `mtime` (seconds since the
    epoch). A missing tree fails here, before anything is sent."""
    if format not in ARCHIVE_FORMATS:
        raise ValueError(f"unknown archive format {format!r}")
    copy = tree_cache_path(inst, digest)
    content: _Content
    if copy.is_dir():  # whole and verified: it is renamed into place only then
        sizes = {p.relative_to(copy).as_posix(): p.stat().st_size
                 for p in copy.rglob("*") if p.is_file()}  # fmt: skip
        content = _Copy(copy)
    else:
        manifest = read_manifest(inst.artifacts, digest)
        sizes = {rel: entry["size"] for rel, entry in manifest["files"].items()}
        content = _Fetch(inst, digest, manifest, copy)
    return TreeArchive(name, format, _members(name, sizes, mtime=mtime), content)


def _members(name: str, sizes: dict[str, int], *, mtime: int) -> tuple[_Member, ...]:
    """The top folder, then every file in path order, each folder just before its first file."""
    members = [_directory(name, mtime)]
    folders = {""}
    for rel in sorted(sizes):
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder not in folders:
                folders.add(folder)
                members.append(_directory(f"{name}/{folder}", mtime))
        info = tarfile.TarInfo(f"{name}/{rel}")
        info.size, info.mode, info.mtime = sizes[rel], 0o644, mtime
        members.append(_Member(_header(info), rel, sizes[rel]))
    return tuple(members)


def _directory(arcname: str, mtime: int) -> _Member:
    info = tarfile.TarInfo(arcname)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
    return _Member(_header(info), None, 0)


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> int:
    return -size % tarfile.BLOCKSIZE


def _body_size(members: tuple[_Member, ...]) -> int:
    return sum(len(m.header) + m.size + _padding(m.size) for m in members)


def _end_size(body: int) -> int:
    """The end-of-archive marker, padded to whole records as tarfile writes it."""
    end = 2 * tarfile.BLOCKSIZE
    return end + -(body + end) % tarfile.RECORDSIZE


def _tar_size(members: tuple[_Member, ...]) -> int:
    body = _body_size(members)
    return body + _end_size(body)


def _tar_chunks(members: tuple[_Member, ...], content: _Content) -> Generator[bytes]:
    try:
        for member in members:
            yield member.header
            if member.rel is None:
                continue
            yield from content.read(member.rel, member.size)
            if pad := _padding(member.size):
                yield bytes(pad)
        content.verified()  # only then the end, without which the archive is not whole
        yield bytes(_end_size(_body_size(members)))
    finally:
        content.close()


def _gzip(chunks: Iterator[bytes]) -> Generator[bytes]:
    deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    for chunk in chunks:
        if out := deflate.compress(chunk):
            yield out
    yield deflate.flush()


class _Copy:
    """Files of the verified local copy."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def read(self, rel: str, size: int, *, offset: int = 0) -> Iterator[bytes]:
        path = self._root / rel
        copied = offset
        with path.open("rb") as src:
            src.seek(offset)
            while chunk := src.read(min(CHUNK_SIZE, size - copied)):
                copied += len(chunk)
                yield chunk
        if copied != size:  # the copy is never rewritten, but may be damaged
            raise IntegrityError(f"{path} changed while it was archived", field="tree")

    def verified(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Cancelled(Exception):
    """The response stopped early (the client went away, or a file failed): stop fetching."""


_VERIFIED = object()


class _Fetch:
    """The tree fetched into the local cache (`get_tree`) on a thread, its bytes handed over
    through a bounded queue as they are written. The thread starts at the first read."""

    def __init__(self, inst: Instance, digest: str, manifest: TreeManifest, dest: Path) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=QUEUED_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fetch, args=(inst, digest, manifest, dest),
                                        name=f"fetch-{digest[:12]}", daemon=True)  # fmt: skip
        self._copy: _Copy | None = None  # when another process put the copy in place first
        self._verified = False

    def _fetch(self, inst: Instance, digest: str, manifest: TreeManifest, dest: Path) -> None:
        try:
            get_tree(inst.artifacts, digest, dest, manifest=manifest,
                     tee=lambda rel, chunk: self._put((rel, chunk)),
                     on_verified=lambda: self._put(_VERIFIED))  # fmt: skip
        except _Cancelled:
            pass
        except InvalidValue as exc:
            if not dest.is_dir():
                self._offer(exc)
            else:  # a worker or another request put the copy in place meanwhile
                logger.info("tree %s was fetched meanwhile; reading that copy", digest)
                self._offer(dest)
        except BaseException as exc:  # raised in the response, unless it had all it needed
            logger.warning("fetching tree %s into %s failed: %s", digest, dest, exc)
            self._offer(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Cancelled

    def _offer(self, item: object) -> None:
        with contextlib.suppress(_Cancelled):
            self._put(item)

    def _get(self) -> object:
        if self._thread.ident is None:  # the first read
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Path):
            self._copy = _Copy(item)
        return item

    def read(self, rel: str, size: int) -> Iterator[bytes]:
        got = 0
        while got < size and self._copy is None:
            item = self._get()
            if self._copy is not None:
                break
            if not (isinstance(item, tuple) and item[0] == rel):
                raise IntegrityError(f"expected the bytes of {rel}, got {item!r:.80}", field=rel)
            got += len(item[1])
            if got > size:
                raise IntegrityError(f"{rel} is longer than its manifest says", field=rel)
            yield item[1]
        if self._copy is not None and got < size:
            yield from self._copy.read(rel, size, offset=got)

    def verified(self) -> None:
        if self._copy is None and self._get() is not _VERIFIED:
            raise IntegrityError("the fetch ended before every file was verified", field="tree")
        self._verified = True

    def close(self) -> None:
        """Wait until the copy is durable and in place (the client already has every byte), or
        stop the fetch if the response ended before its end."""
        if self._thread.ident is None:
            return
        if not self._verified:
            self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:  # lets a pending put through
                    self._queue.get_nowait()
            self._thread.join(timeout=0.05)  # returns as soon as the thread ends
