"""A whole Strata instance: embedded (SQLite + directory) or server (PostgreSQL + S3)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio import Minio

from registry.artifacts import LocalStore, MinioStore
from registry.db import make_engine
from registry.instance import Instance
from registry.store import SqlRegistry
from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, fresh_database


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
