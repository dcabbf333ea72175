"""The evaluation store: the accuracy matrix keeps the newest cell, a job measuring a cell again
replaces its row, and the matrix is a record of states read along the current lineage; on SQLite
and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.entities import JobKind
from registry.errors import InvalidReference
from registry.store import SqlRegistry
from registry.tables import EvaluationRow
from tests.registry.store.helpers import D3, _dataset, _stream, _two_tasks_then_a_fold


def test_evaluation_matrix_keeps_newest_cell(registry: SqlRegistry) -> None:
    stream_id, snap = _stream(registry)
    ds = _dataset(registry)
    a, _ = registry.tasks.submit(stream_id=stream_id, name="a", dataset_id=ds)
    b, _ = registry.tasks.submit(stream_id=stream_id, name="b", dataset_id=ds)
    cells = [(-1, a, 0.5), (-1, b, 0.4), (0, a, 0.9), (0, b, 0.45), (1, a, 0.7), (1, b, 0.8)]
    for after, task, value in cells:
        registry.evaluations.record(
            stream_id=stream_id, after_position=after, task_id=task.id, snapshot_id=snap,
            metric="accuracy", value=value, num_examples=10,
        )  # fmt: skip
    registry.evaluations.record(
        stream_id=stream_id, after_position=1, task_id=a.id, snapshot_id=snap,
        metric="accuracy", value=0.75, num_examples=10,
    )  # fmt: skip
    m = registry.evaluations.matrix(stream_id)
    assert m.task_names == ("a", "b")
    assert m.values == ((0.9, 0.45), (0.75, 0.8))
    assert m.baseline == (0.5, 0.4)
    with pytest.raises(InvalidReference):
        registry.evaluations.record(
            stream_id=stream_id, after_position=0, task_id=9999, snapshot_id=snap,
            metric="accuracy", value=1.0, num_examples=1,
        )  # fmt: skip


def test_a_job_measuring_a_cell_again_replaces_it(registry: SqlRegistry) -> None:
    stream_id, snap = _stream(registry)
    task, job = registry.tasks.submit(stream_id=stream_id, name="a", dataset_id=_dataset(registry))
    other = registry.jobs.create(kind=JobKind.EVALUATE, stream_id=stream_id)

    def record(value: float, *, job_id: int | None, after: int = 0) -> None:
        registry.evaluations.record(
            stream_id=stream_id, after_position=after, task_id=task.id, snapshot_id=snap,
            metric="accuracy", value=value, num_examples=10, job_id=job_id,
        )  # fmt: skip

    record(0.5, job_id=job.id)
    record(0.6, job_id=job.id)  # the job re-ran (its worker died): the same cell, replaced
    record(0.4, job_id=job.id, after=-1)  # its baseline is another cell
    record(0.7, job_id=other.id)  # another job's measurement of the state is a row of its own
    with Session(registry.engine) as session:
        rows = session.execute(
            select(EvaluationRow.job_id, EvaluationRow.after_position, EvaluationRow.value)
            .where(EvaluationRow.stream_id == stream_id)
            .order_by(EvaluationRow.id)
        ).all()
    assert [tuple(r) for r in rows] == [(job.id, 0, 0.6), (job.id, -1, 0.4), (other.id, 0, 0.7)]
    assert registry.evaluations.matrix(stream_id).values == ((0.7,),)  # the newest measurement


def _record_state(reg: SqlRegistry, stream_id: int, *, after: int, snapshot: int,
                  adapters: list[int], values: dict[int, float]) -> None:  # fmt: skip
    for task_id, value in values.items():
        reg.evaluations.record(
            stream_id=stream_id, after_position=after, task_id=task_id, snapshot_id=snapshot,
            adapter_version_id=adapters[-1] if adapters else None, adapter_ids=adapters,
            metric="accuracy", value=value, num_examples=10,
        )  # fmt: skip


def test_the_matrix_is_a_record_of_states_and_reads_the_current_lineage(
    registry: SqlRegistry,
) -> None:
    """A fold and then a retrain on the folded snapshot add states; the rows of the states that
    learned each task stay what they measured, and the metrics read the current lineage."""
    v0, _ja, va, _jb, vb, v1 = _two_tasks_then_a_fold(registry)
    stream_id, a, b = va.stream_id, va.task_id, vb.task_id
    _record_state(registry, stream_id, after=-1, snapshot=v0, adapters=[], values={a: 0.1, b: 0.2})
    _record_state(registry, stream_id, after=0, snapshot=v0, adapters=[va.id],
                  values={a: .9, b: .3})  # fmt: skip
    _record_state(registry, stream_id, after=1, snapshot=v0, adapters=[va.id, vb.id],
                  values={a: .8, b: .7})  # fmt: skip
    _record_state(registry, stream_id, after=1, snapshot=v1.id, adapters=[],
                  values={a: .78, b: .69})  # the fold  # fmt: skip
    m = registry.evaluations.matrix(stream_id)
    assert m.values == ((0.9, 0.3), (0.78, 0.69))  # the newest row is the folded state
    assert m.baseline == (0.1, 0.2)
    assert [(st.kind, st.label, st.in_lineage) for st in m.states] == [
        ("base", "v0", True), ("evaluate", "v0 + a@v1", True),
        ("evaluate", "v0 + a@v1, b@v1", True), ("evaluate", "v1", True),
    ]  # fmt: skip
    # a retrain of b on v1: a new version of b that the stream now applies
    job = registry.jobs.create(kind=JobKind.RETRAIN, stream_id=stream_id, task_id=b, params={})
    vb2 = registry.adapters.mark_ready(registry.adapters.create_version(
        task_id=b, method="seq-lora", hyperparams={}, base_snapshot_id=v1.id,
        dataset_id=vb.dataset_id, depends_on=[], job_id=job.id,
    ).id, artifact_digest=D3, metrics={})  # fmt: skip
    for task_id, value in {a: 0.75, b: 0.95}.items():
        registry.evaluations.record(
            stream_id=stream_id,
            after_position=1,
            task_id=task_id,
            snapshot_id=v1.id,
            adapter_version_id=vb2.id,
            job_id=job.id,
            metric="accuracy",
            value=value,
            num_examples=10,
        )  # fmt: skip  (adapter_ids: by default the version and what it depends on)
    m = registry.evaluations.matrix(stream_id)
    assert m.values == ((0.9, 0.3), (0.75, 0.95))  # the state that learned a is untouched
    assert m.baseline == (0.1, 0.2)
    assert (m.states[-1].kind, m.states[-1].label) == ("retrain", "v1 + b@v2")
    assert len(m.states) == 5 and all(st.in_lineage for st in m.states)
    # rolled back to v0, the stream applies a@v1 and b@v1 again: the fold and the retrain are
    # no longer its lineage, and the matrix is the one before them
    registry.streams.set_current_snapshot(stream_id=stream_id, snapshot_id=v0)
    m = registry.evaluations.matrix(stream_id)
    assert m.values == ((0.9, 0.3), (0.8, 0.7))
    assert [st.in_lineage for st in m.states] == [True, True, True, False, False]
    with pytest.raises(InvalidReference) as info:
        registry.evaluations.record(
            stream_id=stream_id, after_position=0, task_id=a, snapshot_id=v0,
            adapter_ids=[424242], metric="accuracy", value=1.0, num_examples=1,
        )  # fmt: skip
    assert info.value.field == "adapter_ids"
