"""Downloads of stored trees: streamed tar and tar.gz archives of the verified local copy."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from registry.artifacts import put_tree
from registry.errors import IntegrityError
from registry.instance import Instance
from workers.archives import CHUNK_SIZE, tree_archive


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


@pytest.mark.parametrize("format", ["tar", "tar.gz"])
def test_an_archive_holds_the_tree_under_its_name_and_tar_announces_its_exact_length(
    instance: Instance, tmp_path: Path, format: str
) -> None:
    (tmp_path / "src").mkdir()
    files = _tree(tmp_path / "src")
    digest = put_tree(instance.artifacts, tmp_path / "src")

    archive = tree_archive(instance, digest, name="news-topic-v1", format=format)  # type: ignore[arg-type]
    body = b"".join(archive.chunks())

    assert archive.filename == f"news-topic-v1.{format}"
    if format == "tar":
        assert archive.media_type == "application/x-tar" and archive.size == len(body)
        assert len(body) % tarfile.RECORDSIZE == 0  # whole records, as tarfile writes them
    else:
        assert archive.media_type == "application/gzip" and archive.size is None
        assert gzip.decompress(body)[:100].startswith(b"news-topic-v1")
    members = _members(body)
    assert {k: v for k, v in members.items() if v is not None} == {
        f"news-topic-v1/{rel}": data for rel, data in files.items()
    }
    folders = [k for k, v in members.items() if v is None]
    assert folders == ["news-topic-v1", "news-topic-v1/weights"]
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


def test_a_damaged_local_copy_stops_the_stream_rather_than_sending_a_short_file(
    instance: Instance, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    _tree(tmp_path / "src")
    digest = put_tree(instance.artifacts, tmp_path / "src")
    archive = tree_archive(instance, digest, name="t")
    cached = instance.cache_dir / "trees" / digest / "weights" / "large.txt"
    with cached.open("r+b") as f:
        f.truncate(100)
    with pytest.raises(IntegrityError, match="changed while it was archived"):
        b"".join(archive.chunks())


def test_an_unknown_format_is_refused(instance: Instance, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    _tree(tmp_path / "src")
    digest = put_tree(instance.artifacts, tmp_path / "src")
    with pytest.raises(ValueError, match="zip"):
        tree_archive(instance, digest, name="t", format="zip")  # type: ignore[arg-type]
