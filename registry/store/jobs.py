"""Jobs: the database is the source of truth for their state; the broker only carries ids."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from registry.entities import (
    JOB_TRANSITIONS,
    SEQUENCED_KINDS,
    Claim,
    Job,
    JobEvent,
    JobKind,
    JobState,
    NodeKind,
    Relation,
    StreamState,
)
from registry.errors import Conflict, InvalidReference, InvalidValue, NotFound
from registry.store import _convert as convert
from registry.store._db import Database, add_edges, lock, ref
from registry.store.leases import release_lease, renew_lease, take_lease
from registry.store.webhooks import job_finished as finished
from registry.tables import DatasetRow, JobEventRow, JobRow, StreamRow, TaskRow, utcnow
from registry.validation import check_digest

EVENT_LEVELS = frozenset({"debug", "info", "warning", "error"})
DEFAULT_LEASE_S = 120.0  # a stream's lease outlives a few missed heartbeats, not a dead worker
_SEQUENCED = sorted(kind.value for kind in SEQUENCED_KINDS)
_OPEN = (JobState.QUEUED.value, JobState.RUNNING.value)


def insert_job(
    s: Session,
    *,
    kind: JobKind,
    stream_id: int | None,
    task_id: int | None,
    params: dict[str, Any],
    dataset_id: int | None = None,
    after_job: int | None = None,
) -> JobRow:
    """Insert a queued job inside the caller's transaction (so it commits with its rows).

    `after_job`: run right after that job of the stream, before jobs submitted since."""
    stream = s.get(StreamRow, stream_id) if stream_id is not None else None
    if stream_id is not None and stream is None:
        raise InvalidReference(f"stream {stream_id} does not exist", field="stream_id")
    if stream is not None and stream.state == StreamState.FAILED.value:
        raise Conflict(f"the import of stream '{stream.name}' failed: create the stream again "
                       "(POST /v1/streams with its name)", field="stream")  # fmt: skip
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
    if after_job is not None:
        anchor = s.get(JobRow, after_job)
        if anchor is None or anchor.stream_id != stream_id:
            raise InvalidReference(f"job {after_job} is not a job of the stream", field="after_job")
        row.sequence = (anchor.sequence if anchor.sequence is not None else 2 * anchor.id) + 1
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
        after_job: int | None = None,
    ) -> Job:
        with self._db.tx() as s:
            row = insert_job(
                s,
                kind=kind,
                stream_id=stream_id,
                task_id=task_id,
                params=params or {},
                dataset_id=dataset_id,
                after_job=after_job,
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
            if current is JobState.RUNNING and row.stream_id is not None:
                release_lease(s, name=stream_lease(row.stream_id), holder=job_holder(job_id))
            s.refresh(row)
            if to in (JobState.FAILED, JobState.CANCELLED):
                _import_ended(s, row)
            if to.terminal:
                finished(s, row)
            return convert.job(row)

    def claim(self, job_id: int, *, worker: str, lease_s: float = DEFAULT_LEASE_S) -> Claim:
        """Start a queued job for `worker` if it may run now, in one transaction.

        A job that changes its stream (train, retrain, consolidate) may run only when no earlier
        such job of the stream is queued or running, and only while it holds the stream's lease
        (`stream:<id>`, renewed by `heartbeat`): the stream's jobs run one at a time in
        submission order whatever order the broker delivers them in."""

        def attempt(s: Session) -> Claim:
            row = _job_row(s, job_id)
            if row.stream_id is not None:
                lock(s, StreamRow, row.stream_id)  # claims of one stream queue up here
                s.refresh(row)
            job = convert.job(row)
            if job.state is not JobState.QUEUED:
                return Claim(job=job, claimed=False, reason=f"job {job_id} is {job.state}")
            now = utcnow()
            if job.sequenced:
                assert row.stream_id is not None
                mine = row.sequence if row.sequence is not None else 2 * row.id
                earlier = s.scalar(_earlier_open_job(row.stream_id, before=mine))
                if earlier is not None:
                    reason = f"waiting for job {earlier} of the stream"
                    return Claim(job=job, claimed=False, waiting_for=earlier, reason=reason)
                name, me = stream_lease(row.stream_id), job_holder(job_id)
                holder = take_lease(s, name=name, holder=me, ttl_s=lease_s, now=now)
                if holder is not None:
                    return Claim(job=job, claimed=False, reason=f"{name} is held by {holder}")
            row.state = JobState.RUNNING.value
            row.started_at = row.heartbeat_at = now
            row.attempts += 1
            row.worker = worker
            s.flush()
            return Claim(job=convert.job(row), claimed=True)

        return self._db.allocate(attempt, what=f"the lease of job {job_id}")

    def heartbeat(
        self, job_id: int, *, progress: float | None = None, lease_s: float = DEFAULT_LEASE_S
    ) -> Job:
        """Record that the job's worker is alive (and its progress); renews its stream lease."""
        with self._db.tx() as s:
            row = _job_row(s, job_id)
            now = utcnow()
            row.heartbeat_at = now
            if progress is not None:
                row.progress = min(max(float(progress), 0.0), 1.0)
            if row.stream_id is not None and row.state == JobState.RUNNING.value:
                name = stream_lease(row.stream_id)
                renew_lease(s, name=name, holder=job_holder(job_id), ttl_s=lease_s, now=now)
            return convert.job(row)

    def mark_enqueued(self, job_id: int) -> Job:
        """Note that a message for the job was sent (the reconciler re-sends old ones)."""
        with self._db.tx() as s:
            row = _job_row(s, job_id)
            row.enqueued_at = utcnow()
            return convert.job(row)

    def set_checkpoint(self, job_id: int, *, digest: str, step: int) -> Job:
        """Point the job at its newest training checkpoint (an artifact tree stored first)."""
        check_digest(digest, field="checkpoint_digest")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise InvalidValue(f"must be a positive integer, got {step!r}", field="step")
        with self._db.tx() as s:
            row = _job_row(s, job_id)
            if row.state != JobState.RUNNING.value:
                raise Conflict(f"job {job_id} is {row.state}, not running", field="state")
            row.checkpoint_digest, row.checkpoint_step = digest, step
            return convert.job(row)

    def open_kinds(self, stream_id: int) -> set[JobKind]:
        """The kinds of the stream's queued or running jobs."""
        query = select(JobRow.kind).where(JobRow.stream_id == stream_id, JobRow.state.in_(_OPEN))
        with self._db.tx() as s:
            return {JobKind(kind) for kind in s.scalars(query.distinct())}

    def next_in_stream(self, stream_id: int) -> Job | None:
        """The stream's earliest unfinished state-changing job, if it is waiting to run."""
        with self._db.tx() as s:
            first = s.scalar(_earlier_open_job(stream_id, before=None))
            if first is None:
                return None
            row = _job_row(s, first)
            return convert.job(row) if row.state == JobState.QUEUED.value else None

    def queued_heads(self, *, enqueued_before: datetime, limit: int = 100) -> list[Job]:
        """Queued jobs that could run now (first of their stream, or not sequenced) whose last
        message is older than `enqueued_before` (or was never sent): the reconciler re-sends
        them, since the broker may have lost them."""
        earlier = aliased(JobRow)
        blocked = exists().where(
            earlier.stream_id == JobRow.stream_id,
            _order_key(earlier) < _order_key(),
            earlier.kind.in_(_SEQUENCED),
            earlier.state.in_(_OPEN),
        )
        query = (
            select(JobRow)
            .where(
                JobRow.state == JobState.QUEUED.value,
                or_(JobRow.enqueued_at.is_(None), JobRow.enqueued_at < enqueued_before),
                or_(JobRow.stream_id.is_(None), JobRow.kind.not_in(_SEQUENCED), ~blocked),
            )
            .order_by(JobRow.id)
            .limit(limit)
        )
        with self._db.tx() as s:
            return [convert.job(r) for r in s.scalars(query)]

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
                _import_ended(s, row)
                finished(s, row)
            return convert.job(row)

    def set_result(self, job_id: int, result: dict[str, Any]) -> Job:
        """Record what the job decided (JSON), replacing an earlier run's."""
        with self._db.tx() as s:
            row = _job_row(s, job_id)
            row.result = result
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


