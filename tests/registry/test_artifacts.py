"""The blob store contract, run against both backends (local directory and S3 via moto)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error
from prometheus_client import REGISTRY

from registry.artifacts import ArtifactStore, LocalStore, MinioStore
from registry.artifacts import base as artifacts_base
from registry.errors import BlobNotFound, IntegrityError, InvalidValue

MISSING = "0" * 64
CorruptBlob = Callable[[ArtifactStore, str, bytes], None]


def raw_read(store: ArtifactStore, digest: str) -> bytes:
    """The stored object as the backend holds it, bypassing the store's API."""
    if isinstance(store, LocalStore):
        return (store.root / "sha256" / digest[:2] / digest).read_bytes()
    assert isinstance(store, MinioStore)
    response = store.client.get_object(store.bucket, f"sha256/{digest[:2]}/{digest}")
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def test_bytes_round_trip(artifact_store: ArtifactStore) -> None:
    data = b"adapter weights, or anything else"
    digest = artifact_store.put_bytes(data)

    assert digest == hashlib.sha256(data).hexdigest()
    assert artifact_store.exists(digest)
    assert artifact_store.size(digest) == len(data)
    assert artifact_store.get_bytes(digest) == data
    assert raw_read(artifact_store, digest) == data  # key layout sha256/<2 hex>/<digest>


