"""stream import: a stream's state (importing, ready, failed)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both databases (SQLite >= 3.35 drops columns): a batch operation would
# copy `streams` into a new table, and SQLite cannot drop a table that rows refer to inside the
# migration's transaction.
def upgrade() -> None:
    # every stream written before was imported as it was created: ready
    op.add_column(
        "streams", sa.Column("state", sa.String(length=16), server_default="ready", nullable=False)
    )


def downgrade() -> None:
    op.drop_column("streams", "state")
