"""Cron schedules of a stream: each due time queues one retrain or consolidate job.

The store keeps the cron text and the next due time; the caller (the scheduler in `workers`)
parses cron and computes times. `fire` queues the job and moves `next_run_at` in one
transaction under a row lock, so a due time queues exactly one job even with two schedulers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.entities import Job, JobKind, Schedule, StreamState
from registry.errors import Conflict, InvalidReference, InvalidValue, NotFound
from registry.store import _convert as convert
from registry.store._db import Database
from registry.store.jobs import insert_job
from registry.tables import ScheduleRow, StreamRow, TaskDatasetRow, TaskRow, utcnow

SCHEDULE_KINDS = (JobKind.RETRAIN, JobKind.CONSOLIDATE)


class SqlScheduleStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        *,
        stream_id: int,
        kind: JobKind,
        cron: str,
        next_run_at: datetime,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
    ) -> Schedule:
        kind = _check_kind(kind)
        if kind is JobKind.RETRAIN and task_id is None:
            raise InvalidValue("a retrain schedule needs a task", field="task")
        if kind is JobKind.CONSOLIDATE and task_id is not None:
            raise InvalidValue("a consolidate schedule takes no task", field="task")
        with self._db.tx() as s:
            stream = s.get(StreamRow, stream_id)
            if stream is None or stream.deleted_at is not None:
                raise NotFound(f"stream {stream_id} not found", field="stream")
            if stream.state == StreamState.FAILED.value:
                raise Conflict(f"the import of stream '{stream.name}' failed", field="stream")
            if task_id is not None:
                task = s.get(TaskRow, task_id)
                if task is None or task.stream_id != stream_id or task.deleted_at is not None:
                    raise InvalidReference(f"task {task_id} is not in the stream", field="task")
            row = ScheduleRow(
                stream_id=stream_id, kind=kind.value, cron=cron, task_id=task_id,
                params=dict(params or {}), next_run_at=next_run_at,
            )  # fmt: skip
            s.add(row)
            s.flush()
            return convert.schedule(row)

    def get(self, schedule_id: int) -> Schedule:
        with self._db.tx() as s:
            return convert.schedule(_live_row(s, schedule_id))

    def list_schedules(self, *, stream_id: int | None = None) -> list[Schedule]:
        query = select(ScheduleRow).where(ScheduleRow.deleted_at.is_(None)).order_by(ScheduleRow.id)
        if stream_id is not None:
            query = query.where(ScheduleRow.stream_id == stream_id)
        with self._db.tx() as s:
            return [convert.schedule(r) for r in s.scalars(query)]

    def delete(self, schedule_id: int) -> None:
        """Soft delete: the row stays for lineage and audit, and never fires again."""
        with self._db.tx() as s:
            _live_row(s, schedule_id).deleted_at = utcnow()

    def due(self, *, now: datetime, limit: int = 100) -> list[Schedule]:
        query = (
            select(ScheduleRow)
            .where(ScheduleRow.deleted_at.is_(None), ScheduleRow.next_run_at <= now)
            .order_by(ScheduleRow.next_run_at, ScheduleRow.id)
            .limit(limit)
        )
        with self._db.tx() as s:
            return [convert.schedule(r) for r in s.scalars(query)]

    def fire(self, schedule_id: int, *, now: datetime, next_run_at: datetime) -> Job | None:
        """Queue the schedule's job and move it to `next_run_at` (after `now`: missed due
        times collapse into this one run). None when it is not due (any more)."""
        if next_run_at <= now:
            raise InvalidValue("the next run must be after now", field="next_run_at")
        with self._db.tx() as s:
            row = s.get(ScheduleRow, schedule_id, with_for_update=True)
            if row is None or row.deleted_at is not None:
                return None
            if convert.aware(row.next_run_at) > now:
                return None  # another scheduler fired it
            stream = s.get_one(StreamRow, row.stream_id)
            if stream.deleted_at is not None or stream.state == StreamState.FAILED.value:
                row.deleted_at = now  # its stream's import failed: it can never run
                return None
            params: dict[str, Any] = {**row.params, "schedule_id": row.id}
            dataset_id = row.params.get("dataset_id")  # a schedule may pin one dataset
            if row.task_id is not None and dataset_id is None:
                # the task's newest data when it fires (the job skips it if already trained)
                newest = s.scalar(
                    select(TaskDatasetRow)
                    .where(TaskDatasetRow.task_id == row.task_id)
                    .order_by(TaskDatasetRow.version.desc())
                    .limit(1)
                )
                if newest is None:
                    dataset_id = s.get_one(TaskRow, row.task_id).dataset_id
                else:
                    dataset_id = newest.dataset_id
                    params["dataset_version"] = newest.version
                params["dataset_id"] = dataset_id
            job = insert_job(
                s, kind=JobKind(row.kind), stream_id=row.stream_id, task_id=row.task_id,
                params=params, dataset_id=dataset_id,
            )  # fmt: skip
            row.last_run_at, row.last_job_id, row.next_run_at = now, job.id, next_run_at
            return convert.job(job)


def _check_kind(kind: object) -> JobKind:
    for value in SCHEDULE_KINDS:
        if kind == value:
            return value
    raise InvalidValue(f"must be one of {[k.value for k in SCHEDULE_KINDS]}", field="kind")


def _live_row(s: Session, schedule_id: int) -> ScheduleRow:
    row = s.get(ScheduleRow, schedule_id)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"schedule {schedule_id} not found", field="schedule")
    return row
