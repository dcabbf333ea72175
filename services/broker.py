"""The Celery client side, without a model library: the app's configuration (a Redis broker,
three queues), sending job ids (`CeleryDispatcher`) and asking a `predict` worker for a
prediction (`CeleryPredictor`). The worker side, the tasks themselves: `workers.celery_app`.

Results are not stored for jobs (the database holds every job's state); a prediction's answer
comes back through the result backend (the broker's Redis), kept a minute past the timeout.
"""

from __future__ import annotations

import threading
import time
from functools import cache
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu import Queue

from registry.entities import Job
from registry.errors import Unavailable
from registry.settings import StrataSettings
from services.dispatch import DEFAULT_QUEUE, PREDICT_QUEUE, TRAIN_QUEUE, queue_for
from services.predict import PredictCancelled, PredictQuery, PredictTimeout, unwrap

RUN_JOB = "strata.run_job"
PREDICT = "strata.predict"
CANCEL_KEY = "strata:predict:cancel:"  # + the task id: set when its client went away
POLL_S = 0.25  # how often a waiting API thread looks for its client
# kombu's Redis transport keeps a queue's messages of priority p > 0 in the list
# f"{queue}{PRIORITY_SEP}{p}", for p in its priority steps
PRIORITY_SEP, PRIORITY_STEPS = "\x06\x16", (3, 6, 9)


def make_celery(settings: StrataSettings) -> Celery:
    app = Celery("strata", broker=settings.broker_url)
    app.conf.update(
        task_queues=(Queue(TRAIN_QUEUE), Queue(DEFAULT_QUEUE), Queue(PREDICT_QUEUE)),
        task_default_queue=DEFAULT_QUEUE,
        task_acks_late=False,  # early ack (sent when the solo pool's job ends: see above)
        worker_prefetch_multiplier=1,  # a GPU worker holds one message: the job it runs
        task_ignore_result=True,  # the database holds every job's state; only predictions
        result_backend=settings.broker_url,  # answer through the backend
        result_expires=int(settings.predict_timeout_s) + 60,
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
        # the result backend (predictions' answers) is the broker's Redis, with its timeouts
        redis_socket_timeout=settings.broker_timeout_s,
        redis_socket_connect_timeout=settings.broker_timeout_s,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_timeout": settings.broker_timeout_s,
            "socket_connect_timeout": settings.broker_timeout_s,
        },
    )  # fmt: skip
    return app


@cache
def default_app() -> Celery:
    """The app configured from this process's environment (`StrataSettings()`)."""
    return make_celery(StrataSettings())


class CeleryDispatcher:
    """Sends job ids to the broker, on the queue of the job's kind.

    A send that failed marks the broker down for `broker_timeout_s`: sends meanwhile fail at
    once instead of each waiting out the timeout (their jobs stay queued in the database, and
    the reconciler sends them once the broker answers)."""

    def __init__(self, celery: Celery | None = None) -> None:
        self.celery = celery if celery is not None else default_app()
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def _timeout_s(self) -> float:
        return float(self.celery.conf.broker_connection_timeout or 4.0)

    def send(self, job: Job) -> None:
        if time.monotonic() < self._down_until:
            raise Unavailable("the broker did not answer a moment ago; not trying again yet")
        try:
            # no result: a job's state is in the database (and with a result, the send would
            # also subscribe to the result backend, one more connection that could hang)
            self.celery.send_task(
                RUN_JOB, args=[job.id], queue=queue_for(job.kind), ignore_result=True
            )
        except Exception:
            with self._lock:
                self._down_until = time.monotonic() + self._timeout_s
            raise

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each of the app's queues: the lengths of its Redis lists (one
        per priority step; kombu's names) in one round trip, bounded by the broker's timeout.
        Messages a worker holds are not waiting and are not counted."""
        url = self.celery.conf.broker_url or ""
        if not url.startswith(("redis://", "rediss://")):
            return {}
        queues = [q.name for q in self.celery.conf.task_queues or ()]
        keys = {q: [q, *(f"{q}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS)] for q in queues}
        timeout = self._timeout_s
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            with client.pipeline(transaction=False) as pipe:
                for names in keys.values():
                    for key in names:
                        pipe.llen(key)
                lengths = iter(pipe.execute())
        except redis.RedisError as exc:
            raise Unavailable(f"the broker is unavailable: {exc}") from exc
        finally:
            client.close()
        return {q: sum(next(lengths) for _ in names) for q, names in keys.items()}

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


class CeleryPredictor:
    """Predictions by a worker of the `predict` queue. The message expires with the wait, so a
    worker that starts late never runs an abandoned query; a client that goes away (or the
    timeout) sets the query's cancel key, which the worker reads between inputs and tokens."""

    def __init__(self, celery: Celery, *, timeout_s: float) -> None:
        self.celery = celery
        self.timeout_s = timeout_s

    def predict(self, query: PredictQuery, *, cancel: threading.Event) -> dict[str, Any]:
        result = self.celery.send_task(
            PREDICT, args=[query.to_json()], queue=PREDICT_QUEUE, expires=self.timeout_s,
        )  # fmt: skip
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                if cancel.is_set():
                    raise PredictCancelled("the client went away")
                if time.monotonic() >= deadline:
                    raise PredictTimeout(
                        f"no prediction within {self.timeout_s:g} s (STRATA_PREDICT_TIMEOUT_S): "
                        "is a worker consuming the 'predict' queue?"
                    )
                try:
                    reply = result.get(timeout=POLL_S, propagate=True, disable_sync_subtasks=False)
                except CeleryTimeout:
                    continue
                return unwrap(reply)
        except (PredictCancelled, PredictTimeout):
            self._cancel(result.id)
            raise
        finally:
            result.forget()

    def _cancel(self, task_id: str) -> None:
        url = self.celery.conf.broker_url or ""
        try:
            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            client.set(CANCEL_KEY + task_id, b"1", ex=int(self.timeout_s) + 60)
            client.close()
        except redis.RedisError:
            pass  # the worker's own time limit still ends it
        self.celery.control.revoke(task_id)  # not started yet: never run
