"""Running a job by id: claim it, dispatch it to its kind's handler, record how it ended.

Jobs start from nothing but an id: `run_job(inst, job_id)` claims and runs one (`strata demo`),
and the workers (`workers.execution.execute`, for Celery and the in-process worker of
`strata serve`) claim first, then call `run_claimed` with heartbeats around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from continual.errors import (
    TrainingCancelled,
)
from registry.entities import Job, JobKind, JobState
from registry.errors import Unavailable
from registry.instance import Instance
from services.errors import INTERNAL, code_of
from services.policy import queue_if_due
from workers.consolidation import consolidate
from workers.imports import import_job
from workers.jobs import evaluate_job, train_job
from workers.metrics import JOB_SECONDS, THROUGHPUT
from workers.reporting import JobReporter, Listener

log = logging.getLogger(__name__)

HANDLERS: dict[JobKind, Callable[[Instance, Job, JobReporter], None]] = {
    JobKind.TRAIN: train_job,
    JobKind.RETRAIN: train_job,
    JobKind.EVALUATE: evaluate_job,
    JobKind.CONSOLIDATE: consolidate,
    JobKind.IMPORT: import_job,
}


def run_job(
    inst: Instance, job_id: int, *, worker: str = "embedded", listener: Listener | None = None
) -> Job:
    """Claim a queued job and run it to a terminal state; returns the job as it ends up.

    A job that cannot start now (finished, running elsewhere, or waiting for an earlier job of
    its stream) is returned as it is, untouched."""
    claim = inst.registry.jobs.claim(job_id, worker=worker, lease_s=inst.settings.lease_s)
    if not claim.claimed:
        log.info("job %s not started: %s", job_id, claim.reason)
        return claim.job
    return run_claimed(inst, claim.job, listener=listener)


def run_claimed(inst: Instance, job: Job, *, listener: Listener | None = None) -> Job:
    """Run a job this worker has claimed (state running) to a terminal state; one log line
    when it starts and one when it ends, for whoever reads the worker's (or server's) log, and
    its duration in `strata_job_duration_seconds`."""
    where = "".join(f", {k} {v}" for k, v in (("stream", job.stream_id), ("task", job.task_id))
                    if v is not None)  # fmt: skip
    log.info("job %s (%s%s) started on %s, attempt %s", job.id, job.kind.value, where,
             job.worker, job.attempts)  # fmt: skip
    start = time.monotonic()
    try:
        ended = _run_claimed(inst, job, listener=listener)
    finally:
        THROUGHPUT.ended(job.id)
    JOB_SECONDS.labels(ended.kind.value, ended.state.value).observe(time.monotonic() - start)
    error = f": {ended.error.code}: {ended.error.message}" if ended.error else ""
    log.log(logging.WARNING if ended.state is JobState.FAILED else logging.INFO,
            "job %s (%s) %s in %.1f s%s", ended.id, ended.kind.value, ended.state.value,
            time.monotonic() - start, error[:300])  # fmt: skip
    return ended


def _run_claimed(inst: Instance, job: Job, *, listener: Listener | None) -> Job:
    jobs = inst.registry.jobs
    reporter = JobReporter(inst, job.id, listener=listener, worker=job.worker)
    handler = HANDLERS.get(job.kind)
    if handler is None:
        return _fail(inst, reporter, job.id, code="unsupported", message=f"no {job.kind} jobs yet")
    reporter.event(f"{job.kind} job started (attempt {job.attempts})")
    try:
        handler(inst, job, reporter)
    except TrainingCancelled:
        current = jobs.get(job.id)
        if current.state is not JobState.RUNNING or current.worker != job.worker:
            log.warning("job %s is no longer %s's (%s); stopped", job.id, job.worker, current.state)
            return current
        reporter.event("cancelled at the user's request", level="warning")
        return jobs.transition(job.id, JobState.CANCELLED)
    except Unavailable as exc:  # the database or the object store is away for a while
        if job.attempts < inst.settings.max_attempts:
            reporter.event(f"{exc.reason}; the job will be retried", level="warning")
            return jobs.transition(job.id, JobState.QUEUED)  # the reconciler sends it again
        return _fail(inst, reporter, job.id, code=exc.code, message=str(exc))
    except Exception as exc:  # a coded error is the job's input's fault; others are ours
        code = code_of(exc)
        if code is None:
            log.exception("job %s failed", job.id)
            return _fail(inst, reporter, job.id, code=INTERNAL, message=repr(exc))
        return _fail(inst, reporter, job.id, code=code, message=str(exc))
    if job.kind in (JobKind.TRAIN, JobKind.RETRAIN) and job.stream_id is not None:
        queued = queue_if_due(inst, job.stream_id, after_job=job.id)
        if queued is not None:
            reporter.event(f"queued consolidation job {queued.id}: {queued.params['reason']}")
    reporter.event("succeeded")
    return jobs.transition(job.id, JobState.SUCCEEDED)


def _fail(inst: Instance, reporter: JobReporter, job_id: int, *, code: str, message: str) -> Job:
    reporter.event(f"failed: {message}", level="error")
    return inst.registry.jobs.transition(
        job_id, JobState.FAILED, error_code=code, error_message=message
    )
