"""Workers without a broker: claims and hand-over, the reconciler, checkpoint resume after a
worker dies, schedules and the in-process worker; on the embedded and the server instance."""

from __future__ import annotations

import dataclasses
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from continual.data import synthetic_tasks
from continual.options import OLoraOptions
from registry.entities import Job, JobKind, JobState
from registry.errors import InvalidValue, NotFound
from registry.instance import Instance
from registry.settings import StrataSettings
from services.dispatch import enqueue, reconcile
from services.scheduler import create_schedule, fire_due, tick
from services.streams import submit_task
from workers.execution import execute
from workers.inprocess import InProcessWorker
from workers.runner import run_claimed
from workers.streams import create_stream

FAST = {"max_steps": 6, "batch_size": 8}


class Recorder:
    """A dispatcher that only records what was sent."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, job: Job) -> None:
        self.sent.append(job.id)


class WorkerDied(BaseException):
    """Raised from a listener: the process is gone, nothing after it runs (not even except)."""


@pytest.fixture
def inst(instance: Instance) -> Instance:
    settings = StrataSettings(
        heartbeat_s=0.2, lease_s=5, stale_after_s=1, resend_after_s=0.5, checkpoint_every=2,
        max_attempts=2, scheduler_tick_s=0.2,
    )  # fmt: skip
    return dataclasses.replace(instance, settings=settings)


def _submit(inst: Instance, stream: Any, name: str, seed: int = 0, **hyper: Any) -> Job:
    data = synthetic_tasks(seed=seed, train_size=24, test_size=6)[seed % 3]
    params = {"hyperparams": {**FAST, **hyper}, "eval_limit": 6}
    return submit_task(inst, stream=stream, name=name, data=data, format="synthetic",
                       params=params)[1]  # fmt: skip


def test_a_stream_hands_over_to_its_next_job_in_order(inst: Instance) -> None:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    a, b = _submit(inst, stream, "a"), _submit(inst, stream, "b", seed=1)
    out = Recorder()
    assert execute(inst, out, b.id, worker="w") is None  # early: b waits for a
    assert inst.registry.jobs.get(b.id).state is JobState.QUEUED
    done = execute(inst, out, a.id, worker="w")
    assert done is not None and done.state is JobState.SUCCEEDED and done.worker == "w"
    assert out.sent == [b.id]  # a's worker sent the stream's next job
    assert execute(inst, out, a.id, worker="w2") is None  # a duplicate message runs nothing
    assert execute(inst, out, b.id, worker="w").state is JobState.SUCCEEDED  # type: ignore[union-attr]
    versions = inst.registry.adapters.list_versions(stream_id=stream.id)
    assert [(v.task_name, v.depends_on) for v in versions] == [("a", ()), ("b", (versions[0].id,))]


def test_a_killed_worker_is_replaced_and_the_job_resumes_from_its_checkpoint(
    inst: Instance,
) -> None:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    job = _submit(inst, stream, "a", max_steps=7)
    out = Recorder()

    def die_at_step_5(kind: str, payload: dict[str, Any]) -> None:
        if kind == "step" and payload["step"] == 5:
            raise WorkerDied

    claim = inst.registry.jobs.claim(job.id, worker="w1")
    with pytest.raises(WorkerDied):
        run_claimed(inst, claim.job, listener=die_at_step_5)
    dead = inst.registry.jobs.get(job.id)
    assert dead.state is JobState.RUNNING and dead.checkpoint_step == 4
    # the stream is held until the reconciler sees the silence
    assert execute(inst, out, job.id, worker="w2") is None
    time.sleep(1.2)
    counts = reconcile(inst, out, now=datetime.now(UTC))
    assert counts == {"requeued": 1, "failed": 0, "resent": 1} and out.sent == [job.id]
    steps: list[int] = []

    def record(kind: str, payload: dict[str, Any]) -> None:
        if kind == "step":
            steps.append(payload["step"])

    done = execute(inst, out, job.id, worker="w2", listener=record)
    assert done is not None and done.state is JobState.SUCCEEDED and done.attempts == 2
    assert steps == [5, 6, 7]
    events = [e.message for e in inst.registry.jobs.events(job.id, limit=1000)]
    assert "resuming from the checkpoint at step 4" in events
    assert any("stopped responding; re-queued" in m for m in events)
    versions = inst.registry.adapters.list_versions(stream_id=stream.id)
    assert len(versions) == 1 and versions[0].metrics["steps"] == 7


def test_the_reconciler_gives_up_after_max_attempts_and_resends_lost_messages(
    inst: Instance,
) -> None:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    job = _submit(inst, stream, "a")
    other = _submit(inst, stream, "b", seed=1)
    out = Recorder()
    for attempt in (1, 2):  # claimed twice, its worker silent both times
        assert inst.registry.jobs.claim(job.id, worker=f"w{attempt}").claimed
        time.sleep(1.1)
        reconcile(inst, out, now=datetime.now(UTC))
    failed = inst.registry.jobs.get(job.id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error.code == "worker_lost"
    # the next job of the stream was never sent: the reconciler sends it
    assert out.sent[-1] == other.id
    assert inst.registry.jobs.get(other.id).enqueued_at is not None


def test_an_unreachable_broker_leaves_the_job_queued_for_the_reconciler(inst: Instance) -> None:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    job = _submit(inst, stream, "a")

    class Down:
        def send(self, job: Job) -> None:
            raise ConnectionError("redis is down")

    assert enqueue(inst, Down(), job) is False
    assert inst.registry.jobs.get(job.id).enqueued_at is None
    out = Recorder()
    assert reconcile(inst, out, now=datetime.now(UTC))["resent"] == 1 and out.sent == [job.id]


def test_a_retrain_schedule_fires_once_per_due_time(inst: Instance) -> None:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    _submit(inst, stream, "a")
    now = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
    sched = create_schedule(inst, stream=stream, kind="retrain", cron="*/15 * * * *",
                            task_name="a", params={"hyperparams": FAST}, now=now)  # fmt: skip
    assert sched.next_run_at == datetime(2026, 3, 1, 12, 15, tzinfo=UTC)
    out = Recorder()
    assert fire_due(inst, out, now=now) == []
    late = datetime(2026, 3, 1, 13, 7, tzinfo=UTC)  # four due times missed
    fired = fire_due(inst, out, now=late)
    assert len(fired) == 1 and fired[0].kind is JobKind.RETRAIN and out.sent == [fired[0].id]
    assert fire_due(inst, out, now=late) == []
    assert inst.registry.schedules.get(sched.id).next_run_at == datetime(
        2026, 3, 1, 13, 15, tzinfo=UTC
    )
    # only the leader fires
    assert tick(inst, out, holder="one", now=late + timedelta(hours=1))
    assert not tick(inst, out, holder="two", now=late + timedelta(hours=2))
    assert len(inst.registry.jobs.list_jobs(stream_id=stream.id)) == 3


def test_schedules_refuse_bad_input(inst: Instance) -> None:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    _submit(inst, stream, "a")
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"kind": "retrain", "cron": "61 * * * *", "task_name": "a"}, InvalidValue, "cron"),
        ({"kind": "retrain", "cron": "* * * * * *", "task_name": "a"}, InvalidValue, "cron"),
        ({"kind": "retrain", "cron": "* * * * * */5", "task_name": "a"}, InvalidValue, "cron"),
        ({"kind": "retrain", "cron": "", "task_name": "a"}, InvalidValue, "cron"),
        ({"kind": "retrain", "cron": "@daily"}, InvalidValue, "task"),
        ({"kind": "retrain", "cron": "@daily", "task_name": "zz"}, NotFound, "task"),
        ({"kind": "train", "cron": "@daily", "task_name": "a"}, InvalidValue, "kind"),
        ({"kind": "consolidate", "cron": "@daily", "params": {"x": 1}}, InvalidValue, "params"),
        ({"kind": "retrain", "cron": "@daily", "task_name": "a",
          "params": {"hyperparams": {"rank": 0}}}, ValueError, "rank"),
        ({"kind": "retrain", "cron": "@daily", "task_name": "a", "params": {"bogus": 1}},
         ValueError, "bogus"),
    ]  # fmt: skip
    for kwargs, error, field in cases:
        with pytest.raises(error) as exc:
            create_schedule(inst, stream=stream, **kwargs)
        assert getattr(exc.value, "field", None) == field, kwargs
    assert inst.registry.schedules.list_schedules() == []


def test_the_in_process_worker_runs_streams_side_by_side_and_each_in_order(
    inst: Instance,
) -> None:
    s1, _ = create_stream(inst, name="s1", base={"kind": "tiny"})
    s2, _ = create_stream(inst, name="s2", base={"kind": "tiny"})
    worker = InProcessWorker(inst, threads=2, scheduler=False).start()
    try:
        jobs = [_submit(inst, s1, n, seed=i) for i, n in enumerate(("a", "b", "c"))]
        jobs += [_submit(inst, s2, n, seed=i) for i, n in enumerate(("x", "y"))]
        for job in reversed(jobs):  # delivered in the worst order
            enqueue(inst, worker, job)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = [inst.registry.jobs.get(j.id).state for j in jobs]
            if all(s.terminal for s in states):
                break
            time.sleep(0.2)
    finally:
        worker.stop(timeout=60)
    finished = [inst.registry.jobs.get(j.id) for j in jobs]
    assert [j.state for j in finished] == [JobState.SUCCEEDED] * 5
    first = finished[:3]
    for earlier, later in itertools.pairwise(first):
        assert earlier.finished_at is not None and later.started_at is not None
        assert earlier.finished_at <= later.started_at


def test_a_streams_method_options_reach_its_jobs_and_are_recorded(inst: Instance) -> None:
    options = {"lambda1": 0.25, "orthogonal_init": True}
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"}, method="o-lora",
                              method_options=options)  # fmt: skip
    # stored with every default, so that a later release's defaults do not change the stream
    pinned = {**OLoraOptions().to_dict(), **options}
    assert inst.registry.streams.get("s").method_options == pinned
    assert set(pinned) > set(options)
    a = _submit(inst, stream, "a")
    data = synthetic_tasks(seed=1, train_size=24, test_size=6)[1]
    _, b = submit_task(inst, stream=stream, name="b", data=data, format="synthetic", params={
        "method": "inc-lora", "hyperparams": FAST, "eval_limit": 6})  # fmt: skip
    out = Recorder()
    for job in (a, b):
        assert execute(inst, out, job.id, worker="w").state is JobState.SUCCEEDED  # type: ignore[union-attr]
    first, second = inst.registry.adapters.list_versions(stream_id=stream.id)
    assert (first.method, first.hyperparams["method_options"]) == ("o-lora", pinned)
    # a job that switches method does not inherit the stream's o-lora options
    assert (second.method, second.hyperparams["method_options"]) == ("inc-lora", {})
    # a job's own options override the stream's, the rest recorded as the stream has them
    _, c = submit_task(inst, stream=stream, name="c", data=data, format="synthetic", params={
        "options": {"lambda1_norm": "sum"}, "hyperparams": FAST, "eval_limit": 6})  # fmt: skip
    assert execute(inst, out, c.id, worker="w").state is JobState.SUCCEEDED  # type: ignore[union-attr]
    third = inst.registry.adapters.list_versions(stream_id=stream.id)[-1]
    assert third.hyperparams["method_options"] == {**pinned, "lambda1_norm": "sum"}
    bad = [({"method_options": {"lambda1": -1}}, "lambda1"),
           ({"method_options": {"bogus": 1}}, "bogus"),
           ({"method": "seq-lora", "method_options": {"lambda1": 1}}, "lambda1")]  # fmt: skip
    for kwargs, field in bad:
        with pytest.raises(ValueError) as exc:
            create_stream(inst, name="t", base={"kind": "tiny"}, **{"method": "o-lora", **kwargs})
        assert getattr(exc.value, "field", None) == field
    with pytest.raises(ValueError) as exc:
        _submit_params = {"options": {"sparsity_weight": 1}}
        submit_task(inst, stream=stream, name="c", data=data, format="synthetic",
                    params=_submit_params)  # fmt: skip
    assert getattr(exc.value, "field", None) == "sparsity_weight"


def test_every_job_logs_a_line_when_it_starts_and_when_it_ends(
    inst: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    """What the server's (or a worker's) log shows of a job: its start and its end, whatever
    the progress bars of the libraries print."""
    import logging
    import re

    from workers.runner import run_job

    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    job = _submit(inst, stream, "t1")
    with caplog.at_level(logging.INFO, logger="workers.runner"):
        ended = run_job(inst, job.id)
    assert ended.state is JobState.SUCCEEDED
    lines = [r.getMessage() for r in caplog.records if r.name == "workers.runner"]
    assert lines[0] == (f"job {job.id} (train, stream {stream.id}, task {job.task_id}) started "
                        "on embedded, attempt 1")  # fmt: skip
    assert re.fullmatch(rf"job {job.id} \(train\) succeeded in [\d.]+ s", lines[-1]), lines
