"""The job store: the state machine, cancel and events; claims that run a stream's jobs one at a
time in order (one of several concurrent claims wins), heartbeats, the reconciler's queries,
checkpoints, and a job queued after another; on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from registry.entities import JobKind, JobState
from registry.errors import Conflict, InvalidReference, InvalidValue, NotFound
from registry.store import SqlRegistry
from registry.tables import LeaseRow
from tests.registry.store.helpers import D3, _submit
from tests.registry.store.helpers import _stream_id as _stream


def test_job_state_machine_cancel_and_events(registry: SqlRegistry) -> None:
    stream_id = _stream(registry)
    job = registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=stream_id)
    running = registry.jobs.transition(job.id, JobState.RUNNING)
    assert running.attempts == 1 and running.started_at is not None
    with pytest.raises(Conflict):
        registry.jobs.transition(job.id, JobState.QUEUED.value and JobState.RUNNING)
    cancelling = registry.jobs.request_cancel(job.id)
    assert cancelling.cancel_requested and cancelling.state is JobState.RUNNING
    done = registry.jobs.transition(job.id, JobState.CANCELLED)
    assert done.state is JobState.CANCELLED and done.finished_at is not None
    with pytest.raises(Conflict):
        registry.jobs.request_cancel(job.id)
    queued = registry.jobs.create(kind=JobKind.EVALUATE, stream_id=stream_id)
    assert registry.jobs.request_cancel(queued.id).state is JobState.CANCELLED
    failed = registry.jobs.create(kind=JobKind.TRAIN, stream_id=stream_id)
    registry.jobs.transition(failed.id, JobState.RUNNING)
    out = registry.jobs.transition(
        failed.id, JobState.FAILED, error_code="boom", error_message="it broke"
    )
    assert out.error is not None and out.error.code == "boom"
    events = [registry.jobs.add_event(job.id, message=f"step {i}") for i in range(5)]
    page = registry.jobs.events(job.id, after_id=events[1].id, limit=2)
    assert [e.message for e in page] == ["step 2", "step 3"]
    with pytest.raises(InvalidValue):
        registry.jobs.add_event(job.id, message="x", level="loud")
    with pytest.raises(NotFound):
        registry.jobs.get(424242)
    assert [j.id for j in registry.jobs.list_jobs(state=JobState.CANCELLED)] == [job.id, queued.id]
    assert [
        j.id for j in registry.jobs.list_jobs(stream_id=stream_id, after_id=job.id, limit=1)
    ] == [queued.id]


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
