"""Jobs: the database is the source of truth for their state; the broker only carries ids."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from registry.entities import (
    JOB_TRANSITIONS,
    Job,
    JobEvent,
    JobKind,
    JobState,
    NodeKind,
    Relation,
)
from registry.errors import Conflict, InvalidReference, InvalidValue, NotFound
from registry.store import _convert as convert
from registry.store._db import Database, add_edges, ref
from registry.tables import DatasetRow, JobEventRow, JobRow, StreamRow, TaskRow, utcnow

EVENT_LEVELS = frozenset({"debug", "info", "warning", "error"})


def insert_job(
    s: Session,
    *,
    kind: JobKind,
    stream_id: int | None,
    task_id: int | None,
    params: dict[str, Any],
    dataset_id: int | None = None,
) -> JobRow:
    """Insert a queued job inside the caller's transaction (so it commits with its rows)."""
    if stream_id is not None and s.get(StreamRow, stream_id) is None:
        raise InvalidReference(f"stream {stream_id} does not exist", field="stream_id")
    if task_id is not None:
        task = s.get(TaskRow, task_id)
        if task is None or (stream_id is not None and task.stream_id != stream_id):
            raise InvalidReference(f"task {task_id} does not belong to the stream", field="task_id")
    row = JobRow(
        kind=JobKind(kind).value,
        state=JobState.QUEUED.value,
        stream_id=stream_id,
        task_id=task_id,
        params=params,
        progress=0.0,
        cancel_requested=False,
        attempts=0,
    )
    s.add(row)
    s.flush()
    if dataset_id is not None:
        if s.get(DatasetRow, dataset_id) is None:
            raise InvalidReference(f"dataset {dataset_id} does not exist", field="dataset_id")
        add_edges(
            s, ref(NodeKind.JOB, row.id), [(ref(NodeKind.DATASET, dataset_id), Relation.USES)]
        )
    return row


class SqlJobStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        *,
        kind: JobKind,
        stream_id: int | None,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
        dataset_id: int | None = None,
    ) -> Job:
        with self._db.tx() as s:
            row = insert_job(
                s,
                kind=kind,
                stream_id=stream_id,
                task_id=task_id,
                params=params or {},
                dataset_id=dataset_id,
            )
            return convert.job(row)

    def get(self, job_id: int) -> Job:
        with self._db.tx() as s:
            return convert.job(_job_row(s, job_id))

    def list_jobs(
        self,
        *,
        stream_id: int | None = None,
        state: JobState | None = None,
        limit: int = 50,
        after_id: int = 0,
    ) -> list[Job]:
        query = select(JobRow).where(JobRow.id > after_id).order_by(JobRow.id).limit(limit)
        if stream_id is not None:
            query = query.where(JobRow.stream_id == stream_id)
        if state is not None:
            query = query.where(JobRow.state == JobState(state).value)
        with self._db.tx() as s:
            return [convert.job(r) for r in s.scalars(query)]

    def transition(
        self,
        job_id: int,
        to: JobState,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> Job:
        """Move a job to `to` if the state machine allows it from its current state.

        The UPDATE is conditional on the state read, so two workers cannot both win.
        """
        to = JobState(to)
        with self._db.tx() as s:
            row = _job_row(s, job_id)
            current = JobState(row.state)
            if to not in JOB_TRANSITIONS[current]:
                raise Conflict(f"job {job_id} cannot go from {current} to {to}", field="state")
            values: dict[str, Any] = {"state": to.value}
            now = utcnow()
            if to is JobState.RUNNING:
                values |= {"started_at": now, "heartbeat_at": now, "attempts": row.attempts + 1}
            if to.terminal:
                values["finished_at"] = now
            if to is JobState.SUCCEEDED:
                values["progress"] = 1.0
            if error_code is not None:
                values |= {"error_code": error_code, "error_message": error_message}
            done = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == current.value)
                .values(**values)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise Conflict(f"job {job_id} changed state concurrently", field="state")
            s.refresh(row)
            return convert.job(row)

    def heartbeat(self, job_id: int, *, progress: float | None = None) -> Job:
        with self._db.tx() as s:
            row = _job_row(s, job_id)
            row.heartbeat_at = utcnow()
            if progress is not None:
                row.progress = min(max(float(progress), 0.0), 1.0)
            return convert.job(row)

    def request_cancel(self, job_id: int) -> Job:
        """Queued jobs are cancelled at once; running ones get a flag their loop checks."""
        with self._db.tx() as s:
            row = _job_row(s, job_id)
            state = JobState(row.state)
            if state.terminal:
                raise Conflict(f"job {job_id} already {state}", field="state")
            row.cancel_requested = True
            if state is JobState.QUEUED:
                row.state = JobState.CANCELLED.value
                row.finished_at = utcnow()
            return convert.job(row)

    def add_event(
        self,
        job_id: int,
        *,
        message: str,
        level: str = "info",
        metrics: dict[str, Any] | None = None,
    ) -> JobEvent:
        if level not in EVENT_LEVELS:
            raise InvalidValue(f"must be one of {sorted(EVENT_LEVELS)}", field="level")
        with self._db.tx() as s:
            _job_row(s, job_id)
            row = JobEventRow(job_id=job_id, level=level, message=message, metrics=metrics)
            s.add(row)
            s.flush()
            return convert.job_event(row)

    def events(self, job_id: int, *, after_id: int = 0, limit: int = 100) -> list[JobEvent]:
        with self._db.tx() as s:
            _job_row(s, job_id)
            rows = s.scalars(
                select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.id > after_id)
                .order_by(JobEventRow.id)
                .limit(limit)
            )
            return [convert.job_event(r) for r in rows]

    def stale_running(self, *, heartbeat_before: datetime) -> list[Job]:
        """Running jobs whose worker stopped reporting (for the reconciler)."""
        with self._db.tx() as s:
            rows = s.scalars(
                select(JobRow).where(
                    JobRow.state == JobState.RUNNING.value,
                    JobRow.heartbeat_at < heartbeat_before,
                )
            )
            return [convert.job(r) for r in rows]


def _job_row(s: Session, job_id: int) -> JobRow:
    row = s.get(JobRow, job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found", field="job")
    return row
