"""Directories (adapters, tokenizers, base snapshots) as content-addressed trees.

A tree is one blob per file plus a canonical JSON manifest blob::

    {"files": {"adapter_config.json": {"digest": "...", "size": 123}, ...},
     "kind": "strata.tree/v1"}

and is named by the manifest's digest. Only files that load without running code are accepted
(an allow-list of suffixes; pickle-based formats are refused by name), every ``.safetensors`` file
is validated when stored and again when fetched, and manifest paths are checked before anything is
written, so a tree can never place a file outside its destination.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

from registry.artifacts.base import CHUNK_SIZE, ArtifactStore, check_digest, fsync_path
from registry.artifacts.weights import validate_safetensors
from registry.errors import IntegrityError, InvalidValue, UnsafeArtifact

logger = logging.getLogger(__name__)

FETCH_THREADS = 4
"""Files of a tree fetched at once: a snapshot stored per tensor is hundreds of files, and
fetched one at a time each waits on its own round trip."""

TREE_KIND = "strata.tree/v1"
ALLOWED_SUFFIXES = frozenset({".json", ".safetensors", ".txt", ".model", ".jinja", ".md"})
"""Formats that are plain data: JSON configs, weights, tokenizer files, templates, docs."""
ALLOWED_NAMES = frozenset(
    {"merges.txt", "vocab.json", "vocab.txt", "tokenizer.json", "tokenizer.model", "LICENSE"}
)
"""Files accepted by exact name (the common tokenizer files, and a suffix-less LICENSE)."""
PICKLE_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib", ".dill"}
)
"""Formats that can run code when loaded; named so that the refusal says why."""


class TreeFile(TypedDict):
    digest: str
    size: int


class TreeManifest(TypedDict):
    kind: str
    files: dict[str, TreeFile]


def check_tree_path(rel: object) -> str:
    """Return ``rel`` if it is a safe, allowed relative POSIX path; UnsafeArtifact otherwise."""
    if not isinstance(rel, str) or not rel:
        raise UnsafeArtifact("path must be a non-empty string", field=repr(rel))
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise UnsafeArtifact("control character in path", field=repr(rel))
    if "\\" in rel:
        raise UnsafeArtifact("backslash in path", field=rel)
    if rel.startswith("/"):
        raise UnsafeArtifact("absolute path", field=rel)
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise UnsafeArtifact("empty, '.' or '..' path component", field=rel)
    name = rel.rsplit("/", 1)[-1]
    suffix = PurePosixPath(name).suffix.lower()
    if name in ALLOWED_NAMES or suffix in ALLOWED_SUFFIXES:
        return rel
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeArtifact(
            f"{suffix} files are pickle-based and could run code when loaded; "
            "save the weights as .safetensors",
            field=rel,
        )
    raise UnsafeArtifact(f"file type {suffix or name!r} is not in the allow-list", field=rel)


def put_tree(
    store: ArtifactStore, directory: Path, *, reuse: Mapping[str, TreeFile] | None = None
) -> str:
    """Store every file under ``directory`` and its manifest; return the manifest digest.

    ``reuse`` lists files of a stored tree (path -> entry, as a manifest has them) that the new
    tree keeps without their bytes passing through here: a derived tree (a snapshot that changes
    a few tensors of its parent) writes only its new files. A file of ``directory`` replaces a
    reused entry at the same path; every reused blob must already be in the store.

    Everything is checked (paths, file types, symlinks, safetensors, reused blobs) before the
    first upload, so a refused directory leaves nothing behind.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidValue(f"{directory} is not a directory", field="directory")
    found = _walk(directory)
    new_paths = {rel for rel, _ in found}
    kept = {
        check_tree_path(rel): _check_entry(rel, dict(entry))
        for rel, entry in (reuse or {}).items()
        if rel not in new_paths
    }
    if not found and not kept:
        raise InvalidValue(f"{directory} has no files", field="directory")
    for rel, path in found:
        check_tree_path(rel)
        if rel.endswith(".safetensors"):
            validate_safetensors(path, name=rel)
    for rel, entry in kept.items():
        if not store.exists(entry["digest"]):
            raise InvalidValue(f"reused blob {entry['digest']} is not stored", field=rel)
    _check_no_nesting({**kept, **{rel: {"digest": "", "size": 0} for rel, _ in found}})
    files: dict[str, TreeFile] = dict(kept)
    for rel, path in found:
        digest = store.put_file(path)
        files[rel] = {"digest": digest, "size": store.size(digest)}
    manifest: TreeManifest = {"kind": TREE_KIND, "files": files}
    digest = store.put_bytes(_canonical_json(manifest))
    logger.info(
        "stored tree %s from %s (%d files, %d reused)", digest, directory, len(files), len(kept)
    )
    return digest


def read_manifest(store: ArtifactStore, digest: str) -> TreeManifest:
    """Fetch and validate the manifest of tree ``digest``.

    Raises InvalidValue (``field="manifest"``) if the blob is not a tree manifest and
    UnsafeArtifact if one of its paths is unsafe or not allowed.
    """
    raw = store.get_bytes(digest)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidValue(f"blob {digest} is not JSON", field="manifest") from exc
    if not isinstance(data, dict) or data.get("kind") != TREE_KIND:
        raise InvalidValue(f"blob {digest} is not a {TREE_KIND} manifest", field="manifest")
    entries = data.get("files")
    if not isinstance(entries, dict):
        raise InvalidValue("'files' must be an object", field="manifest")
    files = {check_tree_path(rel): _check_entry(rel, entry) for rel, entry in entries.items()}
    _check_no_nesting(files)
    return {"kind": TREE_KIND, "files": files}


