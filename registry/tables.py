"""SQLAlchemy 2 table models: the one description of the schema that migrations are checked against.

Rows never leave the store: `registry.store` converts them to the frozen entities of
`registry.entities`. Every table is append-only except state fields (job state, adapter status),
alias pointers and soft-delete stamps.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so Alembic migrations and the models agree on both backends.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere.
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class StreamRow(Base):
    """A stream whose import failed gives its name up to a new stream: it is soft-deleted and
    renamed `<name>~<id>` (see `registry.store.streams`)."""

    __tablename__ = "streams"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    base_source: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[str] = mapped_column(String(32))
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON)
    method_options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    consolidation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # policy
    state: Mapped[str] = mapped_column(String(16), server_default="ready")  # StreamState
    promotion: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # gate; NULL: the defaults
    deleted_name: Mapped[str | None] = mapped_column(String(64))  # its name, while deleted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SnapshotRow(Base):
    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("stream_id", "version"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("streams.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id"))
    artifact_digest: Mapped[str] = mapped_column(String(64))
    source: Mapped[dict[str, Any]] = mapped_column(JSON)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SnapshotAliasRow(Base):
    """Movable pointers per stream; `current` is the snapshot new tasks train on."""

    __tablename__ = "snapshot_aliases"
    __table_args__ = (UniqueConstraint("stream_id", "alias"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("streams.id"))
    alias: Mapped[str] = mapped_column(String(64))
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetRow(Base):
    """A dataset is identified by the sha256 of its canonical JSONL, which is also its blob key."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    format: Mapped[str] = mapped_column(String(32))
    num_train: Mapped[int] = mapped_column(Integer)
    num_test: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list[Any] | None] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    prompt_template: Mapped[str | None] = mapped_column(Text)  # NULL: written before 0003
    completion_template: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TaskRow(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("stream_id", "name"),
        UniqueConstraint("stream_id", "position"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("streams.id"))
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TaskDatasetRow(Base):
    """A task's dataset versions, 1, 2, ... in upload order: version 1 is the dataset the task
    was submitted with; a retrain may train on any of them."""

    __tablename__ = "task_datasets"
    __table_args__ = (UniqueConstraint("task_id", "version"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    version: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_stream_state", "stream_id", "state"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    stream_id: Mapped[int | None] = mapped_column(ForeignKey("streams.id"))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(128))
    checkpoint_digest: Mapped[str | None] = mapped_column(String(64))
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # what a finished job decided
    # A stream runs its state-changing jobs in `order_key` order: 2 * id (submission order), or
    # 2 * id + 1 of the job a job must follow directly (a consolidation a policy queued after a
    # task runs before the tasks submitted meanwhile).
    sequence: Mapped[int | None] = mapped_column(BigInteger)


class LeaseRow(Base):
    """A named lease (`stream:<id>`, `scheduler`): one holder at a time until it expires.

    A worker holds its stream's lease while it runs the stream's job, so the stream's jobs run
    one at a time whatever the broker delivers; the scheduler's leader holds `scheduler`."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiTokenRow(Base):
    """Bearer tokens: only the sha256 of the secret is stored (the secret is random, 256 bits)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell tokens apart
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ScheduleRow(Base):
    """A cron schedule that queues a retrain or consolidate job of a stream when due."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_due", "deleted_at", "next_run_at"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("streams.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    cron: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobEventRow(Base):
    """Append-only log; the autoincrement id is the pagination cursor."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AdapterVersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("task_id", "version"),
        Index("ix_adapter_versions_stream", "stream_id", "task_id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("streams.id"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    version: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    depends_on: Mapped[list[Any]] = mapped_column(JSON)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    artifact_digest: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    tags: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # NULL: none (before 0006)


class AdapterAliasRow(Base):
    __tablename__ = "adapter_aliases"
    __table_args__ = (UniqueConstraint("task_id", "alias"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    alias: Mapped[str] = mapped_column(String(64))
    adapter_version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvaluationRow(Base):
    """One cell of the accuracy matrix: task `task_id` measured after the stream learned the task
    at `after_position` (-1 = the untrained base snapshot, used for forward transfer)."""

    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_stream", "stream_id", "after_position"),
        # a job measures each task on each state once; its re-run replaces the cell
        UniqueConstraint("job_id", "task_id", "measured_key", name="uq_evaluations_measurement"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("streams.id"))
    after_position: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id"))
    adapter_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    # every adapter version of the measured state, oldest task first (NULL: before 0003)
    adapter_ids: Mapped[list[Any] | None] = mapped_column(JSON)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    metric: Mapped[str] = mapped_column(String(32))
    # sha256 of "after_position/snapshot/adapter ids/metric": the cell a job measured
    measured_key: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    num_examples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LineageEdgeRow(Base):
    """child -> parent: the child was derived from (or produced by) the parent."""

    __tablename__ = "lineage_edges"
    __table_args__ = (
        UniqueConstraint(
            "child_kind", "child_id", "parent_kind", "parent_id", "relation", name="uq_lineage_edge"
        ),
        Index("ix_lineage_parent", "parent_kind", "parent_id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    child_kind: Mapped[str] = mapped_column(String(16))
    child_id: Mapped[int] = mapped_column(BigInteger)
    parent_kind: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[int] = mapped_column(BigInteger)
    relation: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookRow(Base):
    """A subscriber: where to POST which events, and the secret their signature uses."""

    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDeliveryRow(Base):
    """The outbox: one row per event and subscriber, written in the transaction of what
    happened, delivered (at least once) by the scheduler's leader with retries and backoff."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
