"""Shared fixtures: a migrated registry on SQLite and on the PostgreSQL at 127.0.0.1:5432, and
an S3 server on loopback (moto) standing in for MinIO."""

from __future__ import annotations

import io
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from minio import Minio
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, create_engine, text

from registry.artifacts import ArtifactStore, LocalStore, MinioStore, blob_key
from registry.db import make_engine, migrate
from registry.instance import Instance
from registry.store import SqlRegistry
from registry.tables import Base

# One intra-op thread: the tests' models are tiny, and several test processes (Celery workers,
# `strata serve`) run at once; OpenMP threads that outnumber the cores spin-wait on each other
# (a tiny model's training step took 15-35x longer with 2 threads beside another busy process).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the processes tests start
torch.set_num_threads(1)

# The server CI starts; its `test` database is only used to create a throwaway one per run.
PG_ADMIN_URL = os.environ.get("STRATA_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head, dropped at the end."""
    name = f"strata_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate(engine: Engine) -> None:
    names = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


def fresh_database(request: pytest.FixtureRequest, backend: str) -> str:
    """A migrated, empty database URL: a new SQLite file, or the session's PostgreSQL truncated."""
    if backend == "sqlite":
        path = request.getfixturevalue("tmp_path") / "registry.db"
        url = f"sqlite:///{path}"
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        return url
    url = str(request.getfixturevalue("pg_url"))
    engine = make_engine(url)
    _truncate(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty database on each backend in turn."""
    return fresh_database(request, request.param)


@pytest.fixture
def registry(db_url: str) -> Iterator[SqlRegistry]:
    reg = SqlRegistry(make_engine(db_url))
    yield reg
    reg.close()


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


@pytest.fixture(params=["embedded", "server"])
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Instance]:
    """The two deployments users run: SQLite + directory, and PostgreSQL + S3 (moto)."""
    embedded = request.param == "embedded"
    db_url = fresh_database(request, "sqlite" if embedded else "postgresql")
    if embedded:
        artifacts: LocalStore | MinioStore = LocalStore(tmp_path / "artifacts")
    else:
        endpoint: str = request.getfixturevalue("s3_endpoint")
        artifacts = MinioStore(
            client=Minio(endpoint, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY,
                         secure=False, region=S3_REGION),
            endpoint=endpoint, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY,
            bucket=f"strata-{uuid.uuid4().hex[:12]}",
        )  # fmt: skip
    inst = Instance(
        registry=SqlRegistry(make_engine(db_url)),
        artifacts=artifacts,
        cache_dir=tmp_path / "cache",
    )
    yield inst
    inst.close()


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
