"""measured states: the prompt format of a dataset, the adapters of an evaluated state

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 09:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL on rows written before: the dataset's blob holds (or implies) its format, and an
    # evaluation's adapters are its adapter version and what that version depends on.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt_template", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("completion_template", sa.Text(), nullable=True))
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_column("adapter_ids")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("completion_template")
        batch_op.drop_column("prompt_template")
