"""Job claims and stream leases, the reconciler's queries, checkpoints, API tokens and cron
schedules: on SQLite and PostgreSQL with the same tests."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from registry.entities import JobKind, JobState
from registry.errors import Conflict, InvalidReference, InvalidValue, NotFound, Unauthorized
from registry.store import SqlRegistry
from registry.tables import ApiTokenRow, JobRow, LeaseRow

D1, D2, D3 = "a" * 64, "b" * 64, "c" * 64


def _stream(reg: SqlRegistry, name: str = "s1") -> int:
    stream = reg.streams.create(
        name=name, base_source={"kind": "tiny"}, method="seq-lora", hyperparams={}
    )
    reg.streams.add_snapshot(stream_id=stream.id, artifact_digest=D1, source={})
    return stream.id


def _submit(reg: SqlRegistry, stream_id: int, name: str) -> int:
    """Submit task `name` (one shared dataset); returns its training job's id."""
    try:
        dataset_id = reg.tasks.get_dataset(D2).id
    except NotFound:
        dataset_id = reg.tasks.add_dataset(
            digest=D2, format="jsonl", num_train=1, num_test=1, size_bytes=1
        ).id
    return reg.tasks.submit(stream_id=stream_id, name=name, dataset_id=dataset_id)[1].id


def test_a_stream_runs_its_jobs_one_at_a_time_in_submission_order(registry: SqlRegistry) -> None:
    s1, s2 = _stream(registry, "s1"), _stream(registry, "s2")
    a, b, c = (_submit(registry, s1, n) for n in ("a", "b", "c"))
    other = _submit(registry, s2, "x")

    # the broker may deliver b first: it waits for a
    claim = registry.jobs.claim(b, worker="w1")
    assert not claim.claimed and claim.waiting_for == a and claim.job.state is JobState.QUEUED
    first = registry.jobs.claim(a, worker="w1")
    assert first.claimed and first.job.state is JobState.RUNNING and first.job.worker == "w1"
    assert first.job.attempts == 1
    assert registry.leases.holder(f"stream:{s1}") == f"job:{a}"
    # a second delivery of a running job is refused; another stream runs concurrently
    assert not registry.jobs.claim(a, worker="w2").claimed
    assert registry.jobs.claim(other, worker="w2").claimed
    assert registry.jobs.next_in_stream(s1) is None  # a runs: nothing to start

    registry.jobs.transition(a, JobState.SUCCEEDED)
    assert registry.leases.holder(f"stream:{s1}") is None  # released with the job
    nxt = registry.jobs.next_in_stream(s1)
    assert nxt is not None and nxt.id == b
    assert registry.jobs.claim(c, worker="w1").waiting_for == b
    registry.jobs.request_cancel(b)  # a cancelled job no longer holds the stream back
    assert registry.jobs.claim(c, worker="w1").claimed


def test_concurrent_claims_of_one_stream_admit_exactly_one(registry: SqlRegistry) -> None:
    stream = _stream(registry)
    job = _submit(registry, stream, "a")
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def claim(worker: str) -> None:
        barrier.wait()
        results.append(registry.jobs.claim(job, worker=worker).claimed)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert registry.jobs.get(job).attempts == 1


