"""Running jobs on workers: claims, heartbeats, hand-over to the stream's next job, and the
reconciler that makes the database, not the broker, the source of truth.

Delivery design (why a job never runs twice and is never lost):

- The broker message carries only the job id. Celery is set to acknowledge it on receipt (early
  ack), but it sends acknowledgements from its event loop, which a GPU worker's solo pool blocks
  while the job runs: the message is acknowledged when the job ends. Redis therefore delivers
  the message of a job running past the visibility timeout once more (its sweep restores it);
  the copy finds the job claimed and starts nothing.
- A worker *claims* the job in the database before running it: the claim succeeds only for a
  queued job that is first in its stream, under the stream's lease. Duplicate or early messages
  are dropped; nothing waits on another task.
- A running job heartbeats (renewing its stream lease); when it ends, its worker sends the
  stream's next queued job.
- The reconciler (in the scheduler's leader) re-queues running jobs whose heartbeat stopped (the
  worker died; the re-run resumes from the job's newest checkpoint), and re-sends queued jobs
  whose message is old (the broker lost it, or the send after commit never happened).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timedelta
from typing import Protocol

from registry.entities import Job, JobKind, JobState
from registry.errors import Conflict, RegistryError
from registry.instance import Instance

log = logging.getLogger(__name__)

TRAIN_QUEUE, DEFAULT_QUEUE = "train", "default"
PREDICT_QUEUE = "predict"  # predictions for the API: `services.broker.CeleryPredictor`
# an import holds a whole model in memory as training does: it runs where training runs
GPU_KINDS = frozenset({JobKind.TRAIN, JobKind.RETRAIN, JobKind.CONSOLIDATE, JobKind.IMPORT})


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def queue_for(kind: JobKind) -> str:
    """Training-type jobs and imports go to the GPU workers' queue; the rest to the default."""
    return TRAIN_QUEUE if kind in GPU_KINDS else DEFAULT_QUEUE


class Dispatcher(Protocol):
    """Sends a job's id to a worker: the Celery broker, or the embedded in-process worker."""

    def send(self, job: Job) -> None: ...


def enqueue(inst: Instance, dispatcher: Dispatcher, job: Job) -> bool:
    """Send `job` after its rows are committed; False when the broker is unreachable (the job
    stays queued in the database and the reconciler sends it later)."""
    try:
        dispatcher.send(job)
    except Exception as exc:  # the broker's own errors vary by transport
        log.warning("could not send job %s (%r); the reconciler will retry", job.id, exc)
        return False
    inst.registry.jobs.mark_enqueued(job.id)
    return True


def reconcile(inst: Instance, dispatcher: Dispatcher, *, now: datetime) -> dict[str, int]:
    """One pass of the reconciler; returns how many jobs it re-queued, failed and re-sent."""
    settings, jobs = inst.settings, inst.registry.jobs
    counts = {"requeued": 0, "failed": 0, "resent": 0}
    stale_before = now - timedelta(seconds=settings.stale_after_s)
    for job in jobs.stale_running(heartbeat_before=stale_before):
        try:
            if job.attempts >= settings.max_attempts:
                message = (
                    f"worker {job.worker} stopped responding; gave up after {job.attempts} attempts"
                )
                jobs.add_event(job.id, message=message, level="error")
                jobs.transition(
                    job.id, JobState.FAILED, error_code="worker_lost", error_message=message
                )
                counts["failed"] += 1
            else:
                jobs.add_event(
                    job.id,
                    message=f"worker {job.worker} stopped responding; re-queued",
                    level="warning",
                )
                jobs.transition(job.id, JobState.QUEUED)
                counts["requeued"] += 1
        except Conflict:  # it finished or was re-queued meanwhile
            continue
    resend_before = now - timedelta(seconds=settings.resend_after_s)
    for job in jobs.queued_heads(enqueued_before=resend_before):
        if enqueue(inst, dispatcher, job):
            counts["resent"] += 1
    if any(counts.values()):
        log.info("reconciler: %s", counts)
    return counts


def safe_reconcile(inst: Instance, dispatcher: Dispatcher, *, now: datetime) -> dict[str, int]:
    """`reconcile`, logging registry errors (the database may be restarting) instead of raising."""
    try:
        return reconcile(inst, dispatcher, now=now)
    except RegistryError as exc:
        log.warning("reconciler pass failed: %s", exc)
        return {}
