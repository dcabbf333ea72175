"""Evaluations: the cells of a stream's accuracy matrix."""

from __future__ import annotations

from sqlalchemy import func, select

from registry.entities import Evaluation, EvaluationMatrix
from registry.errors import InvalidReference, InvalidValue
from registry.store import _convert as convert
from registry.store._db import Database
from registry.tables import EvaluationRow, SnapshotRow, TaskRow


class SqlEvaluationStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        *,
        stream_id: int,
        after_position: int,
        task_id: int,
        snapshot_id: int,
        metric: str,
        value: float,
        num_examples: int,
        adapter_version_id: int | None = None,
        job_id: int | None = None,
    ) -> Evaluation:
        """Record task `task_id` measured after the stream learned the task at `after_position`
        (-1: the untrained base snapshot). A later measurement of the same cell supersedes it."""
        if after_position < -1:
            raise InvalidValue("must be -1 (base) or a task position", field="after_position")
        with self._db.tx() as s:
            task = s.get(TaskRow, task_id)
            if task is None or task.stream_id != stream_id:
                raise InvalidReference(f"task {task_id} is not in this stream", field="task_id")
            snapshot = s.get(SnapshotRow, snapshot_id)
            if snapshot is None or snapshot.stream_id != stream_id:
                raise InvalidReference("snapshot is not in this stream", field="snapshot_id")
            row = EvaluationRow(
                stream_id=stream_id,
                after_position=after_position,
                task_id=task_id,
                snapshot_id=snapshot_id,
                adapter_version_id=adapter_version_id,
                job_id=job_id,
                metric=metric,
                value=float(value),
                num_examples=num_examples,
            )
            s.add(row)
            s.flush()
            return convert.evaluation(row)

    def matrix(self, stream_id: int, *, metric: str = "accuracy") -> EvaluationMatrix:
        """The newest measurement of each (after task t, task i) cell."""
        with self._db.tx() as s:
            tasks = list(
                s.scalars(
                    select(TaskRow)
                    .where(TaskRow.stream_id == stream_id, TaskRow.deleted_at.is_(None))
                    .order_by(TaskRow.position)
                )
            )
            newest = (
                select(func.max(EvaluationRow.id))
                .where(EvaluationRow.stream_id == stream_id, EvaluationRow.metric == metric)
                .group_by(EvaluationRow.after_position, EvaluationRow.task_id)
            )
            rows = list(s.scalars(select(EvaluationRow).where(EvaluationRow.id.in_(newest))))
        index = {t.id: i for i, t in enumerate(tasks)}
        position_to_row = {t.position: i for i, t in enumerate(tasks)}
        n = len(tasks)
        cells: list[list[float | None]] = [[None] * n for _ in range(n)]
        baseline: list[float | None] = [None] * n
        for r in rows:
            col = index.get(r.task_id)
            if col is None:
                continue
            if r.after_position == -1:
                baseline[col] = r.value
            elif r.after_position in position_to_row:
                cells[position_to_row[r.after_position]][col] = r.value
        # Keep only the rows of tasks already learned (a row with no measurement yet is dropped).
        learned = [tuple(row) for row in cells if any(v is not None for v in row)]
        return EvaluationMatrix(
            task_names=tuple(t.name for t in tasks),
            values=tuple(learned),
            baseline=tuple(baseline),
            metric=metric,
        )
