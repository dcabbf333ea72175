"""Retraining a task on new data: the task's dataset versions (1: what it was submitted with;
each upload of new data adds one) and retrain jobs that train on one of them, with a share of
the earlier versions' examples replayed.

A retrain job trains the task again on top of the stream's current state and publishes the
task's next adapter version (`workers.jobs.train_job`). A scheduled (cron) retrain takes the
newest version when it fires and skips, with the job event "no new data", when an adapter of
the task was already trained on it.
"""

from __future__ import annotations

import math
import random
from typing import Any

from continual.data import TaskData
from registry.entities import DatasetVersion, Job, JobKind, Stream, Task
from registry.errors import InvalidValue
from registry.instance import Instance
from services.datasets import dataset_blob, load_dataset
from services.setup import training_setup

DEFAULT_REPLAY = 0.0


def add_dataset_version(
    inst: Instance, *, stream: Stream, task_name: str, data: TaskData, format: str
) -> tuple[DatasetVersion, bool]:
    """Store `data` as the task's next dataset version; `(version, True)`. Data identical to
    the newest version is that version: `(newest, False)`, nothing new stored. The blob is
    content-addressed: data seen before (by any task) reuses its stored blob."""
    task = inst.registry.tasks.get(stream_id=stream.id, name=task_name)
    blob, dataset = dataset_blob(data, format=format)
    inst.artifacts.put_bytes(blob)  # blob first: a dataset row always points at a stored blob
    return inst.registry.tasks.add_version(task.id, dataset)


def dataset_ref(value: object) -> str | int:
    """A retrain request's `dataset`: "latest", a version number (>= 1) or a digest."""
    if isinstance(value, bool) or value is None:
        raise InvalidValue("must be 'latest', a version number or a digest", field="dataset")
    if isinstance(value, int):
        if value < 1:
            raise InvalidValue(f"a version number is >= 1, got {value}", field="dataset")
        return value
    if isinstance(value, str) and value:
        return int(value) if value.isdigit() else value
    raise InvalidValue("must be 'latest', a version number or a digest", field="dataset")


def check_replay(value: object) -> float:
    """The share of the earlier versions' examples mixed in, in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidValue(f"must be a number in [0, 1], got {value!r}", field="replay")
    if not 0 <= value <= 1:
        raise InvalidValue(f"must be in [0, 1], got {value}", field="replay")
    return float(value)


def retrain_task(
    inst: Instance,
    *,
    stream: Stream,
    task_name: str,
    dataset: object = "latest",
    replay: object = DEFAULT_REPLAY,
    params: dict[str, Any] | None = None,
) -> tuple[Task, DatasetVersion, Job]:
    """Queue a retrain of the task on one of its dataset versions (checked first: an unknown
    version, a deleted task or a bad parameter stores nothing)."""
    task = inst.registry.tasks.get(stream_id=stream.id, name=task_name)
    version = inst.registry.tasks.get_version(task.id, dataset_ref(dataset))
    params = {**(params or {}), "dataset_id": version.dataset.id,
              "dataset_version": version.version, "replay": check_replay(replay)}  # fmt: skip
    training_setup(
        method=stream.method, hyperparams=stream.hyperparams, params=params,
        options=stream.method_options,
    )  # fmt: skip
    job = inst.registry.jobs.create(
        kind=JobKind.RETRAIN, stream_id=stream.id, task_id=task.id, params=params,
        dataset_id=version.dataset.id,
    )  # fmt: skip
    return task, version, job


def replay_examples(
    inst: Instance, *, task_id: int, before_version: int, share: float, seed: int
) -> list[Any]:
    """`share` of the training examples of the task's versions before `before_version`, drawn
    without replacement with `seed` (the same examples on a re-run of the job)."""
    if share <= 0:
        return []
    pool: list[Any] = []
    seen: set[int] = set()
    for v in inst.registry.tasks.list_versions(task_id):
        if v.version < before_version and v.dataset.id not in seen:
            seen.add(v.dataset.id)
            pool.extend(load_dataset(inst, v.dataset).train)
    count = round(share * len(pool))
    return random.Random(seed).sample(pool, count) if count else []
