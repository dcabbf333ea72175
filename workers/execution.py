"""The worker side of a job's message: claim it, run it with heartbeats, send the stream's
next job. How jobs reach workers and why none runs twice: `services.dispatch`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from registry.entities import Job
from registry.instance import Instance
from services.dispatch import Dispatcher, enqueue
from workers.reporting import Listener
from workers.runner import run_claimed

log = logging.getLogger(__name__)


def execute(
    inst: Instance,
    dispatcher: Dispatcher,
    job_id: int,
    *,
    worker: str,
    listener: Listener | None = None,
) -> Job | None:
    """The worker side of a message: claim, run with heartbeats, send the stream's next job.

    Returns the finished job, or None when the claim was refused (the message was a duplicate,
    came early, or the job was cancelled meanwhile)."""
    claim = inst.registry.jobs.claim(job_id, worker=worker, lease_s=inst.settings.lease_s)
    if not claim.claimed:
        log.info("job %s not started on %s: %s", job_id, worker, claim.reason)
        return None
    with heartbeat(inst, job_id):
        job = run_claimed(inst, claim.job, listener=listener)
    if job.stream_id is not None:
        nxt = inst.registry.jobs.next_in_stream(job.stream_id)
        if nxt is not None:
            enqueue(inst, dispatcher, nxt)
    return job


@contextmanager
def heartbeat(inst: Instance, job_id: int) -> Iterator[None]:
    """Heartbeat the job every `settings.heartbeat_s` from a thread while the block runs, so
    loading a model or evaluating (no training steps) does not look like a dead worker."""
    stop = threading.Event()
    settings = inst.settings

    def beat() -> None:
        while not stop.wait(settings.heartbeat_s):
            try:
                inst.registry.jobs.heartbeat(job_id, lease_s=settings.lease_s)
            except Exception as exc:  # a database blip must not kill the job
                log.warning("heartbeat of job %s failed: %r", job_id, exc)

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
