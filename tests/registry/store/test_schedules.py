"""The schedule store: a due schedule fires once and skips the times missed, and bad schedules are
refused by field; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from registry.entities import JobKind, JobState
from registry.errors import InvalidReference, InvalidValue, NotFound
from registry.store import SqlRegistry
from registry.tables import JobRow
from tests.registry.store.helpers import _stream_id as _stream
from tests.registry.store.helpers import _submit


def test_a_due_schedule_fires_once_and_skips_missed_times(registry: SqlRegistry) -> None:
    stream = _stream(registry)
    _submit(registry, stream, "a")
    task = registry.tasks.get(stream_id=stream, name="a")
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    sched = registry.schedules.create(
        stream_id=stream, kind=JobKind.RETRAIN, cron="0 * * * *", next_run_at=t0,
        task_id=task.id, params={"hyperparams": {"rank": 4}},
    )  # fmt: skip
    assert registry.schedules.due(now=t0 - timedelta(seconds=1)) == []
    # the scheduler was down for three hours: one run, then the next future time
    now = t0 + timedelta(hours=3, minutes=5)
    assert [s.id for s in registry.schedules.due(now=now)] == [sched.id]
    nxt = t0 + timedelta(hours=4)
    job = registry.schedules.fire(sched.id, now=now, next_run_at=nxt)
    assert job is not None and job.kind is JobKind.RETRAIN and job.task_id == task.id
    # a retrain takes the task's newest dataset version when it fires (here its first)
    assert job.params == {"hyperparams": {"rank": 4}, "schedule_id": sched.id,
                          "dataset_id": task.dataset_id, "dataset_version": 1}  # fmt: skip
    assert registry.schedules.fire(sched.id, now=now, next_run_at=nxt) is None  # fired already
    assert registry.schedules.due(now=now) == []
    fired = registry.schedules.get(sched.id)
    assert (fired.last_job_id, fired.next_run_at, fired.last_run_at) == (job.id, nxt, now)
    registry.schedules.delete(sched.id)
    assert registry.schedules.list_schedules(stream_id=stream) == []
    assert registry.schedules.fire(sched.id, now=nxt, next_run_at=nxt + timedelta(hours=1)) is None


def test_schedules_refuse_bad_input(registry: SqlRegistry) -> None:
    stream = _stream(registry)
    other = _stream(registry, "s2")
    _submit(registry, other, "elsewhere")
    foreign = registry.tasks.get(stream_id=other, name="elsewhere")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    cases = [
        (dict(kind=JobKind.TRAIN), InvalidValue, "kind"),
        (dict(kind=JobKind.RETRAIN), InvalidValue, "task"),
        (dict(kind=JobKind.RETRAIN, task_id=foreign.id), InvalidReference, "task"),
        (dict(kind=JobKind.CONSOLIDATE, task_id=foreign.id), InvalidValue, "task"),
        (dict(kind=JobKind.CONSOLIDATE, stream_id=999), NotFound, "stream"),
    ]
    for kwargs, error, field in cases:
        args = {"stream_id": stream, "cron": "@daily", "next_run_at": t0, **kwargs}
        with pytest.raises(error) as exc:
            registry.schedules.create(**args)  # type: ignore[arg-type]
        assert exc.value.field == field
    sched = registry.schedules.create(
        stream_id=stream, kind=JobKind.CONSOLIDATE, cron="@daily", next_run_at=t0
    )
    with pytest.raises(InvalidValue):
        registry.schedules.fire(sched.id, now=t0, next_run_at=t0)
    with pytest.raises(NotFound):
        registry.schedules.get(12345)
    assert registry.schedules.list_schedules() == [sched]
    assert registry.jobs.list_jobs(state=JobState.QUEUED)  # submissions only
    with registry.engine.connect() as conn:
        assert (
            conn.execute(JobRow.__table__.select().where(JobRow.kind == "consolidate")).all() == []
        )