def _import_ended(s: Session, job: JobRow) -> None:
    """An import job that failed or was cancelled fails its stream (which then takes no jobs, and
    whose name a new stream may take), and the jobs queued behind it: in the transaction that
    ends the job, under the stream's lock, so no job is queued behind it afterwards."""
    if job.kind != JobKind.IMPORT.value or job.stream_id is None:
        return
    stream = lock(s, StreamRow, job.stream_id)
    if stream is None or stream.state != StreamState.IMPORTING.value:
        return  # a re-run that ended after an earlier run had imported
    stream.state = StreamState.FAILED.value
    message = f"the import of the stream's base model (job {job.id}) did not succeed"
    queued = select(JobRow).where(
        JobRow.stream_id == job.stream_id, JobRow.state == JobState.QUEUED.value
    )
    for row in s.scalars(queued):
        row.state, row.finished_at = JobState.FAILED.value, utcnow()
        row.error_code, row.error_message = "import_failed", message
        s.add(JobEventRow(job_id=row.id, level="error", message=f"failed: {message}"))
        finished(s, row)


def stream_lease(stream_id: int) -> str:
    return f"stream:{stream_id}"


def job_holder(job_id: int) -> str:
    return f"job:{job_id}"


def _order_key(job: type[JobRow] | Any = JobRow) -> Any:
    """Where a job stands in its stream's order (see `JobRow.sequence`)."""
    return func.coalesce(job.sequence, job.id * 2)


def _earlier_open_job(stream_id: int, *, before: Any | None) -> Select[Any]:
    """The id of the stream's first queued or running state-changing job (before `before`, an
    order key)."""
    query = (
        select(JobRow.id)
        .where(JobRow.stream_id == stream_id, JobRow.kind.in_(_SEQUENCED), JobRow.state.in_(_OPEN))
        .order_by(_order_key(), JobRow.id)
        .limit(1)
    )
    return query if before is None else query.where(_order_key() < before)


def _job_row(s: Session, job_id: int) -> JobRow:
    row = s.get(JobRow, job_id)
    if row is None:
        raise job_not_found(job_id)
    return row


def job_not_found(job_id: int) -> NotFound:
    return NotFound(f"job {job_id} not found", field="job")
