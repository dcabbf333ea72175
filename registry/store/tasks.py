"""Datasets (content-addressed) and the tasks of a stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.entities import Dataset, DatasetVersion, Job, JobKind, NewDataset, Task
from registry.errors import AlreadyExists, InvalidReference, InvalidValue, NotFound
from registry.store import _convert as convert
from registry.store._db import Database, lock
from registry.store.jobs import insert_job
from registry.tables import DatasetRow, StreamRow, TaskDatasetRow, TaskRow
from registry.validation import check_digest, check_name


class SqlTaskStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- datasets -------------------------------------------------------------------------------
    def add_dataset(
        self,
        *,
        digest: str,
        format: str,
        num_train: int,
        num_test: int,
        size_bytes: int,
        labels: Sequence[str] | None = None,
        prompt_template: str | None = None,
        completion_template: str | None = None,
    ) -> Dataset:
        """Register a dataset whose blob is already stored; the same digest is the same dataset
        (its blob holds its prompt format, so the templates given are the blob's)."""
        new = NewDataset(
            digest=digest, format=format, num_train=num_train, num_test=num_test,
            size_bytes=size_bytes, labels=tuple(labels) if labels is not None else None,
            prompt_template=prompt_template, completion_template=completion_template,
        )  # fmt: skip
        _check_dataset(new)
        return self._db.allocate(
            lambda s: convert.dataset(_dataset_row(s, new)), what="a dataset row"
        )

    def get_dataset(self, digest: str) -> Dataset:
        check_digest(digest)
        with self._db.tx() as s:
            row = s.scalar(select(DatasetRow).where(DatasetRow.digest == digest))
            if row is None:
                raise NotFound(f"dataset {digest} not found", field="dataset")
            return convert.dataset(row)

    def get_dataset_by_id(self, dataset_id: int) -> Dataset:
        with self._db.tx() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"dataset {dataset_id} not found", field="dataset")
            return convert.dataset(row)

    # -- tasks ----------------------------------------------------------------------------------
    def check_submit(self, *, stream_id: int, name: str, dataset: NewDataset | None = None) -> None:
        """Refuse what `submit` would refuse (a missing stream, a bad or taken name, a bad new
        dataset), writing nothing: a caller checks before it stores a new dataset's blob."""
        check_name(name, field="name")
        if dataset is not None:
            _check_dataset(dataset)
        with self._db.tx() as s:
            _check_new_task(s, s.get(StreamRow, stream_id), stream_id=stream_id, name=name)

    def submit(
        self,
        *,
        stream_id: int,
        name: str,
        dataset_id: int | None = None,
        new_dataset: NewDataset | None = None,
        params: dict[str, Any] | None = None,
    ) -> tuple[Task, Job]:
        """Append a task to the stream and queue its training job, in one transaction. The task
        trains on a stored dataset (`dataset_id`) or on `new_dataset`, whose row (the one of
        its digest, if there is one) is written in the same transaction: a refusal or a
        failure leaves no row of any of them."""
        check_name(name, field="name")
        if (dataset_id is None) == (new_dataset is None):
            raise InvalidValue("give a dataset id or a new dataset", field="dataset_id")
        if new_dataset is not None:
            _check_dataset(new_dataset)

        def attempt(s: Session) -> tuple[Task, Job]:
            stream = _check_new_task(s, lock(s, StreamRow, stream_id), stream_id=stream_id,
                                     name=name)  # fmt: skip
            if new_dataset is not None:
                dataset: DatasetRow | None = _dataset_row(s, new_dataset)
            else:
                dataset = s.get(DatasetRow, dataset_id)
            if dataset is None:
                raise InvalidReference(f"dataset {dataset_id} does not exist", field="dataset_id")
            position = s.scalar(
                select(func.coalesce(func.max(TaskRow.position) + 1, 0)).where(
                    TaskRow.stream_id == stream.id
                )
            )
            row = TaskRow(stream_id=stream_id, name=name, position=position, dataset_id=dataset.id)
            s.add(row)
            s.flush()
            s.add(TaskDatasetRow(task_id=row.id, version=1, dataset_id=dataset.id))
            job = insert_job(
                s,
                kind=JobKind.TRAIN,
                stream_id=stream_id,
                task_id=row.id,
                params=params or {},
                dataset_id=dataset.id,
            )
            return convert.task(row, dataset.digest), convert.job(job)

        return self._db.allocate(attempt, what="a task position")

    # -- dataset versions -----------------------------------------------------------------------
    def add_version(self, task_id: int, new: NewDataset) -> tuple[DatasetVersion, bool]:
        """A new version of the task's data (its blob already stored), numbered after the
        newest; `(version, True)`. The same content as the newest version is that version:
        `(newest, False)`. Content seen before under another digest's row is reused."""
        _check_dataset(new)

        def attempt(s: Session) -> tuple[DatasetVersion, bool]:
            task = lock(s, TaskRow, task_id)
            if task is None or task.deleted_at is not None:
                raise NotFound(f"task {task_id} not found", field="task")
            newest = _newest(s, task_id)
            dataset = _dataset_row(s, new)
            if newest is not None and newest.dataset_id == dataset.id:
                return _version(s, newest), False
            row = TaskDatasetRow(task_id=task_id, version=(newest.version if newest else 0) + 1,
                                 dataset_id=dataset.id)  # fmt: skip
            s.add(row)
            s.flush()
            return _version(s, row), True

        return self._db.allocate(attempt, what="a dataset version")

    def list_versions(self, task_id: int) -> list[DatasetVersion]:
        with self._db.tx() as s:
            rows = s.scalars(
                select(TaskDatasetRow)
                .where(TaskDatasetRow.task_id == task_id)
                .order_by(TaskDatasetRow.version)
            )
            return [_version(s, r) for r in rows]

    def get_version(self, task_id: int, ref: str | int = "latest") -> DatasetVersion:
        """Version `ref` of the task's data: "latest", a version number, or a dataset digest
        (its newest version). NotFound names the field `dataset`."""
        with self._db.tx() as s:
            query = select(TaskDatasetRow).where(TaskDatasetRow.task_id == task_id)
            if isinstance(ref, int) and not isinstance(ref, bool):
                row = s.scalar(query.where(TaskDatasetRow.version == ref))
            elif ref == "latest":
                row = _newest(s, task_id)
            elif isinstance(ref, str) and ref.isdigit():
                row = s.scalar(query.where(TaskDatasetRow.version == int(ref)))
            elif isinstance(ref, str):
                check_digest(ref, field="dataset")
                row = s.scalar(
                    query.join(DatasetRow, DatasetRow.id == TaskDatasetRow.dataset_id)
                    .where(DatasetRow.digest == ref)
                    .order_by(TaskDatasetRow.version.desc())
                    .limit(1)
                )
            else:
                raise InvalidValue("must be 'latest', a version number or a digest",
                                   field="dataset")  # fmt: skip
            if row is None:
                raise NotFound(f"dataset version {ref} of task {task_id} not found",
                               field="dataset")  # fmt: skip
            return _version(s, row)

    def get(self, *, stream_id: int, name: str) -> Task:
        check_name(name, field="task")
        with self._db.tx() as s:
            row = s.scalar(
                select(TaskRow).where(
                    TaskRow.stream_id == stream_id,
                    TaskRow.name == name,
                    TaskRow.deleted_at.is_(None),
                )
            )
            if row is None:
                raise NotFound(f"task '{name}' not found", field="task")
            return _task(s, row)

    def get_by_id(self, task_id: int) -> Task:
        with self._db.tx() as s:
            row = s.get(TaskRow, task_id)
            if row is None or row.deleted_at is not None:
                raise NotFound(f"task {task_id} not found", field="task")
            return _task(s, row)

    def list_tasks(self, stream_id: int) -> list[Task]:
        with self._db.tx() as s:
            rows = s.scalars(
                select(TaskRow)
                .where(TaskRow.stream_id == stream_id, TaskRow.deleted_at.is_(None))
                .order_by(TaskRow.position)
            )
            return [_task(s, r) for r in rows]


