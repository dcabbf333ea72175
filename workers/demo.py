"""The embedded end-to-end slice: a tiny model learns three generated tasks in sequence, once
with plain sequential LoRA and once with the recommended composed pipeline, so that the two
accuracy matrices show what the service is for."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from continual.data import TaskData, synthetic_tasks
from registry.entities import Job, JobKind, JobState, Snapshot, Stream
from registry.errors import NotFound
from registry.instance import Instance
from services.streams import submit_task
from workers.bench import COMPOSED, COMPOSED_OPTIONS
from workers.reporting import Listener
from workers.runner import run_job
from workers.streams import create_stream

log = logging.getLogger(__name__)

SEQ_LORA = "seq-lora"
DEMO_MAX_DROP = 2.0  # the recommended gate (README, "Which method?")


@dataclass(frozen=True)
class DemoStream:
    """One method's run: its stream, base snapshot v0, and every job it ran, in order."""

    method: str  # "seq-lora" or "composed"
    stream: Stream
    base: Snapshot
    jobs: tuple[Job, ...]
    folds: tuple[tuple[int, Job], ...] = ()  # (position of the task it came after, the job)

    @property
    def failed(self) -> tuple[Job, ...]:
        """Jobs that went wrong. A consolidation the gate refused (`consolidation_regressed`) is
        not among them: the stream goes on unfolded, as the policy says."""
        return tuple(j for j in self.jobs if j.state is not JobState.SUCCEEDED and not _refused(j))


@dataclass(frozen=True)
class DemoResult:
    runs: tuple[DemoStream, ...]  # seq-lora first, then composed


def _refused(job: Job) -> bool:
    return job.error is not None and job.error.code == "consolidation_regressed"


def demo_streams(max_drop: float = DEMO_MAX_DROP) -> dict[str, dict[str, Any]]:
    """What each demo stream is created with: plain seq-lora, and the composed pipeline of
    `strata bench --methods composed` as a stream (am-lora with task routing by whole prompts,
    new adapters at 0.9 of the mixture, and O-LoRA's overlap term, folded into a new snapshot
    every 2 tasks when no task drops more than `max_drop` points). Both keep the default
    hyperparameters, which suit the tiny model."""
    composed = {
        "method": "am-lora",
        "method_options": dict(COMPOSED_OPTIONS),
        "consolidation": {"every_tasks": 2, "max_drop": max_drop},
    }
    return {SEQ_LORA: {"method": SEQ_LORA}, COMPOSED: composed}


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


@contextmanager
def _one_thread() -> Iterator[None]:
    """The tiny model's matrices are 64 wide: a second thread only adds synchronisation, and
    on a machine whose cores are busy it made the whole demo several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_demo(
    inst: Instance,
    *,
    seed: int = 0,
    train_size: int = 256,
    test_size: int = 64,
    max_drop: float = DEMO_MAX_DROP,
    on_job_start: Listener | None = None,
    listener: Listener | None = None,
) -> DemoResult:
    """Import the tiny base, then learn three synthetic tasks in order on two streams
    (`demo_streams`) through the same job code the service runs, evaluating every task after
    each one. `on_job_start("job", payload)` comes before each job (its id, kind, the stream's
    method, and for a training job the task and its position)."""
    tasks = synthetic_tasks(seed=seed, train_size=train_size, test_size=test_size)
    runs = []
    with _one_thread():
        for method, spec in demo_streams(max_drop).items():
            name = free_stream_name(inst, f"demo-{method}")
            run = _run_stream(inst, method=method, name=name, spec=spec, seed=seed, tasks=tasks,
                              on_job_start=on_job_start, listener=listener)  # fmt: skip
            runs.append(run)
    return DemoResult(runs=tuple(runs))


def _run_stream(
    inst: Instance,
    *,
    method: str,
    name: str,
    spec: dict[str, Any],
    seed: int,
    tasks: list[TaskData],
    on_job_start: Listener | None,
    listener: Listener | None,
) -> DemoStream:
    """Submit every task, then run the stream's jobs in order: each training job, and any
    consolidation its stream's policy queued right after it."""
    stream, base = create_stream(inst, name=name, base={"kind": "tiny", "seed": seed}, **spec)
    submitted = [
        submit_task(inst, stream=stream, name=data.name, data=data, format="synthetic")
        for data in tasks
    ]
    finished: list[Job] = []
    folds: list[tuple[int, Job]] = []

    def run(todo: Job, info: dict[str, Any]) -> Job:
        if on_job_start:
            on_job_start("job", {"job_id": todo.id, "kind": todo.kind.value, "method": method,
                                 **info})  # fmt: skip
        finished.append(run_job(inst, todo.id, listener=listener))
        return finished[-1]

    for task, job in submitted:
        run(job, {"task": task.name, "position": task.position})
        for queued in _queued_folds(inst, stream.id):  # queued by the job that made one due
            folds.append((task.position, run(queued, {"after_task": task.position})))
    return DemoStream(method=method, stream=stream, base=base, jobs=tuple(finished),
                      folds=tuple(folds))  # fmt: skip


def _queued_folds(inst: Instance, stream_id: int) -> list[Job]:
    jobs = inst.registry.jobs.list_jobs(stream_id=stream_id, state=JobState.QUEUED, limit=1000)
    return [j for j in jobs if j.kind is JobKind.CONSOLIDATE]
