"""Evaluations: every measured state of a stream, and the accuracy matrix of its lineage.

A cell is task i measured on one state of the stream: a snapshot and the adapter versions
applied on it. Cells are only ever added. The matrix a user reads is built from the states of
the stream's current lineage (see `EvaluationMatrix`), so a retrain or a consolidation adds a
state instead of overwriting the row of the state that learned a task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.entities import (
    AdapterStatus,
    Evaluation,
    EvaluationMatrix,
    MeasuredState,
    NodeKind,
    Relation,
)
from registry.errors import InvalidReference, InvalidValue
from registry.store import _convert as convert
from registry.store._db import Database
from registry.tables import (
    AdapterVersionRow,
    EvaluationRow,
    JobRow,
    LineageEdgeRow,
    SnapshotAliasRow,
    SnapshotRow,
    TaskRow,
    utcnow,
)

CURRENT = "current"  # the snapshot alias the stream is on (registry.store.streams)


def measured_key(
    after_position: int, snapshot_id: int, adapter_ids: Sequence[int], metric: str
) -> str:
    """What identifies a cell a job measures (with the job and the task): sha256 hex of
    "after_position/snapshot/adapter ids/metric" (a chain of adapters is too long to index)."""
    text = f"{after_position}/{snapshot_id}/{','.join(map(str, adapter_ids))}/{metric}"
    return hashlib.sha256(text.encode()).hexdigest()


StateKey = tuple[int, int, tuple[int, ...]]  # (after_position, snapshot id, adapter ids)


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
        adapter_ids: Sequence[int] | None = None,
        job_id: int | None = None,
    ) -> Evaluation:
        """Record task `task_id` measured on the state `snapshot_id` + `adapter_ids` (every
        adapter version applied, oldest task first; by default `adapter_version_id` and the
        versions it depends on), which has learned the task at `after_position` (-1: the
        untrained base snapshot). A later measurement of the same state's cell supersedes it;
        the same job measuring it again (a re-run after its worker died) replaces its cell."""
        if after_position < -1:
            raise InvalidValue("must be -1 (base) or a task position", field="after_position")
        with self._db.tx() as s:
            task = s.get(TaskRow, task_id)
            if task is None or task.stream_id != stream_id:
                raise InvalidReference(f"task {task_id} is not in this stream", field="task_id")
            snapshot = s.get(SnapshotRow, snapshot_id)
            if snapshot is None or snapshot.stream_id != stream_id:
                raise InvalidReference("snapshot is not in this stream", field="snapshot_id")
            ids = list(adapter_ids) if adapter_ids is not None else _applied(s, adapter_version_id)
            for adapter_id in ids:
                adapter = s.get(AdapterVersionRow, adapter_id)
                if adapter is None or adapter.stream_id != stream_id:
                    raise InvalidReference(
                        f"adapter version {adapter_id} is not in this stream", field="adapter_ids"
                    )
            key = measured_key(after_position, snapshot_id, ids, metric)
            row = None
            if job_id is not None:  # a re-run job measures its cells again: replace them
                row = s.scalar(
                    select(EvaluationRow).where(
                        EvaluationRow.job_id == job_id,
                        EvaluationRow.task_id == task_id,
                        EvaluationRow.measured_key == key,
                    )
                )
            if row is None:
                row = EvaluationRow(
                    stream_id=stream_id, after_position=after_position, task_id=task_id,
                    snapshot_id=snapshot_id, adapter_version_id=adapter_version_id,
                    adapter_ids=ids, job_id=job_id, metric=metric, measured_key=key,
                    value=float(value), num_examples=num_examples,
                )  # fmt: skip
                s.add(row)
            else:
                row.value, row.num_examples, row.created_at = float(value), num_examples, utcnow()
            s.flush()
            return convert.evaluation(row)

    def matrix(self, stream_id: int, *, metric: str = "accuracy") -> EvaluationMatrix:
        """Every measured state of the stream and the matrix of its current lineage."""
        with self._db.tx() as s:
            tasks = list(
                s.scalars(
                    select(TaskRow)
                    .where(TaskRow.stream_id == stream_id, TaskRow.deleted_at.is_(None))
                    .order_by(TaskRow.position)
                )
            )
            rows = list(
                s.scalars(
                    select(EvaluationRow)
                    .where(EvaluationRow.stream_id == stream_id, EvaluationRow.metric == metric)
                    .order_by(EvaluationRow.id)
                )
            )
            graph = _StreamGraph.read(s, stream_id)
            kinds = dict(
                s.execute(
                    select(JobRow.id, JobRow.kind).where(
                        JobRow.id.in_({r.job_id for r in rows if r.job_id is not None})
                    )
                ).all()
            )
        states = _states(rows, tasks=tasks, graph=graph, kinds=kinds)
        return _lineage_matrix(states, tasks=tasks, metric=metric)


def _applied(s: Session, adapter_version_id: int | None) -> list[int]:
    """An adapter version and the versions it was trained on top of (the state it is part of
    when nothing else is said)."""
    if adapter_version_id is None:
        return []
    row = s.get(AdapterVersionRow, adapter_version_id)
    if row is None:
        raise InvalidReference(
            f"adapter version {adapter_version_id} not found", field="adapter_version_id"
        )
    return [*map(int, row.depends_on), row.id]


@dataclass
class _StreamGraph:
    """What a stream's states are made of: snapshots, adapter versions, folds, and its current
    state."""

    snapshots: dict[int, tuple[int, int | None]]  # id -> (version, parent id)
    adapters: dict[int, AdapterVersionRow]
    task_names: dict[int, str]
    current_snapshot: int | None
    folds: dict[int, set[int]] = field(default_factory=dict)  # snapshot id -> adapter ids

    @classmethod
    def read(cls, s: Session, stream_id: int) -> _StreamGraph:
        snapshots = {
            r.id: (r.version, r.parent_id)
            for r in s.scalars(select(SnapshotRow).where(SnapshotRow.stream_id == stream_id))
        }
        adapters = {
            r.id: r
            for r in s.scalars(
                select(AdapterVersionRow).where(AdapterVersionRow.stream_id == stream_id)
            )
        }
        names = dict(s.execute(select(TaskRow.id, TaskRow.name).where(
            TaskRow.stream_id == stream_id)).all())  # fmt: skip
        current = s.scalar(
            select(SnapshotAliasRow.snapshot_id).where(
                SnapshotAliasRow.stream_id == stream_id, SnapshotAliasRow.alias == CURRENT
            )
        )
        graph = cls(snapshots=snapshots, adapters=adapters, task_names=names,
                    current_snapshot=current)  # fmt: skip
        edges = s.execute(
            select(LineageEdgeRow.child_id, LineageEdgeRow.parent_id).where(
                LineageEdgeRow.child_kind == NodeKind.SNAPSHOT.value,
                LineageEdgeRow.relation == Relation.FOLDS.value,
                LineageEdgeRow.child_id.in_(list(snapshots)),
            )
        )
        for snapshot_id, adapter_id in edges:
            graph.folds.setdefault(snapshot_id, set()).add(adapter_id)
        return graph

    def chain(self) -> list[int]:
        """The current snapshot and its ancestors, newest first."""
        chain: list[int] = []
        at = self.current_snapshot
        while at is not None and at in self.snapshots and at not in chain:
            chain.append(at)
            at = self.snapshots[at][1]
        return chain

    def contained(self, chain: list[int]) -> set[int]:
        """Adapter versions the current state holds: applied on the current snapshot (the
        newest ready version of each task), or folded into a snapshot of its chain."""
        held: set[int] = set().union(*(self.folds.get(i, set()) for i in chain))
        newest: dict[int, int] = {}
        for adapter in self.adapters.values():
            live = adapter.status == AdapterStatus.READY.value and adapter.deleted_at is None
            if live and chain and adapter.base_snapshot_id == chain[0]:
                newest[adapter.task_id] = max(newest.get(adapter.task_id, 0), adapter.id)
        return held | set(newest.values())

    def label(self, adapter_id: int) -> str:
        adapter = self.adapters.get(adapter_id)
        if adapter is None:
            return f"adapter:{adapter_id}"
        return f"{self.task_names.get(adapter.task_id, '?')}@v{adapter.version}"


def _states(
    rows: list[EvaluationRow],
    *,
    tasks: list[TaskRow],
    graph: _StreamGraph,
    kinds: dict[int, str],
) -> list[MeasuredState]:
    """The rows grouped by the state they measured, in the order first measured; the newest
    measurement of each cell."""
    column = {t.id: i for i, t in enumerate(tasks)}
    chain = graph.chain()
    held = graph.contained(chain)
    grouped: dict[StateKey, tuple[list[float | None], EvaluationRow]] = {}
    for row in rows:
        if row.task_id not in column:
            continue
        ids = row.adapter_ids
        if ids is None:  # recorded before states were: the version and what it depends on
            adapter = graph.adapters.get(row.adapter_version_id or -1)
            ids = [] if adapter is None else [*adapter.depends_on, adapter.id]
        key: StateKey = (row.after_position, row.snapshot_id, tuple(int(i) for i in ids))
        values, _first = grouped.setdefault(key, ([None] * len(tasks), row))
        values[column[row.task_id]] = row.value
    states = []
    for (after, snapshot_id, state_ids), (values, first) in grouped.items():
        kind = "base" if after < 0 else kinds.get(first.job_id or -1, "evaluate")
        states.append(
            MeasuredState(
                after_position=after, snapshot_id=snapshot_id,
                snapshot_version=graph.snapshots.get(snapshot_id, (-1, None))[0],
                adapters=tuple(graph.label(i) for i in state_ids), adapter_ids=state_ids, kind=kind,
                job_id=first.job_id, values=tuple(values),
                in_lineage=snapshot_id in chain and set(state_ids) <= held,
                measured_at=convert.aware(first.created_at) if first.created_at else datetime.min,
            )
        )  # fmt: skip
    return states


def _lineage_matrix(
    states: list[MeasuredState], *, tasks: list[TaskRow], metric: str
) -> EvaluationMatrix:
    """R[t] is the first lineage state that learned task t (the state right after training
    it); the newest position's row is the lineage's newest state at that position (after any
    consolidation or retrain). The baseline is the untrained root snapshot's row."""
    lineage = [st for st in states if st.in_lineage]
    row_of = {t.position: i for i, t in enumerate(tasks)}
    learned = [st for st in lineage if st.after_position in row_of]
    baseline: list[float | None] = [None] * len(tasks)
    bases = [st for st in lineage if st.after_position < 0]
    if bases:
        root = min(st.snapshot_version for st in bases)
        for st in bases:
            if st.snapshot_version == root:
                baseline = [new if new is not None else old
                            for old, new in zip(baseline, st.values, strict=True)]  # fmt: skip
    if not learned:
        return EvaluationMatrix(task_names=tuple(t.name for t in tasks), values=(),
                                baseline=tuple(baseline), metric=metric,
                                states=tuple(states))  # fmt: skip
    last = max(row_of[st.after_position] for st in learned)
    rows: list[tuple[float | None, ...]] = [(None,) * len(tasks)] * (last + 1)
    for st in reversed(learned):  # the first state of each position wins
        rows[row_of[st.after_position]] = st.values
    rows[last] = next(st.values for st in reversed(learned) if row_of[st.after_position] == last)
    return EvaluationMatrix(
        task_names=tuple(t.name for t in tasks), values=tuple(rows), baseline=tuple(baseline),
        metric=metric, states=tuple(states),
    )  # fmt: skip
