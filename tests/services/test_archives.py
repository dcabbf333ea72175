"""Downloads of stored trees: tar and tar.gz archives streamed from the verified local copy, or
while the tree is fetched into it."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import registry.artifacts.trees as trees
from registry.artifacts import ArtifactStore, put_tree, read_manifest
from registry.artifacts.base import CHUNK_SIZE
from registry.errors import IntegrityError
from registry.instance import Instance
from services.archives import QUEUED_CHUNKS, tree_archive
from services.trees import fetch_tree, tree_cache_path


def _tree(root: Path) -> dict[str, bytes]:
    """Files of awkward sizes: empty, one byte, one whole block, more than one read chunk (the
    store validates .safetensors files, so random bytes go in .txt files)."""
    files = {
        "adapter_config.json": b'{"r": 8}',
        "empty.txt": b"",
        "one.txt": b"x",
        "block.md": bytes(range(256)) * 2,  # exactly 512
        "weights/large.txt": os.urandom(CHUNK_SIZE + 12_345),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _members(archive: bytes) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info)
            out[info.name] = None if f is None else f.read()
    return out


MTIME = 1_790_000_000


def _stored(instance: Instance, tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    (tmp_path / "src").mkdir()
    files = _tree(tmp_path / "src")
    return put_tree(instance.artifacts, tmp_path / "src"), files


def _leftovers(instance: Instance) -> list[str]:
    """Staging folders and partial files the fetch may have left in the cache."""
    trees = instance.cache_dir / "trees"
    return (
        sorted(p.name for p in trees.rglob("*") if p.name.endswith(".part"))
        if trees.exists()
        else []
    )


@pytest.mark.parametrize("format", ["tar", "tar.gz"])
def test_an_archive_holds_the_tree_and_is_the_same_whether_fetched_or_read_from_the_copy(
    instance: Instance, tmp_path: Path, format: str
) -> None:
    digest, files = _stored(instance, tmp_path)
    copy = tree_cache_path(instance, digest)

    cold = tree_archive(instance, digest, name="news-topic-v1", format=format, mtime=MTIME)  # type: ignore[arg-type]
    assert not copy.exists()
    body = b"".join(cold.chunks())
    assert copy.is_dir() and _leftovers(instance) == []  # fetched into the cache meanwhile
    warm = tree_archive(instance, digest, name="news-topic-v1", format=format, mtime=MTIME)  # type: ignore[arg-type]
    assert b"".join(warm.chunks()) == body  # deterministic: the same bytes from the copy

    assert cold.filename == f"news-topic-v1.{format}"
    if format == "tar":
        assert cold.media_type == "application/x-tar"
        assert cold.size == warm.size == len(body)  # announced before the first byte
        assert len(body) % tarfile.RECORDSIZE == 0  # whole records, as tarfile writes them
    else:
        assert cold.media_type == "application/gzip" and cold.size is None
        assert gzip.decompress(body)[:100].startswith(b"news-topic-v1")
    members = _members(body)
    assert {k: v for k, v in members.items() if v is not None} == {
        f"news-topic-v1/{rel}": data for rel, data in files.items()
    }
    folders = [k for k, v in members.items() if v is None]
    assert folders == ["news-topic-v1", "news-topic-v1/weights"]
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert {m.mtime for m in tar.getmembers()} == {MTIME}
    # the system's tar reads it too, and restores the tree byte for byte
    if shutil.which("tar"):
        (tmp_path / "out").mkdir()
        saved = tmp_path / f"a.{format}"
        saved.write_bytes(body)
        subprocess.run(["tar", "-xf", str(saved), "-C", str(tmp_path / "out")], check=True)
        for rel, data in files.items():
            assert (tmp_path / "out" / "news-topic-v1" / rel).read_bytes() == data


def test_a_long_name_and_an_archive_of_many_files_keep_their_length(
    instance: Instance, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    long_dir = src / ("d" * 120)
    long_dir.mkdir(parents=True)
    for i in range(30):
        (long_dir / f"{'f' * 80}{i}.txt").write_bytes(os.urandom(i * 37))
    digest = put_tree(instance.artifacts, src)
    archive = tree_archive(instance, digest, name="ü-name")  # non-ASCII: a PAX header
    body = b"".join(archive.chunks())
    assert archive.size == len(body)
    members = _members(body)
    assert (
        members[f"ü-name/{'d' * 120}/{'f' * 80}29.txt"]
        == (long_dir / f"{'f' * 80}29.txt").read_bytes()
    )


@pytest.mark.parametrize("fetch_threads", [1, 4])  # 1: the damaged file is sent as it arrives
def test_a_corrupt_blob_cuts_the_archive_short_of_its_end_and_leaves_no_copy(
    instance: Instance,
    tmp_path: Path,
    corrupt_blob: Callable[[ArtifactStore, str, bytes], None],
    monkeypatch: pytest.MonkeyPatch,
    fetch_threads: int,
) -> None:
    monkeypatch.setattr(trees, "FETCH_THREADS", fetch_threads)
    digest, files = _stored(instance, tmp_path)
    large = read_manifest(instance.artifacts, digest)["files"]["weights/large.txt"]["digest"]
    data = bytearray(files["weights/large.txt"])
    data[-1] ^= 0xFF  # the same size: only the digest tells
    corrupt_blob(instance.artifacts, large, bytes(data))
    archive = tree_archive(instance, digest, name="t")
    assert archive.size is not None
    sent = bytearray()
    with pytest.raises(IntegrityError):
        for chunk in archive.chunks():
            sent += chunk
    # every byte of the damaged file may have gone out, but not the archive's end
    assert len(sent) < archive.size
    assert not tree_cache_path(instance, digest).exists() and _leftovers(instance) == []


def test_a_download_that_stops_early_stops_the_fetch_and_leaves_nothing(
    instance: Instance, tmp_path: Path
) -> None:
    digest, _ = _stored(instance, tmp_path)
    archive = tree_archive(instance, digest, name="t")
    chunks = archive.chunks()
    next(chunks), next(chunks)  # the client reads a little, then goes away
    chunks.close()
    assert [t.name for t in threading.enumerate() if t.name.startswith("fetch-")] == []
    assert not tree_cache_path(instance, digest).exists() and _leftovers(instance) == []
    assert b"".join(tree_archive(instance, digest, name="t").chunks())  # a later one works


def test_a_copy_put_in_place_meanwhile_is_read_instead(instance: Instance, tmp_path: Path) -> None:
    digest, files = _stored(instance, tmp_path)
    archive = tree_archive(instance, digest, name="t")  # decided on fetching: no copy yet
    fetch_tree(instance, digest)  # a worker fetches it first
    members = _members(b"".join(archive.chunks()))
    assert members["t/weights/large.txt"] == files["weights/large.txt"]
    assert b"".join(tree_archive(instance, digest, name="t").chunks())


def test_the_fetch_holds_at_most_a_few_chunks_ahead_of_a_slow_client(
    instance: Instance, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.txt").write_bytes(os.urandom((QUEUED_CHUNKS + 8) * CHUNK_SIZE))
    digest = put_tree(instance.artifacts, tmp_path / "src")
    chunks = tree_archive(instance, digest, name="t").chunks()
    next(chunks), next(chunks)  # the header, then the first chunk; the client then waits
    staged = instance.cache_dir / "trees"
    for _ in range(50):  # the thread fills the queue, then blocks
        threading.Event().wait(0.02)
    written = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
    # the bytes written so far: what was sent, what is queued, and at most one chunk in hand
    assert written <= (QUEUED_CHUNKS + 3) * CHUNK_SIZE < (QUEUED_CHUNKS + 8) * CHUNK_SIZE
    assert len(b"".join(chunks)) > (QUEUED_CHUNKS + 7) * CHUNK_SIZE


def test_a_damaged_local_copy_stops_the_stream_rather_than_sending_a_short_file(
    instance: Instance, tmp_path: Path
) -> None:
    digest, _ = _stored(instance, tmp_path)
    copy = fetch_tree(instance, digest)
    archive = tree_archive(instance, digest, name="t")
    with (copy / "weights" / "large.txt").open("r+b") as f:
        f.truncate(100)
    with pytest.raises(IntegrityError, match="changed while it was archived"):
        b"".join(archive.chunks())


def test_an_unknown_format_is_refused(instance: Instance, tmp_path: Path) -> None:
    digest, _ = _stored(instance, tmp_path)
    with pytest.raises(ValueError, match="zip"):
        tree_archive(instance, digest, name="t", format="zip")  # type: ignore[arg-type]
