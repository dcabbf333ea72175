"""The Celery worker side: the app (configured in `services.broker`) and its thin tasks, one
that runs a job by id and one that answers a prediction.

    celery -A workers.celery_app worker -Q train -P solo -c 1        # a GPU worker
    celery -A workers.celery_app worker -Q default -P threads -c 4   # evaluation, housekeeping
    celery -A workers.celery_app worker -Q predict -P threads -c 2   # predictions for the API

GPU workers use the `solo` pool: the job runs in the worker's main process, one at a time (no
fork after CUDA initialised, no second model on the device). Messages are acknowledged early,
on receipt, but Celery sends the acknowledgement from its event loop, which the solo pool
blocks while a job runs: a job longer than the visibility timeout has its message delivered
once more, and the copy finds the job claimed (see `services.dispatch`). A `predict` worker
keeps the last models it built in memory (`workers.predict`) and runs one forward pass at a
time; its answers go back through the result backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from functools import cache
from typing import Any

import redis
from celery import signals

from registry.errors import InvalidValue
from registry.instance import Instance, open_instance
from registry.settings import StrataSettings
from services.broker import CANCEL_KEY, PREDICT, RUN_JOB, CeleryDispatcher, default_app
from services.dispatch import worker_id
from services.metrics_dir import multiprocess_dir
from services.predict import PredictQuery
from workers.execution import execute
from workers.metrics import serve_metrics
from workers.models import model_device
from workers.predict import answer

log = logging.getLogger(__name__)

app = default_app()  # the one `CeleryDispatcher()` sends with


@signals.worker_init.connect
def _announce_device(**_: object) -> None:
    """Say at start where this worker runs models, or that the GPU it was told to use is not
    there (every job it takes would then fail with that error)."""
    try:
        log.info("models run on %s", model_device(StrataSettings().device))
    except InvalidValue as exc:
        log.error("STRATA_DEVICE: %s; every job that loads a model will fail", exc.reason)


@signals.worker_init.connect
def _serve_metrics(**_: object) -> None:
    """With `STRATA_METRICS_PORT`, serve this worker's metrics there (README, "Metrics")."""
    settings = StrataSettings()
    if settings.metrics_port is not None:
        serve_metrics(settings.metrics_port, settings.metrics_host)


@signals.worker_process_shutdown.connect
def _process_gone(pid: int | None = None, **_: object) -> None:
    """A prefork pool's process ends: its live gauges stop counting."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), str(path))


@cache
def _instance() -> Instance:
    """One instance per worker process, opened on its first task (the schema is migrated by
    the deployment's one-shot migration, not by workers)."""
    return open_instance(StrataSettings(), upgrade=False)


@app.task(name=RUN_JOB)
def run_job_task(job_id: int) -> str:
    """Claim and run one job; the return value is only a log line."""
    inst = _instance()
    job = execute(inst, CeleryDispatcher(app), int(job_id), worker=worker_id())
    return "not started" if job is None else f"job {job.id} {job.state}"


class _CancelKey:
    """`is_set()` once the API set the query's cancel key (read at most every 0.2 s)."""

    def __init__(self, url: str, task_id: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.key = CANCEL_KEY + task_id
        self._checked, self._set = 0.0, False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._checked >= 0.2:
            self._checked = now
            # a broker blink: keep going; the API's timeout still bounds the wait
            with contextlib.suppress(redis.RedisError):
                self._set = bool(self.client.exists(self.key))
        return self._set


@app.task(name=PREDICT, bind=True, ignore_result=False)
def predict_task(self: Any, query: dict[str, Any]) -> dict[str, Any]:
    """Answer one prediction query (`services.predict`) with the response's body."""
    cancel = _CancelKey(app.conf.broker_url or "", self.request.id or "")
    try:
        return answer(_instance(), PredictQuery.from_json(query), cancel=cancel)  # type: ignore[arg-type]
    finally:
        cancel.client.close()
