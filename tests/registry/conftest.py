"""Artifact-store fixtures: each backend in turn, and a way to corrupt what it stores."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from minio import Minio

from registry.artifacts import ArtifactStore, LocalStore, MinioStore, blob_key
from registry.artifacts.minio import MIN_PART_SIZE
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY


@pytest.fixture(params=["local", "minio"])
def artifact_store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """Each artifact-store backend in turn, empty: a directory, then a fresh bucket."""
    if request.param == "local":
        return LocalStore(tmp_path / "blobs")
    client: Minio = request.getfixturevalue("minio_client")
    return MinioStore(
        endpoint="unused",
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        bucket=f"strata-test-{uuid.uuid4().hex[:16]}",
        client=client,
        part_size=MIN_PART_SIZE,  # the tests reach the multipart path with 6 MiB files
    )


def _corrupt(store: ArtifactStore, digest: str, data: bytes) -> None:
    if isinstance(store, LocalStore):
        path = store.root / blob_key(digest)
        path.chmod(0o644)  # blobs are written read-only
        path.write_bytes(data)
    else:
        assert isinstance(store, MinioStore)
        store.client.put_object(store.bucket, blob_key(digest), io.BytesIO(data), len(data))


@pytest.fixture
def corrupt_blob() -> Callable[[ArtifactStore, str, bytes], None]:
    """Overwrite a stored object behind the store's back (disk rot, tampering)."""
    return _corrupt
