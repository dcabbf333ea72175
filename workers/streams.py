"""Creating streams (importing their base model) and submitting tasks to them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from continual.data import TaskData
from registry.entities import Dataset, Job, Snapshot, Stream, Task
from registry.errors import AlreadyExists, NotFound
from registry.instance import Instance
from registry.validation import check_name
from workers.consolidation import check_policy
from workers.datasets import store_dataset
from workers.imports import check_import
from workers.jobs import training_setup
from workers.models import load_source, store_model

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
    roots: Sequence[Path] | None = None,
) -> tuple[Stream, Snapshot]:
    """Import the base model as snapshot v0 of a new stream.

    Everything cheap is validated before the (slow) import, the model's size included
    (`workers.imports.check_import`); a `hf` or `gguf` path must lie under `roots`, unless None
    (an in-process caller's own files). The weights are stored before the rows, and the stream
    and its snapshot are written in one transaction.
    """
    check_name(name, field="name")
    source = check_import(base, roots=roots, max_params=inst.settings.import_max_params, exact=True)
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
    """Store the dataset, then append the task and queue its training job (one transaction)."""
    check_name(name, field="name")
    params = dict(params or {})
    # refuse bad hyperparameters before anything is stored
    training_setup(
        method=stream.method, hyperparams=stream.hyperparams, params=params,
        options=stream.method_options,
    )  # fmt: skip
    dataset = store_dataset(inst, data, format=format)
    return inst.registry.tasks.submit(
        stream_id=stream.id, name=name, dataset_id=dataset.id, params=params
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
