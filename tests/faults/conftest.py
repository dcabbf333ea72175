"""A server deployment whose parts the fault tests break: two Celery worker processes on a
private Redis, PostgreSQL, the S3 test server, and a reconciler ticking in the test process
(what `strata scheduler` does)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from continual.data import synthetic_tasks
from registry.entities import Job, JobState
from registry.instance import Instance, open_instance
from registry.settings import StrataSettings
from services.broker import CeleryDispatcher, make_celery
from services.dispatch import enqueue
from services.scheduler import tick
from services.streams import submit_task
from tests.harness import (
    PrivateRedis,
    Workers,
    celery_workers,
    private_redis,
    server_env,
    settings_kwargs,
)

KNOBS = {
    "STRATA_HEARTBEAT_S": "0.5", "STRATA_LEASE_S": "10", "STRATA_STALE_AFTER_S": "4",
    "STRATA_RESEND_AFTER_S": "2", "STRATA_CHECKPOINT_EVERY": "10", "STRATA_MAX_ATTEMPTS": "3",
    "STRATA_SCHEDULER_TICK_S": "0.5",
}  # fmt: skip
TIMEOUT_S = 300


class CountingDispatcher(CeleryDispatcher):
    """Sends through the broker like the service, counting the messages it sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = 0

    def send(self, job: Job) -> None:
        super().send(job)
        self.sent += 1


@dataclass
class Cluster:
    inst: Instance
    dispatcher: CountingDispatcher
    workers: Workers
    redis: PrivateRedis

    def submit(self, stream: Any, name: str, *, seed: int, **hyper: Any) -> Job:
        data = synthetic_tasks(seed=seed, train_size=32, test_size=6)[seed % 3]
        params = {"hyperparams": {"batch_size": 8, "rank": 4, **hyper}, "eval_limit": 6}
        _, job = submit_task(self.inst, stream=stream, name=name, data=data,
                             format="synthetic", params=params)  # fmt: skip
        enqueue(self.inst, self.dispatcher, job)
        return job

    def wait(self, ids: list[int], *, until: tuple[str, ...] = ("succeeded", "failed",
             "cancelled")) -> list[Job]:  # fmt: skip
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            jobs = [self.inst.registry.jobs.get(i) for i in ids]
            if all(j.state.value in until for j in jobs):
                return jobs
            time.sleep(0.2)
        states = [(j.id, j.state.value) for j in jobs]
        raise AssertionError(
            f"jobs did not reach {until}: {states}\n{self.workers.logs(tail=4000)}"
        )

    def starts(self, job_id: int) -> int:
        """How many times a worker started running the job (one event per run)."""
        events = self.inst.registry.jobs.events(job_id, limit=10_000)
        return sum(" job started (attempt " in e.message for e in events)

    def running(self) -> list[Job]:
        return self.inst.registry.jobs.list_jobs(state=JobState.RUNNING, limit=1000)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    extra: dict[str, str] = dict(getattr(request, "param", {}))  # indirect parametrization
    app = extra.pop("celery_app", "workers.celery_app")  # the workers' `celery -A` module
    with private_redis() as broker:
        env = {**server_env(request, tmp_path, broker=broker.url), **KNOBS, **extra}
        settings = StrataSettings(**settings_kwargs(env))
        inst = open_instance(settings, upgrade=False)
        dispatcher = CountingDispatcher(make_celery(settings))
        stop = threading.Event()

        def reconcile() -> None:  # the scheduler process's loop, in a thread
            while not stop.wait(settings.scheduler_tick_s):
                tick(inst, dispatcher, holder="faults", now=datetime.now(UTC))

        thread = threading.Thread(target=reconcile, daemon=True)
        thread.start()
        try:
            with celery_workers(env, tmp_path / "workers", count=2, app=app) as workers:
                yield Cluster(inst=inst, dispatcher=dispatcher, workers=workers, redis=broker)
        finally:
            stop.set()
            thread.join(10)
            inst.close()
