"""Artifact-store fixtures: each backend in turn (`corrupt_blob` is in tests/conftest.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from minio import Minio

from registry.artifacts import ArtifactStore, LocalStore, MinioStore
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