def test_empty_blob_round_trip(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    digest = artifact_store.put_bytes(b"")

    assert digest == hashlib.sha256(b"").hexdigest()
    assert artifact_store.size(digest) == 0
    assert artifact_store.get_bytes(digest) == b""
    assert artifact_store.get_file(digest, tmp_path / "empty").read_bytes() == b""


def test_puts_are_idempotent_and_never_rewrite(
    artifact_store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1000)
    source = tmp_path / "blob.txt"
    source.write_bytes(data)
    digest = artifact_store.put_bytes(data)

    def no_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("an existing object was rewritten")

    monkeypatch.setattr(artifact_store, "_write_bytes", no_write)
    monkeypatch.setattr(artifact_store, "_write_file", no_write)
    assert artifact_store.put_bytes(data) == digest
    assert artifact_store.put_file(source) == digest
    assert artifact_store.get_bytes(digest) == data


def test_file_round_trip_5mb(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(5_000_000)
    source = tmp_path / "weights.safetensors"
    source.write_bytes(data)

    digest = artifact_store.put_file(source)
    dest = artifact_store.get_file(digest, tmp_path / "out" / "copy.bin")

    assert digest == hashlib.sha256(data).hexdigest()
    assert artifact_store.size(digest) == len(data)
    assert dest == tmp_path / "out" / "copy.bin"
    assert dest.read_bytes() == data
    assert leftovers(dest.parent) == []
    assert artifact_store.put_bytes(data) == digest


def test_get_file_replaces_existing_dest(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    digest = artifact_store.put_bytes(b"new")
    dest = tmp_path / "file.txt"
    dest.write_bytes(b"old content")

    artifact_store.get_file(digest, dest)

    assert dest.read_bytes() == b"new"


def test_local_store_streams_without_holding_the_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "blobs")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024))

    tracemalloc.start()
    try:
        digest = store.put_file(source)
        store.get_file(digest, tmp_path / "copy.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 3 * 1024 * 1024  # chunks of 1 MiB, never the 8 MiB file
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


def test_minio_multipart_round_trip(minio_client: Minio, tmp_path: Path) -> None:
    store = MinioStore(
        endpoint="unused",
        access_key="testing",
        secret_key="testing",
        bucket="strata-test-multipart",
        client=minio_client,
        part_size=5 * 1024 * 1024,
    )
    data = os.urandom(11 * 1024 * 1024)  # three parts
    source = tmp_path / "base.safetensors"
    source.write_bytes(data)

    digest = store.put_file(source)

    assert store.size(digest) == len(data)
    assert store.get_file(digest, tmp_path / "copy").read_bytes() == data


class _Calls:
    """Records which of a MinIO client's request methods a store calls, and how each ends."""

    def __init__(self, client: Minio, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[str] = []
        for name in ("_put_object", "put_object", "stat_object", "copy_object"):
            monkeypatch.setattr(client, name, self._wrap(name, getattr(client, name)))

    def _wrap(self, name: str, method: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            try:
                result = method(*args, **kwargs)
            except S3Error as exc:
                self.log.append(f"{name}: {exc.code}")
                raise
            self.log.append(name)
            return result

        return call

    def take(self) -> list[str]:
        log, self.log = self.log, []
        return log


def test_minio_small_blob_is_one_conditional_put(
    artifact_store: ArtifactStore, corrupt_blob: CorruptBlob, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if not isinstance(artifact_store, MinioStore):
        pytest.skip("the conditional create is MinioStore's")
    calls = _Calls(artifact_store.client, monkeypatch)
    data = os.urandom(1024 * 1024)
    source = tmp_path / "small.bin"
    source.write_bytes(data)

    digest = artifact_store.put_file(source)  # new: created in one request, no HEAD first
    assert calls.take() == ["_put_object"]
    assert artifact_store.put_bytes(data) == digest  # stored: the server refuses the create
    # ... and the stored blob counts as used now: a copy onto itself (which the client stats
    # first) renews its modified time for garbage collection
    assert calls.take() == [
        "_put_object: PreconditionFailed", "stat_object", "stat_object", "copy_object",
    ]  # fmt: skip
    assert raw_read(artifact_store, digest) == data

    corrupt_blob(artifact_store, digest, data[:10])  # the wrong size: put back the right bytes
    calls.take()
    assert artifact_store.put_file(source) == digest
    # (put_object, the unconditional write, sends its request through _put_object)
    assert calls.take() == [
        "_put_object: PreconditionFailed",
        "stat_object",
        "_put_object",
        "put_object",
    ]
    assert raw_read(artifact_store, digest) == data


def test_minio_store_rejects_tiny_parts(minio_client: Minio) -> None:
    with pytest.raises(InvalidValue) as err:
        MinioStore(
            endpoint="unused",
            access_key="testing",
            secret_key="testing",
            bucket="strata-test-parts",
            client=minio_client,
            part_size=1024,
        )
    assert err.value.field == "part_size"


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "abc",
        "../etc/passwd",
        "../" * 21 + "x",
        "A" * 64,
        "g" * 64,
        "0" * 63,
        "0" * 65,
        "0" * 64 + "\n",
        "sha256/00/" + "0" * 64,
        None,
    ],
)
def test_malformed_digests_are_refused(
    artifact_store: ArtifactStore, tmp_path: Path, digest: str
) -> None:
    calls = [
        lambda: artifact_store.get_bytes(digest),
        lambda: artifact_store.get_file(digest, tmp_path / "dest"),
        lambda: artifact_store.exists(digest),
        lambda: artifact_store.size(digest),
    ]
    for call in calls:
        with pytest.raises(InvalidValue) as err:
            call()
        assert err.value.field == "digest"
    assert not (tmp_path / "dest").exists()
    assert leftovers(tmp_path) == []


def test_missing_blob(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    assert not artifact_store.exists(MISSING)
    with pytest.raises(BlobNotFound):
        artifact_store.get_bytes(MISSING)
    with pytest.raises(BlobNotFound):
        artifact_store.size(MISSING)
    with pytest.raises(BlobNotFound) as err:
        artifact_store.get_file(MISSING, tmp_path / "dest")
    assert err.value.field == "digest"
    assert not (tmp_path / "dest").exists()
    assert leftovers(tmp_path) == []


def test_corruption_is_detected_on_read(
    artifact_store: ArtifactStore, corrupt_blob: CorruptBlob, tmp_path: Path
) -> None:
    victim = artifact_store.put_bytes(b"the real content")
    bystander = artifact_store.put_bytes(b"another blob")
    corrupt_blob(artifact_store, victim, b"THE REAL CONTENT")  # same size: only the hash tells
    dest = tmp_path / "dest.txt"
    dest.write_bytes(b"previous")

    with pytest.raises(IntegrityError):
        artifact_store.get_bytes(victim)
    with pytest.raises(IntegrityError):
        artifact_store.get_file(victim, dest)
    with pytest.raises(IntegrityError):
        artifact_store.get_file(victim, tmp_path / "fresh")

    assert dest.read_bytes() == b"previous"  # untouched
    assert not (tmp_path / "fresh").exists()
    assert leftovers(tmp_path) == []
    assert artifact_store.get_bytes(bystander) == b"another blob"


def test_put_repairs_an_object_of_the_wrong_size(
    artifact_store: ArtifactStore, corrupt_blob: CorruptBlob
) -> None:
    digest = artifact_store.put_bytes(b"complete content")
    corrupt_blob(artifact_store, digest, b"compl")  # truncated

    assert artifact_store.put_bytes(b"complete content") == digest
    assert artifact_store.get_bytes(digest) == b"complete content"


def test_file_changed_after_hashing_is_not_stored(
    artifact_store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 6 MiB, over the test MinioStore's part size (5 MiB). MinioStore reads a file of one part
    # or less once, so what it hashes is what it sends; a larger file is hashed in a first pass
    # and streamed in a second, and that is the case checked here.
    size = 6 * 1024 * 1024
    source = tmp_path / "a.bin"
    source.write_bytes(os.urandom(size))
    stale_digest = hashlib.sha256(os.urandom(size)).hexdigest()  # what the first pass saw
    monkeypatch.setattr(artifacts_base, "hash_file", lambda path: (stale_digest, size))

    with pytest.raises(IntegrityError):
        artifact_store.put_file(source)

    assert not artifact_store.exists(stale_digest)


def test_bytes_moved_are_counted_by_backend(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    """`strata_artifact_{uploaded,downloaded}_bytes_total{store}`: blobs written (a blob
    already stored costs no upload), small and multipart, and blobs read, whole or to a file."""
    store = artifact_store.backend
    assert store == ("local" if isinstance(artifact_store, LocalStore) else "minio")

    def moved() -> tuple[float, float]:
        up = REGISTRY.get_sample_value("strata_artifact_uploaded_bytes_total", {"store": store})
        down = REGISTRY.get_sample_value("strata_artifact_downloaded_bytes_total", {"store": store})
        return up or 0.0, down or 0.0

    up0, down0 = moved()
    small = artifact_store.put_bytes(b"x" * 1000)
    artifact_store.put_bytes(b"x" * 1000)  # already stored: nothing sent
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))  # past the minio fixture's part size
    digest = artifact_store.put_file(big)
    artifact_store.put_file(big)
    assert moved() == (up0 + 1000 + 6 * 1024 * 1024, down0)
    assert artifact_store.get_bytes(small) == b"x" * 1000
    artifact_store.get_file(digest, tmp_path / "copy.bin")
    assert moved() == (up0 + 1000 + 6 * 1024 * 1024, down0 + 1000 + 6 * 1024 * 1024)
