"""Garbage collection in the registry: purging what outlived its retention, and the digests
live rows name (on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from registry.entities import JobKind, JobState
from registry.store import SqlRegistry
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
)
from tests.registry.store.helpers import D1, D2, D3, _dataset, _stream, _trained

D4, D5, D6 = "d" * 64, "e" * 64, "f" * 64
TABLES = [StreamRow, SnapshotRow, SnapshotAliasRow, TaskRow, TaskDatasetRow, JobRow, JobEventRow,
          ScheduleRow, AdapterVersionRow, AdapterAliasRow, EvaluationRow, LineageEdgeRow,
          DatasetRow]  # fmt: skip


def _counts(reg: SqlRegistry) -> dict[str, int]:
    with reg.engine.connect() as c:
        return {t.__tablename__: c.scalar(select(func.count()).select_from(t)) or 0 for t in TABLES}


def _backdate(reg: SqlRegistry, table: type, row_id: int, days: float) -> None:
    with reg.engine.begin() as c:
        c.execute(update(table).where(table.id == row_id)  # type: ignore[attr-defined]
                  .values(deleted_at=datetime.now(UTC) - timedelta(days=days)))  # fmt: skip


def _full_stream(reg: SqlRegistry, name: str, dataset_digest: str) -> int:
    """A stream with every kind of row: two tasks, a fold, aliases, evaluations, a schedule,
    job events, a second dataset version, lineage."""
    stream_id, v0 = _stream(reg, name)
    ta, ja, va = _trained(reg, stream_id, v0, "a")
    tb, _jb, vb = _trained(reg, stream_id, v0, "b", deps=[va.id])
    v1 = reg.streams.add_snapshot(stream_id=stream_id, artifact_digest=D4, source={},
                                  parent_id=v0, folded_adapter_ids=[va.id, vb.id])  # fmt: skip
    reg.adapters.set_alias(task_id=ta.id, alias="production", version_id=va.id)
    reg.evaluations.record(stream_id=stream_id, after_position=0, task_id=ta.id, snapshot_id=v1.id,
                           metric="accuracy", value=0.5, num_examples=2,
                           adapter_version_id=va.id, job_id=ja.id)  # fmt: skip
    reg.jobs.add_event(ja.id, level="info", message="hello")
    reg.schedules.create(stream_id=stream_id, kind=JobKind.RETRAIN, cron="@daily",
                         next_run_at=datetime.now(UTC), task_id=tb.id)  # fmt: skip
    ds = reg.tasks.add_dataset(digest=dataset_digest, format="jsonl", num_train=3, num_test=1,
                               size_bytes=10)  # fmt: skip
    with reg.engine.begin() as c:  # a second dataset version of task a
        c.execute(TaskDatasetRow.__table__.insert().values(task_id=ta.id, version=2,
                                                           dataset_id=ds.id))  # fmt: skip
    return stream_id


def test_an_expired_stream_is_purged_with_every_row_and_nothing_else(
    registry: SqlRegistry,
) -> None:
    keep = _full_stream(registry, "kept", D5)
    before = _counts(registry)
    gone = _full_stream(registry, "gone", D6)
    registry.streams.delete(gone)
    _backdate(registry, StreamRow, gone, days=8)

    purged = registry.gc.purge_expired(retention_days=7)

    assert purged.streams == ["gone"]
    assert purged.datasets == 1  # D6, used by the purged stream only (D2 is shared)
    assert _counts(registry) == before  # exactly the purged stream's rows went
    assert registry.streams.get_by_id(keep).name == "kept"
    assert registry.tasks.get_dataset(D2).digest == D2
    assert registry.gc.purge_expired(retention_days=7).streams == []  # nothing left to purge


def test_a_recent_deletion_is_kept_and_restorable(registry: SqlRegistry) -> None:
    gone = _full_stream(registry, "s", D5)
    registry.streams.delete(gone)
    _backdate(registry, StreamRow, gone, days=6)

    assert registry.gc.purge_expired(retention_days=7).streams == []
    assert registry.streams.restore("s", retention_days=7).id == gone


def test_an_expired_adapter_version_loses_its_artifact_and_keeps_its_row(
    registry: SqlRegistry,
) -> None:
    stream_id, v0 = _stream(registry)
    task, _job, version = _trained(registry, stream_id, v0, "a")
    registry.adapters.delete(version.id)
    _backdate(registry, AdapterVersionRow, version.id, days=8)
    assert D3 in registry.gc.references().trees

    purged = registry.gc.purge_expired(retention_days=7)

    assert purged.adapter_versions == 1
    assert D3 not in registry.gc.references().trees
    with registry.engine.connect() as c:
        row = c.execute(select(AdapterVersionRow).where(AdapterVersionRow.id == version.id)).one()
    assert row.artifact_digest is None and row.task_id == task.id


def test_references_name_live_trees_datasets_and_resumable_checkpoints(
    registry: SqlRegistry,
) -> None:
    stream_id, v0 = _stream(registry)  # snapshot D1
    _task, first, _version = _trained(registry, stream_id, v0, "a")  # dataset D2, adapter D3
    registry.jobs.claim(first.id, worker="w")
    registry.jobs.transition(first.id, JobState.SUCCEEDED)
    running = registry.tasks.submit(stream_id=stream_id, name="b", dataset_id=_dataset(registry))[1]
    registry.jobs.claim(running.id, worker="w")
    registry.jobs.set_checkpoint(running.id, digest=D5, step=1)
    registry.jobs.transition(running.id, JobState.SUCCEEDED)
    resumable = registry.tasks.submit(stream_id=stream_id, name="c",
                                      dataset_id=_dataset(registry))[1]  # fmt: skip
    registry.jobs.claim(resumable.id, worker="w")
    registry.jobs.set_checkpoint(resumable.id, digest=D4, step=1)

    refs = registry.gc.references()

    assert refs.trees == {D1, D3, D4}  # a finished job's checkpoint is garbage
    assert refs.blobs == {D2}
