"""one evaluation per job, task and measured state: a re-run job replaces its cells

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 19:15:00
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNIQUE = "uq_evaluations_measurement"


def measured_key(row: Any) -> str:
    """As `registry.store.evaluations.measured_key`, for rows written before this revision
    (adapter_ids NULL before 0003: the adapter version names the state)."""
    ids = row.adapter_ids
    if isinstance(ids, str):
        ids = json.loads(ids)
    adapters = ",".join(map(str, ids)) if ids is not None else f"v{row.adapter_version_id}"
    text = f"{row.after_position}/{row.snapshot_id}/{adapters}/{row.metric}"
    return hashlib.sha256(text.encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("measured_key", sa.String(length=64), nullable=True))
    conn = op.get_bind()
    names = ("id", "after_position", "snapshot_id", "adapter_version_id", "metric", "job_id",
             "task_id", "measured_key")  # fmt: skip
    columns = [sa.column(name) for name in names]
    table = sa.table("evaluations", *columns, sa.column("adapter_ids", sa.JSON()))
    rows = conn.execute(sa.select(table).order_by(table.c.id)).all()
    newest: dict[tuple[Any, ...], int] = {}
    for row in rows:
        key = measured_key(row)
        conn.execute(table.update().where(table.c.id == row.id).values(measured_key=key))
        if row.job_id is not None:  # a job's re-run measured the same cell again: keep the last
            newest[(row.job_id, row.task_id, key)] = row.id
    keep = set(newest.values())
    stale = [r.id for r in rows if r.job_id is not None and r.id not in keep]
    for start in range(0, len(stale), 500):
        conn.execute(table.delete().where(table.c.id.in_(stale[start : start + 500])))
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.alter_column("measured_key", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(UNIQUE, ["job_id", "task_id", "measured_key"])


def downgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_constraint(UNIQUE, type_="unique")
        batch_op.drop_column("measured_key")
