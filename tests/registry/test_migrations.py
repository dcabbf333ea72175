"""Alembic is the only source of schema: head must match the models on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from registry.db import make_engine, migrate
from registry.tables import Base


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_head_matches_models(db_url: str) -> None:
    assert _diff(db_url) == []


def test_upgrade_from_empty_downgrade_and_again(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate(engine, "head")
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert _diff(db_url) == []
