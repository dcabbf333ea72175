"""Submitting a task: a refusal stores neither the dataset's row nor its blob, on each
deployment (SQLite and a directory; PostgreSQL and S3)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from continual.data import synthetic_tasks
from continual.errors import InvalidHyperparameter
from registry.errors import AlreadyExists, NotFound
from registry.instance import Instance
from registry.store import tasks as task_store
from registry.tables import DatasetRow
from services.datasets import dataset_blob, load_dataset
from services.streams import submit_task


def _datasets(inst: Instance) -> int:
    with inst.registry.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(DatasetRow)) or 0)


def test_a_refused_task_stores_no_dataset_row_and_no_blob(
    instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = instance.registry.streams.create(
        name="s", base_source={"kind": "tiny"}, method="seq-lora", hyperparams={}
    )
    first, second = synthetic_tasks(seed=0, train_size=8, test_size=2)[:2]
    task, _ = submit_task(instance, stream=stream, name="t", data=first, format="synthetic")
    assert load_dataset(instance, instance.registry.tasks.get_dataset(task.dataset_digest)) == first
    _, refused = dataset_blob(second, format="synthetic")
    for name, params, error in [
        ("t", {}, AlreadyExists),  # the name is taken: 409 before anything is stored
        ("u", {"hyperparams": {"rank": 0}}, InvalidHyperparameter),
    ]:
        with pytest.raises(error):
            submit_task(instance, stream=stream, name=name, data=second, format="synthetic",
                        params=params)  # fmt: skip
        assert not instance.artifacts.exists(refused.digest)
        assert _datasets(instance) == 1
    with pytest.raises(NotFound):
        instance.registry.tasks.get_dataset(refused.digest)

    def lost(*_: Any, **__: Any) -> None:  # the database lost after the blob was stored
        raise RuntimeError("the database went away")

    monkeypatch.setattr(task_store, "insert_job", lost)
    with pytest.raises(RuntimeError):
        submit_task(instance, stream=stream, name="u", data=second, format="synthetic")
    assert _datasets(instance) == 1 and [t.name for t in instance.registry.tasks.list_tasks(
        stream.id)] == ["t"]  # fmt: skip
    assert instance.artifacts.exists(refused.digest)  # unreferenced, for the blob collector
    monkeypatch.undo()
    again, _ = submit_task(instance, stream=stream, name="u", data=second, format="synthetic")
    assert again.dataset_digest == refused.digest  # the same data reuses it