def get_tree(
    store: ArtifactStore,
    digest: str,
    dest: Path,
    *,
    manifest: TreeManifest | None = None,
    tee: Callable[[str, bytes], None] | None = None,
    on_verified: Callable[[], None] | None = None,
) -> Path:
    """Materialize tree ``digest`` at ``dest`` (which must not exist or be an empty directory).

    Files are fetched, verified and validated into a staging directory next to ``dest``, made
    durable together, and the directory is renamed into place at the end: ``dest`` ends up with
    the whole tree or is left untouched. Files come in the order of their paths.

    For a caller that passes the content on while it arrives (a download served from the store):
    ``tee(path, chunk)`` gets every file's bytes in path order, those of a file fetched while
    it is its turn as they are written (before their digest is checked), and ``on_verified()``
    is called once every file matched its digest and was validated, before the copy is made
    durable. ``manifest``, when the caller has already read it (`read_manifest`), saves reading
    it again.
    """
    if manifest is None:
        manifest = read_manifest(store, digest)
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise InvalidValue(f"{dest} must not exist or be an empty directory", field="dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    files = sorted(manifest["files"].items())
    try:
        if FETCH_THREADS <= 1 or len(files) == 1:
            for rel, entry in files:
                _fetch_file(store, rel, entry, staging,
                            tee=None if tee is None else partial(tee, rel))  # fmt: skip
        elif tee is None:
            _fetch_at_once(store, files, staging)
        else:
            _fetch_in_order(store, files, staging, tee)
        if on_verified is not None:
            on_verified()
        _sync_tree(staging)
        staging.chmod(0o755)
        _rename_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(dest.parent)
    logger.info("fetched tree %s into %s (%d files)", digest, dest, len(manifest["files"]))
    return dest


def _fetch_file(
    store: ArtifactStore,
    rel: str,
    entry: TreeFile,
    staging: Path,
    *,
    tee: Callable[[bytes], None] | None = None,
) -> None:
    target = staging.joinpath(*rel.split("/"))
    store.get_file(entry["digest"], target, durable=False, tee=tee)
    if target.stat().st_size != entry["size"]:
        raise IntegrityError(f"{rel} has the wrong size", field=rel)
    if rel.endswith(".safetensors"):
        validate_safetensors(target, name=rel)


def _fetch_at_once(store: ArtifactStore, files: list[tuple[str, TreeFile]], staging: Path) -> None:
    """`FETCH_THREADS` files at a time; the first failure cancels the files not yet begun and
    is raised once those under way have stopped."""
    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="get-tree") as pool:
        futures = [pool.submit(_fetch_file, store, rel, entry, staging) for rel, entry in files]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _fetch_in_order(
    store: ArtifactStore,
    files: list[tuple[str, TreeFile]],
    staging: Path,
    tee: Callable[[str, bytes], None],
) -> None:
    """Each file's bytes to `tee` in path order, while `FETCH_THREADS - 1` threads fetch the
    files after it. A file already fetched (and verified) is read back from `staging`; one that
    no thread has begun is fetched here, its bytes passed on as they arrive."""
    with ThreadPoolExecutor(FETCH_THREADS - 1, thread_name_prefix="get-tree") as pool:
        ahead = [pool.submit(_fetch_file, store, rel, entry, staging) for rel, entry in files[1:]]
        try:
            for i, (rel, entry) in enumerate(files):
                if i == 0 or ahead[i - 1].cancel():
                    _fetch_file(store, rel, entry, staging, tee=partial(tee, rel))
                    continue
                ahead[i - 1].result()
                with staging.joinpath(*rel.split("/")).open("rb") as fetched:
                    while chunk := fetched.read(CHUNK_SIZE):
                        tee(rel, chunk)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _sync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first) under ``root``, and ``root``."""
    folders = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            folders.append(path)
        else:
            fsync_path(path)
    for folder in reversed(folders):
        fsync_path(folder)


def _rename_into_place(staging: Path, dest: Path) -> None:
    try:
        os.replace(staging, dest)  # replaces a missing or empty directory, nothing else
    except OSError as exc:
        if dest.exists():  # another process materialized it since our check
            raise InvalidValue(f"{dest} was created meanwhile", field="dest") from exc
        raise


def _walk(directory: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``directory`` as (relative POSIX path, path), sorted.

    Symlinks (to files or directories) and special files are refused rather than followed.
    """
    found: list[tuple[str, Path]] = []

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(directory, onerror=fail):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise UnsafeArtifact("symlinks are refused", field=rel)
            if stat.S_ISREG(mode):
                found.append((rel, path))
            elif not stat.S_ISDIR(mode):
                raise UnsafeArtifact("not a regular file", field=rel)
    return sorted(found)


def _check_entry(rel: str, entry: Any) -> TreeFile:
    if not isinstance(entry, dict):
        raise InvalidValue(f"entry for {rel!r} must be an object", field="manifest")
    digest, size = entry.get("digest"), entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidValue(f"entry for {rel!r} has a bad size {size!r}", field="manifest")
    return {"digest": check_digest(digest), "size": size}


def _check_no_nesting(files: dict[str, TreeFile]) -> None:
    """Refuse a path that is also used as a directory by another (``a.json`` and ``a.json/b``)."""
    directories = {str(parent) for rel in files for parent in PurePosixPath(rel).parents}
    for rel in files:
        if rel in directories:
            raise UnsafeArtifact("path is both a file and a directory", field=rel)


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
