"""The Celery app: a Redis broker, two queues, thin tasks that take a job id.

    celery -A workers.celery_app worker -Q train -P solo -c 1      # a GPU worker
    celery -A workers.celery_app worker -Q default -P threads -c 4 # evaluation, housekeeping

GPU workers use the `solo` pool: the job runs in the worker's main process, one at a time (no
fork after CUDA initialised, no second model on the device). Messages are acknowledged early,
on receipt, but Celery sends the acknowledgement from its event loop, which the solo pool
blocks while a job runs: a job longer than the visibility timeout has its message delivered
once more, and the copy finds the job claimed (see `workers.execution`). Results are not
stored: the database holds every job's state.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import cache

import redis
from celery import Celery, signals
from kombu import Queue

from registry.entities import Job
from registry.errors import InvalidValue, Unavailable
from registry.instance import Instance, open_instance
from registry.settings import StrataSettings
from workers.execution import DEFAULT_QUEUE, TRAIN_QUEUE, execute, queue_for, worker_id
from workers.models import model_device

log = logging.getLogger(__name__)

RUN_JOB = "strata.run_job"


def make_celery(settings: StrataSettings) -> Celery:
    app = Celery("strata", broker=settings.broker_url)
    app.conf.update(
        task_queues=(Queue(TRAIN_QUEUE), Queue(DEFAULT_QUEUE)),
        task_default_queue=DEFAULT_QUEUE,
        task_acks_late=False,  # early ack (sent when the solo pool's job ends: see above)
        worker_prefetch_multiplier=1,  # a GPU worker holds one message: the job it runs
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
        # a broker that stops answering fails a send in bounded time (the job stays queued in
        # the database and the reconciler sends it later), never holding an API thread
        broker_connection_timeout=settings.broker_timeout_s,
        task_publish_retry_policy={
            "max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5,
        },
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_timeout": settings.broker_timeout_s,
            "socket_connect_timeout": settings.broker_timeout_s,
        },
    )  # fmt: skip
    return app


app = make_celery(StrataSettings())


@signals.worker_init.connect
def _announce_device(**_: object) -> None:
    """Say at start where this worker runs models, or that the GPU it was told to use is not
    there (every job it takes would then fail with that error)."""
    try:
        log.info("models run on %s", model_device(StrataSettings().device))
    except InvalidValue as exc:
        log.error("STRATA_DEVICE: %s; every job that loads a model will fail", exc.reason)


@cache
def _instance() -> Instance:
    """One instance per worker process, opened on its first task (the schema is migrated by
    the deployment's one-shot migration, not by workers)."""
    return open_instance(StrataSettings(), upgrade=False)


class CeleryDispatcher:
    """Sends job ids to the broker, on the queue of the job's kind.

    A send that failed marks the broker down for `broker_timeout_s`: sends meanwhile fail at
    once instead of each waiting out the timeout (their jobs stay queued in the database, and
    the reconciler sends them once the broker answers)."""

    def __init__(self, celery: Celery = app) -> None:
        self.celery = celery
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def _timeout_s(self) -> float:
        return float(self.celery.conf.broker_connection_timeout or 4.0)

    def send(self, job: Job) -> None:
        if time.monotonic() < self._down_until:
            raise Unavailable("the broker did not answer a moment ago; not trying again yet")
        try:
            self.celery.send_task(RUN_JOB, args=[job.id], queue=queue_for(job.kind))
        except Exception:
            with self._lock:
                self._down_until = time.monotonic() + self._timeout_s
            raise

    def ping(self) -> None:
        """One round trip to the broker, bounded by its timeout (`Unavailable` otherwise)."""
        url = self.celery.conf.broker_url or ""
        if not url.startswith(("redis://", "rediss://")):
            return  # another transport: its connection is checked by its sends
        timeout = self._timeout_s
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise Unavailable(f"the broker is unavailable: {exc}") from exc
        finally:
            client.close()


@app.task(name=RUN_JOB)
def run_job_task(job_id: int) -> str:
    """Claim and run one job; the return value is only a log line."""
    inst = _instance()
    job = execute(inst, CeleryDispatcher(app), int(job_id), worker=worker_id())
    return "not started" if job is None else f"job {job.id} {job.state}"
