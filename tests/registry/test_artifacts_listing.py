"""What garbage collection needs from a blob store, on both backends: listing blobs with their
last-used time, a put of stored content renewing that time, and a delete that keeps a blob
used since a cutoff."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime, timedelta

from registry.artifacts import ArtifactStore, LocalStore


def _wait_for_next_second() -> None:
    """S3 states modified times to the second: let one pass so that a later write is later."""
    time.sleep(1.05 - (time.time() % 1))


def test_lists_every_blob_with_size_and_modified_time(artifact_store: ArtifactStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    blobs = [os.urandom(n) for n in (0, 10, 1000)]
    digests = {artifact_store.put_bytes(b) for b in blobs}

    listed = {b.digest: b for b in artifact_store.list_blobs()}

    assert set(listed) == digests
    assert {listed[hashlib.sha256(b).hexdigest()].size for b in blobs} == {0, 10, 1000}
    assert all(before <= b.modified <= datetime.now(UTC) + timedelta(seconds=2)
               for b in listed.values())  # fmt: skip


def test_listing_skips_what_is_not_a_blob(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(tmp_path / "blobs")
    digest = store.put_bytes(b"kept")
    (tmp_path / "blobs" / "sha256" / digest[:2] / ".tmp-123.part").write_bytes(b"half")
    (tmp_path / "blobs" / "sha256" / digest[:2] / "notes.txt").write_bytes(b"not a digest")

    assert [b.digest for b in store.list_blobs()] == [digest]


def test_delete_removes_a_blob_unused_since_the_cutoff(artifact_store: ArtifactStore) -> None:
    digest = artifact_store.put_bytes(b"garbage")
    _wait_for_next_second()
    cutoff = datetime.now(UTC)

    assert artifact_store.delete_unless_used_since(digest, cutoff) is True
    assert not artifact_store.exists(digest)
    assert artifact_store.delete_unless_used_since(digest, cutoff) is False  # gone: nothing to do


def test_a_put_of_stored_content_keeps_the_blob_from_deletion(
    artifact_store: ArtifactStore,
) -> None:
    """The race gc must lose: a blob listed as old and unused is stored again (the same
    content: the put writes nothing) before gc deletes it. The put renews its time."""
    data = b"the same content again"
    digest = artifact_store.put_bytes(data)
    _wait_for_next_second()
    cutoff = datetime.now(UTC)
    listed = next(b for b in artifact_store.list_blobs() if b.digest == digest)
    assert listed.modified < cutoff  # gc would pick it
    _wait_for_next_second()

    assert artifact_store.put_bytes(data) == digest  # a new upload finds it stored

    assert artifact_store.delete_unless_used_since(digest, cutoff) is False
    assert artifact_store.get_bytes(digest) == data
