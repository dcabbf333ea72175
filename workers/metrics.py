"""What a worker process counts (README, "Metrics"), and a Celery worker's metrics port.

A Celery worker started with `STRATA_METRICS_PORT` serves Prometheus's text format on that port
(`STRATA_METRICS_HOST`, default all interfaces) from its main process, adding up every process
of its pool: `workers/__init__.py` turns prometheus_client's multiprocess mode on before
anything imports it, so prefork children count into files the main process reads. In the
embedded `strata serve`, jobs run in the API's own process and its /metrics shows them.
"""

from __future__ import annotations

import logging
import os
import threading

from prometheus_client import Gauge, Histogram, start_http_server

from services.metrics import metrics_registry
from services.metrics_dir import multiprocess_dir

log = logging.getLogger(__name__)

JOB_SECONDS = Histogram(
    "strata_job_duration_seconds",
    "How long a job ran on a worker (claim to end), by kind and the state it ended in",
    ["kind", "state"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400),
)
TOKENS_PER_S = Gauge(
    "strata_training_tokens_per_second",
    "Training throughput of the jobs training now (each job's tokens/s so far, summed)",
    multiprocess_mode="livesum",
)


class Throughput:
    """The training jobs of this process and their latest tokens/s; the gauge shows their sum
    (threads of one process may train at once; in multiprocess mode live processes add up)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, float] = {}

    def report(self, job_id: int, tokens_per_s: float) -> None:
        with self._lock:
            self._jobs[job_id] = tokens_per_s
            TOKENS_PER_S.set(sum(self._jobs.values()))

    def ended(self, job_id: int) -> None:
        with self._lock:
            if self._jobs.pop(job_id, None) is not None:
                TOKENS_PER_S.set(sum(self._jobs.values()))


THROUGHPUT = Throughput()


def serve_metrics(port: int, host: str) -> None:
    """Serve this process's metrics (all of its pool's, in multiprocess mode) on host:port,
    from a thread of prometheus_client's."""
    path = multiprocess_dir()
    if path is None:
        log.warning("metrics on port %d: multiprocess mode is off, so the jobs of a prefork "
                    "pool's processes are not counted", port)  # fmt: skip
    try:
        start_http_server(port, addr=host, registry=metrics_registry())
    except OSError as exc:  # the jobs matter more than their metrics: run them anyway
        log.error("cannot serve metrics on %s:%d (%s); this worker runs without", host, port,
                  exc.strerror or exc)  # fmt: skip
        return
    log.info("metrics on http://%s:%d/metrics (pid %d, files in %s)", host, port, os.getpid(), path)
