"""Creating streams (their base model is imported by a worker's job) and submitting tasks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual.data import TaskData
from registry.entities import Dataset, Job, JobKind, Stream, StreamState, Task
from registry.errors import AlreadyExists, Conflict, NotFound
from registry.instance import Instance
from registry.validation import check_name
from services.datasets import dataset_blob
from services.imports import check_import
from services.policy import check_policy
from services.setup import TrainingSetup, training_setup

log = logging.getLogger(__name__)

DEFAULT_METHOD = "seq-lora"


@dataclass(frozen=True)
class StreamRequest:
    """A new stream's checked settings."""

    source: dict[str, Any]  # the base model's source, normalised
    setup: TrainingSetup
    policy: dict[str, Any]  # when to consolidate


def check_request(
    inst: Instance,
    *,
    name: str,
    base: dict[str, Any],
    method: str,
    hyperparams: dict[str, Any] | None,
    method_options: dict[str, Any] | None,
    consolidation: dict[str, Any] | None,
    roots: Sequence[Path] | None,
) -> StreamRequest:
    """Everything about a new stream that needs no model: its name (free, or held by a stream
    whose import failed), method, hyperparameters, options and policy, then its base source
    (`services.imports.check_import`: under `roots` unless None, its size within the
    limits; the import job checks it again with transformers)."""
    check_name(name, field="name")
    setup = training_setup(
        method=method, hyperparams=dict(hyperparams or {}), params={}, options=method_options or {}
    )
    policy = check_policy(consolidation or {}, method=method)
    try:
        existing = inst.registry.streams.get(name)
    except NotFound:
        pass
    else:
        if existing.state is not StreamState.FAILED:
            raise AlreadyExists(f"stream '{name}' already exists", field="name")
    max_params = inst.settings.import_max_params
    source = check_import(base, roots=roots, max_params=max_params)
    return StreamRequest(source=source, setup=setup, policy=policy)


def queue_stream(
    inst: Instance,
    *,
    name: str,
    base: dict[str, Any],
    method: str = DEFAULT_METHOD,
    hyperparams: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    consolidation: dict[str, Any] | None = None,
    roots: Sequence[Path],
) -> tuple[Stream, Job]:
    """Create a stream whose base model a worker imports (the API's way, `POST /v1/streams`).

    Everything is checked first (`check_request`, with the `hf`/`gguf` path under `roots`);
    then the stream, in state `importing`, and its queued import job are written in one
    transaction. The caller sends the job after the commit (`services.dispatch.enqueue`)."""
    req = check_request(
        inst, name=name, base=base, method=method, hyperparams=hyperparams,
        method_options=method_options, consolidation=consolidation, roots=roots,
    )  # fmt: skip
    return inst.registry.streams.begin_import(
        name=name, base_source=req.source, method=method, hyperparams=req.setup.hyper.to_dict(),
        method_options=req.setup.options, consolidation=req.policy,
    )  # fmt: skip


def submit_task(
    inst: Instance,
    *,
    stream: Stream,
    name: str,
    data: TaskData,
    format: str,
    params: dict[str, Any] | None = None,
) -> tuple[Task, Job]:
    """Append a task that trains on `data` and queue its training job.

    Everything that could refuse it is checked before anything is stored: the name, the
    parameters, the stream, a task of that name, the dataset. Then the dataset's blob is stored
    and its row, the task and the job are written in one transaction, so a refusal stores
    nothing. A failure after the blob (the database lost, the name taken meanwhile by another
    submission) leaves the blob unreferenced: it is content-addressed, so the same data
    submitted again reuses it, and removing unreferenced blobs is the blob collector's work
    (not written yet)."""
    check_name(name, field="name")
    params = dict(params or {})
    training_setup(
        method=stream.method, hyperparams=stream.hyperparams, params=params,
        options=stream.method_options,
    )  # fmt: skip
    blob, dataset = dataset_blob(data, format=format)
    inst.registry.tasks.check_submit(stream_id=stream.id, name=name, dataset=dataset)
    inst.artifacts.put_bytes(blob)  # blob first: a dataset row always points at a stored blob
    return inst.registry.tasks.submit(
        stream_id=stream.id, name=name, new_dataset=dataset, params=params
    )


def submit_existing(
    inst: Instance,
    *,
    stream: Stream,
    name: str,
    dataset: Dataset,
    params: dict[str, Any] | None = None,
) -> tuple[Task, Job]:
    """Append a task that trains on an already stored dataset (referenced by digest)."""
    check_name(name, field="name")
    params = dict(params or {})
    training_setup(
        method=stream.method, hyperparams=stream.hyperparams, params=params,
        options=stream.method_options,
    )  # fmt: skip
    return inst.registry.tasks.submit(
        stream_id=stream.id, name=name, dataset_id=dataset.id, params=params
    )


def check_foldable_state(inst: Instance, stream: Stream) -> None:
    """Refuse (409) a consolidation that would find nothing to fold when it runs: no adapter on
    the stream's current snapshot and no training job queued or running ahead of it."""
    if inst.registry.jobs.open_kinds(stream.id) & {JobKind.TRAIN, JobKind.RETRAIN}:
        return  # the consolidation runs after them, on the adapters they make
    try:
        snapshot = inst.registry.streams.current_snapshot(stream.id)
    except NotFound:
        raise Conflict(
            f"the stream is {stream.state} and has no task queued: nothing to fold",
            field="stream",
        ) from None
    if not inst.registry.adapters.stream_state(stream_id=stream.id, snapshot_id=snapshot.id):
        raise Conflict(
            f"no adapters on snapshot v{snapshot.version} to fold, and no training queued",
            field="stream",
        )
