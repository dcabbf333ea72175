"""o-lora's `lambda1_norm` default becomes `mean`: o-lora streams and adapter versions written
before keep `sum`, the pooling they were trained with

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = "sum"  # o-lora's default lambda1_norm until this revision

streams = sa.table(
    "streams", sa.column("id"), sa.column("method"), sa.column("method_options", sa.JSON)
)
versions = sa.table(
    "adapter_versions", sa.column("id"), sa.column("method"), sa.column("hyperparams", sa.JSON)
)


def _pinned(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """`options` with `lambda1_norm` set to the old default; None where it is set already."""
    options = dict(options or {})
    if "lambda1_norm" in options:
        return None
    return {**options, "lambda1_norm": BEFORE}


# Rows are rewritten one by one in Python: JSON functions differ between SQLite and PostgreSQL,
# and o-lora rows are few (one per stream, one per trained task).
def upgrade() -> None:
    conn = op.get_bind()
    query = sa.select(streams.c.id, streams.c.method_options).where(streams.c.method == "o-lora")
    for row_id, options in conn.execute(query).all():
        pinned = _pinned(options)
        if pinned is not None:
            conn.execute(
                streams.update().where(streams.c.id == row_id).values(method_options=pinned)
            )
    query = sa.select(versions.c.id, versions.c.hyperparams).where(versions.c.method == "o-lora")
    for row_id, hyperparams in conn.execute(query).all():
        hyper = dict(hyperparams or {})
        pinned = _pinned(hyper.get("method_options"))
        if pinned is not None:
            conn.execute(
                versions.update()
                .where(versions.c.id == row_id)
                .values(hyperparams={**hyper, "method_options": pinned})
            )


def downgrade() -> None:
    # `sum` was the default before: the pinned rows mean what they meant, nothing to undo
    pass
