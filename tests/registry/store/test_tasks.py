"""The task store: datasets are content-addressed; submitting a task writes the task and its job
together, and with a new dataset the dataset's row, the task and its job are written in one
transaction, on SQLite and PostgreSQL, and a refusal writes none of them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.entities import JobKind, JobState, NewDataset
from registry.errors import AlreadyExists, InvalidReference, InvalidValue, NotFound
from registry.store import SqlRegistry
from registry.store import tasks as task_store
from registry.tables import DatasetRow, JobRow, TaskRow
from tests.registry.store.helpers import _dataset

D2, D3 = "b" * 64, "c" * 64
NEW = NewDataset(digest=D2, format="jsonl", num_train=3, num_test=1, size_bytes=10, labels=("x",))


def _stream(reg: SqlRegistry) -> int:
    return reg.streams.create(
        name="s1", base_source={"kind": "tiny"}, method="seq-lora", hyperparams={}
    ).id


def test_a_new_dataset_is_written_with_its_task_and_job(registry: SqlRegistry) -> None:
    stream_id = _stream(registry)
    task, job = registry.tasks.submit(stream_id=stream_id, name="a", new_dataset=NEW,
                                      params={"x": 1})  # fmt: skip
    stored = registry.tasks.get_dataset(D2)
    assert (task.dataset_id, task.dataset_digest, job.task_id) == (stored.id, D2, task.id)
    assert (stored.num_train, stored.num_test, stored.labels) == (3, 1, ("x",))
    assert job.params == {"x": 1}
    assert registry.jobs.get(job.id).state.value == "queued"
    again, _ = registry.tasks.submit(stream_id=stream_id, name="b", new_dataset=NEW)
    assert again.dataset_id == stored.id  # the same digest is the same dataset
    reused, _ = registry.tasks.submit(stream_id=stream_id, name="c", dataset_id=stored.id)
    assert reused.dataset_digest == D2


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"name": "a"}, AlreadyExists, "name"),
        ({"stream_id": 999}, NotFound, "stream"),
        ({"name": "../a"}, InvalidValue, "name"),
        ({"dataset": replace(NEW, digest=D3, num_train=0)}, InvalidValue, "num_train"),
        ({"dataset": replace(NEW, digest="C" * 64)}, InvalidValue, "digest"),
    ],
)
def test_refusals_are_checked_before_and_in_the_transaction_and_write_nothing(
    registry: SqlRegistry, change: dict[str, Any], error: type[Exception], field: str
) -> None:
    stream_id = _stream(registry)
    registry.tasks.submit(stream_id=stream_id, name="a", new_dataset=NEW)
    args = {"stream_id": stream_id, "name": "b", "dataset": replace(NEW, digest=D3), **change}
    with pytest.raises(error) as checked:
        registry.tasks.check_submit(**args)
    new = args.pop("dataset")
    with pytest.raises(error) as submitted:
        registry.tasks.submit(**args, new_dataset=new)
    assert checked.value.field == submitted.value.field == field  # type: ignore[attr-defined]
    with pytest.raises(NotFound):
        registry.tasks.get_dataset(D3)
    assert [t.name for t in registry.tasks.list_tasks(stream_id)] == ["a"]
    registry.tasks.check_submit(stream_id=stream_id, name="b", dataset=replace(NEW, digest=D3))
    with pytest.raises(InvalidValue):  # a dataset by id or a new one: one of them
        registry.tasks.submit(stream_id=stream_id, name="b")
    with pytest.raises(InvalidValue):
        registry.tasks.submit(stream_id=stream_id, name="b", dataset_id=1, new_dataset=NEW)


def test_a_failure_after_the_dataset_row_leaves_no_row(
    registry: SqlRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_id = _stream(registry)
    written: list[bool] = []

    def fail(s: Session, **_: Any) -> None:  # the job's insert, after the dataset's and task's
        written.append(s.scalar(select(DatasetRow).where(DatasetRow.digest == D3)) is not None)
        raise RuntimeError("the database went away")

    monkeypatch.setattr(task_store, "insert_job", fail)
    with pytest.raises(RuntimeError):
        registry.tasks.submit(stream_id=stream_id, name="a", new_dataset=replace(NEW, digest=D3))
    assert written == [True]  # the dataset's row was written in the transaction, then undone
    with pytest.raises(NotFound):
        registry.tasks.get_dataset(D3)
    assert registry.tasks.list_tasks(stream_id) == []


def test_datasets_are_content_addressed(registry: SqlRegistry) -> None:
    first = _dataset(registry)
    assert _dataset(registry) == first
    assert registry.tasks.get_dataset(D2).labels == ("x", "y")
    with pytest.raises(InvalidValue):
        registry.tasks.get_dataset("../../etc/passwd")
    with pytest.raises(NotFound):
        registry.tasks.get_dataset("f" * 64)


def test_submit_task_writes_task_and_job_together(registry: SqlRegistry) -> None:
    stream_id = _stream(registry)
    ds = _dataset(registry)
    t0, job = registry.tasks.submit(stream_id=stream_id, name="a", dataset_id=ds, params={"x": 1})
    t1, _ = registry.tasks.submit(stream_id=stream_id, name="b", dataset_id=ds)
    assert (t0.position, t1.position) == (0, 1)
    assert job.kind is JobKind.TRAIN and job.state is JobState.QUEUED and job.task_id == t0.id
    assert job.params == {"x": 1} and t0.dataset_digest == D2
    with pytest.raises(AlreadyExists):
        registry.tasks.submit(stream_id=stream_id, name="a", dataset_id=ds)
    with pytest.raises(InvalidReference):
        registry.tasks.submit(stream_id=stream_id, name="c", dataset_id=12345)
    with pytest.raises(NotFound):
        registry.tasks.submit(stream_id=999, name="c", dataset_id=ds)
    with registry.engine.connect() as conn:  # the refused submissions left no rows behind
        assert conn.scalar(select(func.count()).select_from(JobRow)) == 2
        assert conn.scalar(select(func.count()).select_from(TaskRow)) == 2
    assert [t.name for t in registry.tasks.list_tasks(stream_id)] == ["a", "b"]
