"""Creating streams (importing their base model) and submitting tasks to them."""

from __future__ import annotations

import logging
from typing import Any

from continual.data import TaskData
from registry.entities import Dataset, Job, Snapshot, Stream, Task
from registry.errors import AlreadyExists, NotFound
from registry.instance import Instance
from registry.validation import check_name
from workers.consolidation import check_policy
from workers.datasets import dataset_blob
from workers.jobs import training_setup
from workers.models import check_source, load_source, store_model

log = logging.getLogger(__name__)

DEFAULT_METHOD = "seq-lora"


def create_stream(
    inst: Instance,
    *,
    name: str,
    base: dict[str, Any],
    method: str = DEFAULT_METHOD,
    hyperparams: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    consolidation: dict[str, Any] | None = None,
) -> tuple[Stream, Snapshot]:
    """Import the base model as snapshot v0 of a new stream.

    Everything cheap is validated before the (slow) import; the weights are stored before the
    rows, and the stream and its snapshot are written in one transaction.
    """
    check_name(name, field="name")
    source = check_source(base)
    hyperparams = dict(hyperparams or {})
    setup = training_setup(
        method=method, hyperparams=hyperparams, params={}, options=method_options or {}
    )
    policy = check_policy(consolidation or {}, method=method)
    try:
        inst.registry.streams.get(name)
    except NotFound:
        pass
    else:
        raise AlreadyExists(f"stream '{name}' already exists", field="name")
    model, tokenizer = load_source(source)
    digest = store_model(inst, model, tokenizer)
    stream = inst.registry.streams.create(
        name=name,
        base_source=source,
        method=method,
        hyperparams=setup.hyper.to_dict(),
        base_digest=digest,
        method_options=setup.options,
        consolidation=policy,
    )
    snapshot = inst.registry.streams.current_snapshot(stream.id)
    log.info("stream %s created with base snapshot %s", name, digest[:12])
    return stream, snapshot


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
