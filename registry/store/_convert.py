"""Row -> entity conversion, the only place that knows both shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from registry.entities import (
    AdapterStatus,
    AdapterVersion,
    ApiToken,
    Dataset,
    Evaluation,
    Job,
    JobError,
    JobEvent,
    JobKind,
    JobState,
    Schedule,
    Snapshot,
    Stream,
    StreamState,
    Task,
)
from registry.tables import (
    AdapterVersionRow,
    ApiTokenRow,
    DatasetRow,
    EvaluationRow,
    JobEventRow,
    JobRow,
    ScheduleRow,
    SnapshotRow,
    StreamRow,
    TaskRow,
)


def aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def maybe_aware(value: datetime | None) -> datetime | None:
    return aware(value) if value is not None else None


def stream(row: StreamRow) -> Stream:
    return Stream(
        id=row.id,
        name=row.deleted_name or row.name,  # a deleted stream by the name it had
        base_source=dict(row.base_source),
        method=row.method,
        hyperparams=dict(row.hyperparams),
        created_at=aware(row.created_at),
        method_options=dict(row.method_options or {}),
        consolidation=dict(row.consolidation or {}),
        state=StreamState(row.state),
        promotion=dict(row.promotion or {}),
    )


def snapshot(row: SnapshotRow, folded: tuple[int, ...] = ()) -> Snapshot:
    return Snapshot(
        id=row.id,
        stream_id=row.stream_id,
        version=row.version,
        parent_id=row.parent_id,
        artifact_digest=row.artifact_digest,
        source=dict(row.source),
        job_id=row.job_id,
        created_at=aware(row.created_at),
        folded_adapter_ids=folded,
    )


def dataset(row: DatasetRow) -> Dataset:
    return Dataset(
        id=row.id,
        digest=row.digest,
        format=row.format,
        num_train=row.num_train,
        num_test=row.num_test,
        labels=tuple(row.labels) if row.labels is not None else None,
        size_bytes=row.size_bytes,
        created_at=aware(row.created_at),
        prompt_template=row.prompt_template,
        completion_template=row.completion_template,
    )


def task(row: TaskRow, dataset_digest: str) -> Task:
    return Task(
        id=row.id,
        stream_id=row.stream_id,
        name=row.name,
        position=row.position,
        dataset_id=row.dataset_id,
        dataset_digest=dataset_digest,
        created_at=aware(row.created_at),
    )


def adapter(row: AdapterVersionRow, task_name: str, aliases: tuple[str, ...]) -> AdapterVersion:
    return AdapterVersion(
        id=row.id,
        stream_id=row.stream_id,
        task_id=row.task_id,
        task_name=task_name,
        version=row.version,
        method=row.method,
        hyperparams=dict(row.hyperparams),
        base_snapshot_id=row.base_snapshot_id,
        dataset_id=row.dataset_id,
        depends_on=tuple(row.depends_on),
        job_id=row.job_id,
        metrics=dict(row.metrics),
        artifact_digest=row.artifact_digest,
        status=AdapterStatus(row.status),
        created_at=aware(row.created_at),
        aliases=aliases,
        tags=dict(row.tags or {}),
    )


def job(row: JobRow) -> Job:
    error = None
    if row.error_code is not None:
        error = JobError(code=row.error_code, message=row.error_message or "")
    return Job(
        id=row.id,
        kind=JobKind(row.kind),
        state=JobState(row.state),
        stream_id=row.stream_id,
        task_id=row.task_id,
        params=dict(row.params),
        progress=row.progress,
        error=error,
        cancel_requested=row.cancel_requested,
        attempts=row.attempts,
        created_at=aware(row.created_at),
        started_at=maybe_aware(row.started_at),
        finished_at=maybe_aware(row.finished_at),
        heartbeat_at=maybe_aware(row.heartbeat_at),
        enqueued_at=maybe_aware(row.enqueued_at),
        worker=row.worker,
        checkpoint_digest=row.checkpoint_digest,
        checkpoint_step=row.checkpoint_step,
        result=row.result,
    )


def api_token(row: ApiTokenRow) -> ApiToken:
    return ApiToken(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(row.scopes),
        created_at=aware(row.created_at),
        last_used_at=maybe_aware(row.last_used_at),
        revoked_at=maybe_aware(row.revoked_at),
    )


def schedule(row: ScheduleRow) -> Schedule:
    return Schedule(
        id=row.id,
        stream_id=row.stream_id,
        kind=JobKind(row.kind),
        cron=row.cron,
        task_id=row.task_id,
        params=dict(row.params),
        next_run_at=aware(row.next_run_at),
        last_run_at=maybe_aware(row.last_run_at),
        last_job_id=row.last_job_id,
        created_at=aware(row.created_at),
    )


def job_event(row: JobEventRow) -> JobEvent:
    return JobEvent(
        id=row.id,
        job_id=row.job_id,
        created_at=aware(row.created_at),
        level=row.level,
        message=row.message,
        metrics=dict(row.metrics) if row.metrics is not None else None,
    )


def evaluation(row: EvaluationRow) -> Evaluation:
    return Evaluation(
        id=row.id,
        stream_id=row.stream_id,
        after_position=row.after_position,
        task_id=row.task_id,
        snapshot_id=row.snapshot_id,
        adapter_version_id=row.adapter_version_id,
        job_id=row.job_id,
        metric=row.metric,
        value=row.value,
        num_examples=row.num_examples,
        created_at=aware(row.created_at),
    )
