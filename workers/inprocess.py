"""The embedded default's worker: threads in the API process that run the same job code.

`strata serve` (SQLite + a local artifact directory, no broker) sends job ids to an in-process
queue; `threads` workers take them one at a time through `workers.execution.execute`, with the
same claims, stream leases, heartbeats and hand-over as Celery workers. A scheduler thread
fires schedules and reconciles, so jobs queued before a restart are picked up again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

from registry.entities import Job
from registry.instance import Instance
from services.scheduler import run_scheduler
from workers.execution import execute

log = logging.getLogger(__name__)


class InProcessWorker:
    """A dispatcher whose consumers are threads of this process."""

    def __init__(self, inst: Instance, *, threads: int = 1, scheduler: bool = True) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.inst = inst
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._consume, args=(i,), name=f"strata-worker-{i}", daemon=True
            )
            for i in range(threads)
        ]
        if scheduler:
            self._threads.append(
                threading.Thread(target=self._schedule, name="strata-scheduler", daemon=True)
            )

    def send(self, job: Job) -> None:
        self._queue.put(job.id)

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting for one of this process's threads (`strata_queue_depth{queue="inprocess"}`
        of `strata serve`'s /metrics)."""
        return {"inprocess": self._queue.qsize()}

    def start(self) -> InProcessWorker:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, *, timeout: float | None = None) -> None:
        """Stop taking jobs; a job that is running finishes first (or is re-queued later)."""
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _consume(self, index: int) -> None:
        worker = f"embedded:{os.getpid()}:{index}"
        while not self._stop.is_set():
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                execute(self.inst, self, job_id, worker=worker)
            except Exception:  # keep the thread alive; the job's state says what happened
                log.exception("in-process worker %s: job %s", worker, job_id)

    def _schedule(self) -> None:
        run_scheduler(self.inst, self, stop=self._stop, holder=f"scheduler@embedded:{os.getpid()}")
