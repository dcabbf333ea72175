"""The embedded end-to-end slice: a tiny model learns three generated tasks in sequence."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from continual.data import synthetic_tasks
from registry.entities import Job, Snapshot, Stream
from registry.errors import NotFound
from registry.instance import Instance
from services.streams import submit_task
from workers.reporting import Listener
from workers.runner import run_job
from workers.streams import create_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    stream: Stream
    base: Snapshot
    jobs: tuple[Job, ...]


def free_stream_name(inst: Instance, prefix: str) -> str:
    """`prefix`, or `prefix-2`, `prefix-3`... whichever is not taken yet."""
    n = 1
    while True:
        name = prefix if n == 1 else f"{prefix}-{n}"
        try:
            inst.registry.streams.get(name)
        except NotFound:
            return name
        n += 1


def run_demo(
    inst: Instance,
    *,
    stream_name: str | None = None,
    seed: int = 0,
    train_size: int = 256,
    test_size: int = 64,
    on_job_start: Listener | None = None,
    listener: Listener | None = None,
) -> DemoResult:
    """Import the tiny base, submit three synthetic tasks, train them in order through the same
    job code the service runs, evaluating every task after each one."""
    name = stream_name or free_stream_name(inst, "demo")
    # The default hyperparameters are tuned for the tiny model.
    stream, base = create_stream(inst, name=name, base={"kind": "tiny", "seed": seed})
    tasks = synthetic_tasks(seed=seed, train_size=train_size, test_size=test_size)
    submitted = [
        submit_task(inst, stream=stream, name=data.name, data=data, format="synthetic")
        for data in tasks
    ]
    finished = []
    for task, job in submitted:
        if on_job_start:
            on_job_start("job", {"job_id": job.id, "task": task.name, "position": task.position})
        finished.append(run_job(inst, job.id, listener=listener))
    return DemoResult(stream=stream, base=base, jobs=tuple(finished))
