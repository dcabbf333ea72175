"""What garbage collection asks of the registry: the rows whose retention has run out are
purged, and every blob a live row names is listed (`services.gc` sweeps the others)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, delete, or_, select, tuple_, union, update
from sqlalchemy.orm import Session

from registry.entities import JobState, Purged, References
from registry.store._db import Database
from registry.tables import (
    AdapterAliasRow,
    AdapterVersionRow,
    DatasetRow,
    EvaluationRow,
    JobEventRow,
    JobRow,
    LineageEdgeRow,
    ScheduleRow,
    SnapshotAliasRow,
    SnapshotRow,
    StreamRow,
    TaskDatasetRow,
    TaskRow,
    utcnow,
)

OPEN_JOBS = (JobState.QUEUED.value, JobState.RUNNING.value)


class SqlGcStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def purge_expired(self, *, retention_days: float) -> Purged:
        """Remove every stream deleted more than `retention_days` ago with all its rows, and
        the artifact of every adapter version deleted that long ago (its row stays: the live
        stream's evaluations and lineage name it; it can no longer be restored); then every
        dataset no task or version uses any more. One transaction: all of it or none."""
        cutoff = utcnow() - timedelta(days=retention_days)
        with self._db.tx() as s:
            streams = list(s.scalars(select(StreamRow).where(
                StreamRow.deleted_at.is_not(None), StreamRow.deleted_at < cutoff)))  # fmt: skip
            names = [row.deleted_name or row.name for row in streams]
            for row in streams:
                _purge_stream(s, row.id)
            versions = list(s.scalars(select(AdapterVersionRow).where(
                AdapterVersionRow.deleted_at.is_not(None), AdapterVersionRow.deleted_at < cutoff,
                AdapterVersionRow.artifact_digest.is_not(None))))  # fmt: skip
            for version in versions:
                version.artifact_digest = None
            datasets = _purge_unused_datasets(s)
        return Purged(streams=names, adapter_versions=len(versions), datasets=datasets)

    def references(self) -> References:
        """The digests live rows name: trees (snapshots, adapter versions, the checkpoints of
        jobs that may still resume) and plain blobs (datasets). Rows soft-deleted but not yet
        purged are live: they can be restored."""
        with self._db.tx() as s:
            trees = set(s.scalars(select(SnapshotRow.artifact_digest)))
            trees |= set(s.scalars(select(AdapterVersionRow.artifact_digest).where(
                AdapterVersionRow.artifact_digest.is_not(None))))  # fmt: skip
            trees |= set(s.scalars(select(JobRow.checkpoint_digest).where(
                JobRow.checkpoint_digest.is_not(None), JobRow.state.in_(OPEN_JOBS))))  # fmt: skip
            blobs = set(s.scalars(select(DatasetRow.digest)))
        return References(trees=frozenset(trees), blobs=frozenset(blobs))


def _ids(s: Session, query: Select[Any]) -> list[int]:
    return list(s.scalars(query))


def _purge_stream(s: Session, stream_id: int) -> None:
    """Every row of the stream, children before parents (the foreign keys say the order)."""
    tasks = _ids(s, select(TaskRow.id).where(TaskRow.stream_id == stream_id))
    jobs = _ids(s, select(JobRow.id).where(JobRow.stream_id == stream_id))
    snapshots = _ids(s, select(SnapshotRow.id).where(SnapshotRow.stream_id == stream_id))
    adapters = _ids(s, select(AdapterVersionRow.id).where(
        AdapterVersionRow.stream_id == stream_id))  # fmt: skip
    s.execute(delete(EvaluationRow).where(EvaluationRow.stream_id == stream_id))
    s.execute(delete(AdapterAliasRow).where(AdapterAliasRow.task_id.in_(tasks)))
    s.execute(delete(ScheduleRow).where(ScheduleRow.stream_id == stream_id))
    s.execute(delete(AdapterVersionRow).where(AdapterVersionRow.stream_id == stream_id))
    s.execute(delete(SnapshotAliasRow).where(SnapshotAliasRow.stream_id == stream_id))
    s.execute(update(SnapshotRow).where(SnapshotRow.stream_id == stream_id).values(parent_id=None))
    s.execute(delete(SnapshotRow).where(SnapshotRow.stream_id == stream_id))
    s.execute(delete(JobEventRow).where(JobEventRow.job_id.in_(jobs)))
    s.execute(delete(JobRow).where(JobRow.stream_id == stream_id))
    s.execute(delete(TaskDatasetRow).where(TaskDatasetRow.task_id.in_(tasks)))
    s.execute(delete(TaskRow).where(TaskRow.stream_id == stream_id))
    s.execute(delete(StreamRow).where(StreamRow.id == stream_id))
    _delete_edges(s, [("snapshot", snapshots), ("adapter", adapters), ("job", jobs)])


def _purge_unused_datasets(s: Session) -> int:
    used = union(select(TaskRow.dataset_id), select(TaskDatasetRow.dataset_id),
                 select(AdapterVersionRow.dataset_id))  # fmt: skip
    unused = _ids(s, select(DatasetRow.id).where(DatasetRow.id.not_in(used)))
    s.execute(delete(DatasetRow).where(DatasetRow.id.in_(unused)))
    _delete_edges(s, [("dataset", unused)])
    return len(unused)


def _delete_edges(s: Session, nodes: Sequence[tuple[str, list[int]]]) -> None:
    """The lineage edges from or to any of `nodes` (kind, ids)."""
    keys = [(kind, id_) for kind, ids in nodes for id_ in ids]
    for start in range(0, len(keys), 500):  # bounded IN lists
        chunk = keys[start : start + 500]
        s.execute(delete(LineageEdgeRow).where(or_(
            tuple_(LineageEdgeRow.child_kind, LineageEdgeRow.child_id).in_(chunk),
            tuple_(LineageEdgeRow.parent_kind, LineageEdgeRow.parent_id).in_(chunk),
        )))  # fmt: skip
