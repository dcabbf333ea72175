"""The app as a whole (`api.app`): its thread pool and database pool, its startup heap frozen
out of the collector's passes, and a database never migrated answered with 503. The routes'
tests are in tests/api/routes/, one module per route module."""

from __future__ import annotations

import gc
import uuid
from pathlib import Path

import anyio.to_thread
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.app import create_app, freeze_startup_objects
from registry.instance import open_instance
from registry.settings import StrataSettings
from tests.api.conftest import Recorder
from tests.api.helpers import _problem
from tests.conftest import PG_ADMIN_URL


def test_blocking_routes_share_api_threads_threads_and_as_many_pooled_connections(
    tmp_path: Path,
) -> None:
    inst = open_instance(StrataSettings(data_dir=tmp_path, api_threads=12))
    try:
        assert inst.registry.engine.pool.size() == 12  # type: ignore[attr-defined]
        app = create_app(inst, Recorder())

        @app.get("/threads")
        async def threads() -> float:
            return anyio.to_thread.current_default_thread_limiter().total_tokens

        with TestClient(app) as client:  # the lifespan sets the limit of the server's loop
            assert client.get("/threads").json() == 12
    finally:
        inst.registry.close()
    small = open_instance(StrataSettings(data_dir=tmp_path / "small", api_threads=1))
    try:
        assert small.registry.engine.pool.size() == 5  # never fewer than SQLAlchemy's default
    finally:
        small.registry.close()
    with pytest.raises(ValueError, match="api_threads"):
        StrataSettings(data_dir=tmp_path, api_threads=0)


def test_freezing_the_startup_heap_leaves_it_out_of_the_collectors_passes() -> None:
    held = len(gc.get_objects())
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= held // 2  # what the process held is frozen
        assert len(gc.get_objects()) < held // 10  # and no longer scanned by a full pass
    finally:
        gc.unfreeze()  # the rest of the test session collects as before


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_never_migrated_answers_503_saying_to_migrate(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    admin, name = None, f"strata_empty_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
    inst = open_instance(StrataSettings(data_dir=tmp_path, database_url=url), upgrade=False)
    try:
        with TestClient(create_app(inst, Recorder()), raise_server_exceptions=False) as c:
            for r in (
                c.get("/health"),
                c.get("/v1/streams", headers={"Authorization": "Bearer strata_x"}),
            ):
                body = _problem(r, 503)
                assert "strata migrate" in body["detail"] and r.headers["Retry-After"]
    finally:
        inst.close()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