def test_an_unexpired_lease_blocks_and_an_expired_one_is_taken_over(
    registry: SqlRegistry,
) -> None:
    stream = _stream(registry)
    job = _submit(registry, stream, "a")
    assert registry.leases.acquire(f"stream:{stream}", holder="someone", ttl_s=60)
    claim = registry.jobs.claim(job, worker="w1")
    assert not claim.claimed and "someone" in claim.reason
    with registry.engine.begin() as conn:  # the holder stopped renewing long ago
        conn.execute(update(LeaseRow).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert registry.jobs.claim(job, worker="w1").claimed


def test_heartbeat_renews_the_stream_lease(registry: SqlRegistry) -> None:
    stream = _stream(registry)
    job = _submit(registry, stream, "a")
    registry.jobs.claim(job, worker="w1", lease_s=1)
    registry.jobs.heartbeat(job, progress=0.5, lease_s=3600)
    with registry.engine.connect() as conn:
        expires = conn.execute(LeaseRow.__table__.select()).one().expires_at
    expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    assert expires > datetime.now(UTC) + timedelta(minutes=59)
    assert registry.jobs.get(job).progress == 0.5


def test_reconciler_queries_heads_and_stale_jobs(registry: SqlRegistry) -> None:
    s1, s2 = _stream(registry, "s1"), _stream(registry, "s2")
    a, b = _submit(registry, s1, "a"), _submit(registry, s1, "b")
    x = _submit(registry, s2, "x")
    later = datetime.now(UTC) + timedelta(seconds=5)
    # never sent: the heads of both streams, not b (it waits for a)
    assert [j.id for j in registry.jobs.queued_heads(enqueued_before=later)] == [a, x]
    registry.jobs.mark_enqueued(a)
    assert registry.jobs.get(a).enqueued_at is not None
    earlier = datetime.now(UTC) - timedelta(seconds=5)
    assert [j.id for j in registry.jobs.queued_heads(enqueued_before=earlier)] == [x]
    registry.jobs.claim(a, worker="w1")
    assert [j.id for j in registry.jobs.queued_heads(enqueued_before=later)] == [x]
    # a running job whose heartbeat stopped is stale; re-queued, it frees the stream
    assert [j.id for j in registry.jobs.stale_running(heartbeat_before=later)] == [a]
    registry.jobs.transition(a, JobState.QUEUED)
    assert registry.leases.holder(f"stream:{s1}") is None
    assert [j.id for j in registry.jobs.queued_heads(enqueued_before=later)] == [a, x]
    assert b not in [j.id for j in registry.jobs.queued_heads(enqueued_before=later)]


def test_checkpoints_point_at_a_digest_of_a_running_job(registry: SqlRegistry) -> None:
    stream = _stream(registry)
    job = _submit(registry, stream, "a")
    with pytest.raises(Conflict):  # not running yet
        registry.jobs.set_checkpoint(job, digest=D3, step=5)
    registry.jobs.claim(job, worker="w1")
    saved = registry.jobs.set_checkpoint(job, digest=D3, step=5)
    assert (saved.checkpoint_digest, saved.checkpoint_step) == (D3, 5)
    for digest, step, field in (("nope", 5, "checkpoint_digest"), (D3, 0, "step")):
        with pytest.raises(InvalidValue) as exc:
            registry.jobs.set_checkpoint(job, digest=digest, step=step)
        assert exc.value.field == field
    assert registry.jobs.get(job).checkpoint_step == 5


def test_tokens_are_stored_hashed_scoped_and_revoked_at_once(registry: SqlRegistry) -> None:
    token, secret = registry.tokens.create(name="ci", scopes=["write", "read"])
    assert secret.startswith("strata_") and len(secret) > 40
    assert token.scopes == ("read", "write") and token.prefix == secret[:11]
    with registry.engine.connect() as conn:
        stored = " ".join(str(v) for row in conn.exec_driver_sql("SELECT * FROM api_tokens")
                          for v in row)  # fmt: skip
    assert secret not in stored and secret[11:] not in stored
    assert registry.tokens.authenticate(secret).id == token.id
    first_use = registry.tokens.authenticate(secret).last_used_at
    assert first_use is not None
    # reads do not each write: last_used_at moves at most once a minute
    assert registry.tokens.authenticate(secret).last_used_at == first_use
    with registry.engine.begin() as conn:
        conn.execute(update(ApiTokenRow).values(last_used_at=first_use - timedelta(minutes=2)))
    assert registry.tokens.authenticate(secret).last_used_at > first_use
    for bad in ("", "strata_wrong", secret + "x", secret[:-1]):
        with pytest.raises(Unauthorized):
            registry.tokens.authenticate(bad)
    registry.tokens.revoke(token.id)
    with pytest.raises(Unauthorized):
        registry.tokens.authenticate(secret)
    assert registry.tokens.list_tokens()[0].revoked_at is not None
    for scopes in ([], ["root"], "read"):
        with pytest.raises(InvalidValue) as exc:
            registry.tokens.create(name="x", scopes=scopes)  # type: ignore[arg-type]
        assert exc.value.field == "scopes"
    with pytest.raises(NotFound):
        registry.tokens.revoke(999)


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


def test_a_job_queued_after_another_runs_before_later_submissions(registry: SqlRegistry) -> None:
    s1, s2 = _stream(registry, "s1"), _stream(registry, "s2")
    a, b = _submit(registry, s1, "a"), _submit(registry, s1, "b")
    fold = registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=s1, after_job=a).id
    assert registry.jobs.claim(fold, worker="w").waiting_for == a
    assert registry.jobs.claim(a, worker="w").claimed
    registry.jobs.transition(a, JobState.SUCCEEDED)
    nxt = registry.jobs.next_in_stream(s1)
    assert nxt is not None and nxt.id == fold  # not b, though b is older
    assert registry.jobs.claim(b, worker="w").waiting_for == fold
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert [j.id for j in registry.jobs.queued_heads(enqueued_before=later)] == [fold]
    with pytest.raises(InvalidReference) as exc:
        registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=s2, after_job=a)
    assert exc.value.field == "after_job"
