"""Faults injected into the running service: a worker killed mid-training, the broker
restarted with jobs queued and running, and a job longer than the broker's visibility timeout.
Each counts jobs submitted, lost and run twice (the figures of RELIABILITY.md)."""

from __future__ import annotations

import logging
import re
import time

import pytest

from registry.entities import JobState
from tests.faults.conftest import TIMEOUT_S, Cluster
from workers.streams import create_stream

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


def _report(name: str, *, faults: int, submitted: int, lost: int, twice: int) -> None:
    log.warning("RELIABILITY %s: faults=%d submitted=%d lost=%d run_twice=%d",
                name, faults, submitted, lost, twice)  # fmt: skip


def test_a_worker_killed_mid_training_is_replaced_and_the_job_resumes(cluster: Cluster) -> None:
    stream, _ = create_stream(cluster.inst, name="s", base={"kind": "tiny"})
    job = cluster.submit(stream, "long", seed=0, max_steps=400)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:  # running, with a checkpoint behind it
        current = cluster.inst.registry.jobs.get(job.id)
        if current.state is JobState.RUNNING and current.checkpoint_step >= 20:
            break
        time.sleep(0.1)
    assert current.worker is not None
    pid = int(current.worker.rsplit(":", 1)[1])
    cluster.workers.kill(pid)  # SIGKILL mid-training
    done = cluster.wait([job.id])[0]
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.attempts == 2 and done.worker != current.worker
    events = [e.message for e in cluster.inst.registry.jobs.events(job.id, limit=10_000)]
    resumed = [m for m in events if m.startswith("resuming from the checkpoint at step ")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 20
    versions = cluster.inst.registry.adapters.list_versions(stream_id=stream.id)
    assert len(versions) == 1 and versions[0].metrics["steps"] == 400  # published exactly once
    assert cluster.running() == []
    _report("worker SIGKILL", faults=1, submitted=1, lost=0, twice=0)


def test_restarting_redis_loses_no_job_and_runs_none_twice(cluster: Cluster) -> None:
    s1, _ = create_stream(cluster.inst, name="s1", base={"kind": "tiny"})
    s2, _ = create_stream(cluster.inst, name="s2", base={"kind": "tiny"})
    jobs = [cluster.submit(s, f"t{i}", seed=i, max_steps=60) for i in range(3) for s in (s1, s2)]
    cluster.wait([jobs[0].id], until=("running", "succeeded"))
    cluster.redis.kill()  # every queued message is gone with it
    time.sleep(1)
    cluster.redis.start()  # empty; workers reconnect, the reconciler re-sends from the DB
    done = cluster.wait([j.id for j in jobs])
    lost = sum(j.state is not JobState.SUCCEEDED for j in done)
    twice = sum(cluster.starts(j.id) > 1 for j in done)
    assert lost == 0 and twice == 0, [(j.id, j.state, j.error) for j in done]
    assert all(j.attempts == 1 for j in done)
    for stream in (s1, s2):
        versions = cluster.inst.registry.adapters.list_versions(stream_id=stream.id)
        assert sorted(v.task_name for v in versions) == ["t0", "t1", "t2"]
    _report("redis restart", faults=1, submitted=len(jobs), lost=lost, twice=twice)


@pytest.mark.parametrize(
    "cluster",
    [{"STRATA_BROKER_VISIBILITY_TIMEOUT_S": "1", "celery_app": "tests.faults.sweep_app"}],
    indirect=True,
)
def test_a_job_longer_than_the_visibility_timeout_runs_once(cluster: Cluster) -> None:
    """A GPU worker (solo pool) acknowledges a job's message only when the job ends: Celery
    defers acknowledgements to its event loop, which the solo pool blocks while the job runs.
    Redis therefore re-delivers the message of a job running past the visibility timeout (1 s
    here, swept every second by `sweep_app`), to the other worker; each copy finds the job
    claimed and starts nothing (`tests/registry/store/test_jobs.py` tests claims directly)."""
    stream, _ = create_stream(cluster.inst, name="s", base={"kind": "tiny"})
    job = cluster.submit(stream, "long", seed=0, max_steps=600)  # about 10 s on a quiet machine
    started = cluster.wait([job.id], until=("running", "succeeded"))[0]
    done = cluster.wait([job.id])[0]
    assert done.state is JobState.SUCCEEDED
    assert done.finished_at is not None and started.started_at is not None
    assert (done.finished_at - started.started_at).total_seconds() > 3  # 3x the timeout
    assert done.attempts == 1 and cluster.starts(job.id) == 1
    assert len(cluster.inst.registry.adapters.list_versions(stream_id=stream.id)) == 1
    received = re.findall(r"Task strata\.run_job\[([0-9a-f-]+)\] received", cluster.workers.logs())
    again = len(received) - len(set(received))
    assert again >= 1, cluster.workers.logs(tail=4000)  # the fault happened
    assert len(set(received)) <= cluster.dispatcher.sent
    _report("visibility timeout", faults=again, submitted=1, lost=0, twice=0)
