"""retraining: dataset versions (task_datasets, version 1 = a task's submitted dataset), tags
on adapter versions, a stream's promotion gate, a job's result, and webhooks with their
delivery outbox

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "task_datasets",
        sa.Column("id", Id, nullable=False),
        sa.Column("task_id", Id, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("dataset_id", Id, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_task_datasets_task_id_tasks")
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_task_datasets_dataset_id_datasets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_datasets")),
        sa.UniqueConstraint("task_id", "version", name=op.f("uq_task_datasets_task_id_version")),
    )
    # every task written before has one version: the dataset it was submitted with
    op.execute(
        "INSERT INTO task_datasets (task_id, version, dataset_id, created_at) "
        "SELECT id, 1, dataset_id, created_at FROM tasks"
    )
    op.add_column("adapter_versions", sa.Column("tags", sa.JSON(), nullable=True))
    op.add_column("streams", sa.Column("promotion", sa.JSON(), nullable=True))
    op.add_column("streams", sa.Column("deleted_name", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("result", sa.JSON(), nullable=True))
    op.create_table(
        "webhooks",
        sa.Column("id", Id, nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", Id, nullable=False),
        sa.Column("webhook_id", Id, nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["webhook_id"], ["webhooks.id"], name=op.f("fk_webhook_deliveries_webhook_id_webhooks")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])
    op.create_index(op.f("ix_webhook_deliveries_webhook_id"), "webhook_deliveries", ["webhook_id"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
    op.drop_column("jobs", "result")
    op.drop_column("streams", "deleted_name")
    op.drop_column("streams", "promotion")
    op.drop_column("adapter_versions", "tags")
    op.drop_table("task_datasets")
