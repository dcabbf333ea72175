"""Soft deletion and restoring: a deleted stream or adapter version answers 404, keeps its rows
(lineage and evaluations still refer to them) and can be restored for the retention period."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.entities import JobState, Stream
from registry.errors import AlreadyExists, Conflict, NotFound
from registry.store import _convert as convert
from registry.store.webhooks import job_finished as finished
from registry.tables import AdapterVersionRow, JobRow, StreamRow, utcnow
from registry.validation import check_name

NAME_LENGTH = 64  # streams.name is a VARCHAR(64)


def check_no_running_job(s: Session, stream: StreamRow) -> list[JobRow]:
    """The stream's queued jobs; Conflict (409) while one of its jobs runs."""
    jobs = list(s.scalars(select(JobRow).where(
        JobRow.stream_id == stream.id,
        JobRow.state.in_([JobState.RUNNING.value, JobState.QUEUED.value]))))  # fmt: skip
    running = [j.id for j in jobs if j.state == JobState.RUNNING.value]
    if running:
        raise Conflict(f"job {running[0]} of stream '{stream.name}' is running: cancel it or "
                       "wait for it to end", field="stream")  # fmt: skip
    return jobs


def delete_stream(s: Session, stream_id: int) -> Stream:
    """Refused (409) while one of its jobs runs; its queued jobs are cancelled in the same
    transaction; its name is free for a new stream meanwhile."""
    row = s.get(StreamRow, stream_id, with_for_update=True)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"stream {stream_id} not found", field="stream")
    now = utcnow()
    for job in check_no_running_job(s, row):
        job.state, job.finished_at, job.cancel_requested = JobState.CANCELLED.value, now, True
        finished(s, job)
    suffix = f"~{row.id}"
    row.deleted_name = row.name
    row.name = row.name[: NAME_LENGTH - len(suffix)] + suffix
    row.deleted_at = now
    return convert.stream(row)


def restore_stream(s: Session, name: str, *, retention_days: float) -> Stream:
    """NotFound when no stream was deleted under `name` within `retention_days`,
    AlreadyExists when the name is taken again."""
    check_name(name, field="stream")
    row = s.scalar(
        select(StreamRow)
        .where(StreamRow.deleted_name == name, StreamRow.deleted_at.is_not(None))
        .order_by(StreamRow.deleted_at.desc())
        .limit(1)
    )
    if row is None or row.deleted_at is None or expired(row.deleted_at, retention_days):
        raise NotFound(f"no deleted stream '{name}' to restore (deleted streams are kept "
                       f"{retention_days:g} days)", field="stream")  # fmt: skip
    if s.scalar(select(StreamRow.id).where(StreamRow.name == name)) is not None:
        raise AlreadyExists(f"stream '{name}' already exists", field="name")
    row.name, row.deleted_name, row.deleted_at = name, None, None
    return convert.stream(row)


def restore_version(
    s: Session, task_id: int, version: int, retention_days: float
) -> AdapterVersionRow:
    row = s.scalar(select(AdapterVersionRow).where(
        AdapterVersionRow.task_id == task_id, AdapterVersionRow.version == version,
        AdapterVersionRow.deleted_at.is_not(None)))  # fmt: skip
    if row is None or expired(row.deleted_at, retention_days):
        raise NotFound(f"no deleted version {version} to restore", field="version")
    row.deleted_at = None
    return row


def expired(deleted_at: object, retention_days: float) -> bool:
    return convert.aware(deleted_at) < utcnow() - timedelta(days=retention_days)  # type: ignore[arg-type]