def _newest(s: Session, task_id: int) -> TaskDatasetRow | None:
    return s.scalar(
        select(TaskDatasetRow)
        .where(TaskDatasetRow.task_id == task_id)
        .order_by(TaskDatasetRow.version.desc())
        .limit(1)
    )


def _version(s: Session, row: TaskDatasetRow) -> DatasetVersion:
    dataset = convert.dataset(s.get_one(DatasetRow, row.dataset_id))
    return DatasetVersion(task_id=row.task_id, version=row.version, dataset=dataset,
                          created_at=convert.aware(row.created_at))  # fmt: skip


def _task(s: Session, row: TaskRow) -> Task:
    return convert.task(row, s.get_one(DatasetRow, row.dataset_id).digest)


def _check_dataset(new: NewDataset) -> None:
    check_digest(new.digest)
    if new.num_train < 1:
        raise InvalidValue("a dataset needs at least one training example", field="num_train")


def _dataset_row(s: Session, new: NewDataset) -> DatasetRow:
    """The row of the dataset's digest, added if there is none (the same digest is the same
    dataset)."""
    row = s.scalar(select(DatasetRow).where(DatasetRow.digest == new.digest))
    if row is None:
        row = DatasetRow(
            digest=new.digest, format=new.format, num_train=new.num_train,
            num_test=new.num_test, size_bytes=new.size_bytes,
            labels=list(new.labels) if new.labels is not None else None,
            prompt_template=new.prompt_template, completion_template=new.completion_template,
        )  # fmt: skip
        s.add(row)
        s.flush()
    return row


def _check_new_task(
    s: Session, stream: StreamRow | None, *, stream_id: int, name: str
) -> StreamRow:
    """The stream, live, whose tasks do not hold `name` (deleted ones included)."""
    if stream is None or stream.deleted_at is not None:
        raise NotFound(f"stream {stream_id} not found", field="stream")
    taken = select(TaskRow.id).where(TaskRow.stream_id == stream_id, TaskRow.name == name)
    if s.scalar(taken) is not None:
        raise AlreadyExists(f"task '{name}' already exists in stream '{stream.name}'", field="name")
    return stream
