"""Shared registry fixtures: an in-process S3 server (moto) standing in for MinIO."""

from __future__ import annotations

import io
import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from minio import Minio
from moto.server import ThreadedMotoServer

from registry.artifacts import ArtifactStore, LocalStore, MinioStore, blob_key

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``host:port`` of a moto S3 server running for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        # moto wants credentials in the environment; dummies keep any real ones out of reach.
        mp.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", S3_REGION)
        mp.delenv("AWS_PROFILE", raising=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def minio_client(s3_endpoint: str) -> Minio:
    return Minio(
        s3_endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        secure=False,
        region=S3_REGION,
    )


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
