"""The registry store, run against SQLite and PostgreSQL with the same tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from registry.entities import (
    AdapterStatus,
    AdapterVersion,
    Job,
    JobKind,
    JobState,
    NodeKind,
    NodeRef,
    Relation,
    Snapshot,
)
from registry.errors import AlreadyExists, Conflict, InvalidReference, InvalidValue, NotFound
from registry.store import SqlRegistry
from registry.tables import EvaluationRow, JobRow, LineageEdgeRow, TaskRow

D1, D2, D3 = "a" * 64, "b" * 64, "c" * 64


def _stream(reg: SqlRegistry, name: str = "s1") -> tuple[int, int]:
    stream = reg.streams.create(
        name=name, base_source={"kind": "tiny"}, method="seq-lora", hyperparams={"rank": 4}
    )
    snap = reg.streams.add_snapshot(stream_id=stream.id, artifact_digest=D1, source={"k": "v0"})
    return stream.id, snap.id


def _dataset(reg: SqlRegistry, digest: str = D2) -> int:
    return reg.tasks.add_dataset(
        digest=digest, format="jsonl", num_train=10, num_test=2, size_bytes=100, labels=["x", "y"]
    ).id


def _trained(reg: SqlRegistry, stream_id: int, snap_id: int, name: str, deps=()):  # type: ignore[no-untyped-def]
    ds = _dataset(reg)
    task, job = reg.tasks.submit(stream_id=stream_id, name=name, dataset_id=ds)
    v = reg.adapters.create_version(
        task_id=task.id,
        method="seq-lora",
        hyperparams={},
        base_snapshot_id=snap_id,
        dataset_id=ds,
        depends_on=deps,
        job_id=job.id,
    )
    return task, job, reg.adapters.mark_ready(v.id, artifact_digest=D3, metrics={"loss": 1.0})


def test_streams_create_get_list_and_errors(registry: SqlRegistry) -> None:
    created = registry.streams.create(
        name="news", base_source={"kind": "tiny"}, method="seq-lora", hyperparams={"rank": 8}
    )
    assert registry.streams.get("news") == created
    assert registry.streams.get_by_id(created.id).hyperparams == {"rank": 8}
    assert [s.name for s in registry.streams.list_streams()] == ["news"]
    with pytest.raises(AlreadyExists) as exc:
        registry.streams.create(name="news", base_source={}, method="seq-lora", hyperparams={})
    assert exc.value.field == "name"
    for bad in ["", "../x", "a/b", "x" * 65, "bad\nname", "trailing\n", "-lead", 7]:
        with pytest.raises(InvalidValue):
            registry.streams.create(name=bad, base_source={}, method="m", hyperparams={})  # type: ignore[arg-type]
    with pytest.raises(NotFound) as nf:
        registry.streams.get("missing")
    assert nf.value.field == "stream"
    assert len(registry.streams.list_streams()) == 1  # nothing half-written by the failures


def test_snapshots_are_versioned_and_current_moves(registry: SqlRegistry) -> None:
    stream_id, v0 = _stream(registry)
    v1 = registry.streams.add_snapshot(
        stream_id=stream_id, artifact_digest=D2, source={}, parent_id=v0
    )
    assert [s.version for s in registry.streams.list_snapshots(stream_id)] == [0, 1]
    assert registry.streams.current_snapshot(stream_id).id == v1.id
    rolled = registry.streams.set_current_snapshot(stream_id=stream_id, snapshot_id=v0)
    assert rolled.version == 0 and registry.streams.current_snapshot(stream_id).id == v0
    assert len(registry.streams.list_snapshots(stream_id)) == 2  # rollback deletes nothing
    _other, other_snap = _stream(registry, "s2")
    with pytest.raises(InvalidReference):
        registry.streams.add_snapshot(
            stream_id=stream_id, artifact_digest=D2, source={}, parent_id=other_snap
        )
    with pytest.raises(InvalidReference):
        registry.streams.set_current_snapshot(stream_id=stream_id, snapshot_id=other_snap)
    with pytest.raises(InvalidValue):
        registry.streams.add_snapshot(stream_id=stream_id, artifact_digest="nothex", source={})
    with pytest.raises(NotFound):
        registry.streams.add_snapshot(stream_id=999, artifact_digest=D2, source={})
    assert len(registry.streams.list_snapshots(stream_id)) == 2


def test_datasets_are_content_addressed(registry: SqlRegistry) -> None:
    first = _dataset(registry)
    assert _dataset(registry) == first
    assert registry.tasks.get_dataset(D2).labels == ("x", "y")
    with pytest.raises(InvalidValue):
        registry.tasks.get_dataset("../../etc/passwd")
    with pytest.raises(NotFound):
        registry.tasks.get_dataset("f" * 64)


def test_submit_task_writes_task_and_job_together(registry: SqlRegistry) -> None:
    stream_id, _ = _stream(registry)
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


def test_adapter_versions_numbering_aliases_and_latest(registry: SqlRegistry) -> None:
    stream_id, snap = _stream(registry)
    task, job, v1 = _trained(registry, stream_id, snap, "a")
    assert v1.version == 1 and v1.status is AdapterStatus.READY and v1.aliases == ("latest",)
    again = registry.adapters.create_version(
        task_id=task.id,
        method="seq-lora",
        hyperparams={},
        base_snapshot_id=snap,
        dataset_id=v1.dataset_id,
        job_id=job.id,
    )
    assert again.id == v1.id  # idempotent per job
    v2 = registry.adapters.create_version(
        task_id=task.id,
        method="seq-lora",
        hyperparams={},
        base_snapshot_id=snap,
        dataset_id=v1.dataset_id,
    )
    assert v2.version == 2 and v2.status is AdapterStatus.PENDING
    assert registry.adapters.get(task_id=task.id, ref_="latest").id == v1.id  # pending is skipped
    registry.adapters.mark_ready(v2.id, artifact_digest=D1)
    assert registry.adapters.get(task_id=task.id, ref_="latest").version == 2
    registry.adapters.set_alias(task_id=task.id, alias="prod", version_id=v1.id)
    assert registry.adapters.get(task_id=task.id, ref_="prod").id == v1.id
    registry.adapters.set_alias(task_id=task.id, alias="prod", version_id=v2.id)  # alias moves
    assert registry.adapters.get(task_id=task.id, ref_="prod").id == v2.id
    assert registry.adapters.get(task_id=task.id, ref_="1").id == v1.id
    for bad in ["latest", "LATEST", "12", "../x"]:
        with pytest.raises(InvalidValue):
            registry.adapters.set_alias(task_id=task.id, alias=bad, version_id=v1.id)
    with pytest.raises(Conflict):  # an alias points at it
        registry.adapters.delete(v2.id)
    with pytest.raises(Conflict):  # published artifacts are immutable
        registry.adapters.mark_ready(v1.id, artifact_digest=D2)
    registry.adapters.delete_alias(task_id=task.id, alias="prod")
    registry.adapters.delete(v2.id)
    assert registry.adapters.get(task_id=task.id, ref_="latest").id == v1.id
    with pytest.raises(NotFound):
        registry.adapters.get(task_id=task.id, ref_="prod")
    assert [v.version for v in registry.adapters.list_versions(stream_id=stream_id)] == [1]


def test_adapter_version_dangling_references(registry: SqlRegistry) -> None:
    stream_id, snap = _stream(registry)
    _other_stream, other_snap = _stream(registry, "s2")
    ds = _dataset(registry)
    task, _ = registry.tasks.submit(stream_id=stream_id, name="a", dataset_id=ds)
    common = {"task_id": task.id, "method": "seq-lora", "hyperparams": {}}
    cases = [
        ({"base_snapshot_id": other_snap, "dataset_id": ds}, "base_snapshot_id"),
        ({"base_snapshot_id": snap, "dataset_id": 4242}, "dataset_id"),
        ({"base_snapshot_id": snap, "dataset_id": ds, "depends_on": [777]}, "depends_on"),
        ({"base_snapshot_id": snap, "dataset_id": ds, "job_id": 999}, "job_id"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidReference) as exc:
            registry.adapters.create_version(**common, **kwargs)  # type: ignore[arg-type]
        assert exc.value.field == field
    assert registry.adapters.list_versions(stream_id=stream_id) == []


def test_concurrent_version_allocation_is_unique(registry: SqlRegistry) -> None:
    stream_id, snap = _stream(registry)
    ds = _dataset(registry)
    task, _ = registry.tasks.submit(stream_id=stream_id, name="a", dataset_id=ds)

    def allocate(_: int) -> int:
        return registry.adapters.create_version(
            task_id=task.id, method="m", hyperparams={}, base_snapshot_id=snap, dataset_id=ds
        ).version

    with ThreadPoolExecutor(max_workers=6) as pool:
        versions = list(pool.map(allocate, range(12)))
    assert sorted(versions) == list(range(1, 13))


def test_job_state_machine_cancel_and_events(registry: SqlRegistry) -> None:
    stream_id, _ = _stream(registry)
    job = registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=stream_id)
    running = registry.jobs.transition(job.id, JobState.RUNNING)
    assert running.attempts == 1 and running.started_at is not None
    with pytest.raises(Conflict):
        registry.jobs.transition(job.id, JobState.QUEUED.value and JobState.RUNNING)
    cancelling = registry.jobs.request_cancel(job.id)
    assert cancelling.cancel_requested and cancelling.state is JobState.RUNNING
    done = registry.jobs.transition(job.id, JobState.CANCELLED)
    assert done.state is JobState.CANCELLED and done.finished_at is not None
    with pytest.raises(Conflict):
        registry.jobs.request_cancel(job.id)
    queued = registry.jobs.create(kind=JobKind.EVALUATE, stream_id=stream_id)
    assert registry.jobs.request_cancel(queued.id).state is JobState.CANCELLED
    failed = registry.jobs.create(kind=JobKind.TRAIN, stream_id=stream_id)
    registry.jobs.transition(failed.id, JobState.RUNNING)
    out = registry.jobs.transition(
        failed.id, JobState.FAILED, error_code="boom", error_message="it broke"
    )
    assert out.error is not None and out.error.code == "boom"
    events = [registry.jobs.add_event(job.id, message=f"step {i}") for i in range(5)]
    page = registry.jobs.events(job.id, after_id=events[1].id, limit=2)
    assert [e.message for e in page] == ["step 2", "step 3"]
    with pytest.raises(InvalidValue):
        registry.jobs.add_event(job.id, message="x", level="loud")
    with pytest.raises(NotFound):
        registry.jobs.get(424242)
    assert [j.id for j in registry.jobs.list_jobs(state=JobState.CANCELLED)] == [job.id, queued.id]
    assert [
        j.id for j in registry.jobs.list_jobs(stream_id=stream_id, after_id=job.id, limit=1)
    ] == [queued.id]


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


def _two_tasks_then_a_fold(
    registry: SqlRegistry,
) -> tuple[int, Job, AdapterVersion, Job, AdapterVersion, Snapshot]:
    """Tasks a and b trained on v0 (b depending on a), then v1 folding both; returns v0's id,
    the jobs and versions of a and b, and v1."""
    stream_id, v0 = _stream(registry)
    _ta, ja, va = _trained(registry, stream_id, v0, "a")
    _tb, jb, vb = _trained(registry, stream_id, v0, "b", deps=[va.id])
    v1 = registry.streams.add_snapshot(
        stream_id=stream_id, artifact_digest=D2, source={}, parent_id=v0,
        folded_adapter_ids=[va.id, vb.id],
    )  # fmt: skip
    return v0, ja, va, jb, vb, v1


def test_lineage_ancestors_and_descendants(registry: SqlRegistry) -> None:
    v0, ja, va, jb, vb, v1 = _two_tasks_then_a_fold(registry)
    assert v1.folded_adapter_ids == (va.id, vb.id)

    up = registry.lineage.ancestors(NodeRef(NodeKind.ADAPTER, vb.id))
    found = {(n.kind, n.id): n.depth for n in up.nodes}
    assert found[(NodeKind.ADAPTER, vb.id)] == 0
    assert found[(NodeKind.ADAPTER, va.id)] == 1
    assert found[(NodeKind.SNAPSHOT, v0)] == 1
    assert found[(NodeKind.JOB, jb.id)] == 1 and found[(NodeKind.JOB, ja.id)] == 2
    assert (NodeKind.DATASET, va.dataset_id) in found
    assert NodeRef(NodeKind.SNAPSHOT, v1.id) not in {NodeRef(k, i) for k, i in found}

    down = registry.lineage.descendants(NodeRef(NodeKind.ADAPTER, va.id))
    assert {(n.kind, n.id) for n in down.nodes} == {
        (NodeKind.ADAPTER, va.id),
        (NodeKind.ADAPTER, vb.id),
        (NodeKind.SNAPSHOT, v1.id),
    }
    rels = {(e.child.id, e.relation) for e in down.edges}
    assert (v1.id, Relation.FOLDS) in rels and (vb.id, Relation.DEPENDS_ON) in rels

    # "which snapshot folded task a": descendants of its adapter that are snapshots
    folded_by = [n for n in down.nodes if n.kind is NodeKind.SNAPSHOT]
    assert [n.label for n in folded_by] == ["s1 snapshot v1 (current)"]
    assert folded_by[0].attributes["current"] is True

    shallow = registry.lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, v1.id), max_depth=1)
    assert max(n.depth for n in shallow.nodes) == 1
    deep = registry.lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, v1.id))
    assert (NodeKind.JOB, ja.id) in {(n.kind, n.id) for n in deep.nodes}
    with pytest.raises(NotFound):
        registry.lineage.ancestors(NodeRef(NodeKind.ADAPTER, 999))
    with pytest.raises(InvalidValue):
        registry.lineage.descendants(NodeRef(NodeKind.ADAPTER, va.id), max_depth=0)


def test_a_lineage_walk_takes_the_same_statements_for_any_graph_and_labels_every_kind(
    registry: SqlRegistry,
) -> None:
    v0, ja, va, jb, vb, v1 = _two_tasks_then_a_fold(registry)
    lone = _dataset(registry, D3)  # no edge leads to or from it
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "SELECT 1")):
            statements.append(statement)

    event.listen(registry.engine, "before_cursor_execute", count)
    try:
        sizes = {}
        for name, node in [("whole", NodeRef(NodeKind.SNAPSHOT, v1.id)),
                           ("one edge", NodeRef(NodeKind.JOB, ja.id))]:  # fmt: skip
            statements.clear()
            graph = registry.lineage.ancestors(node)
            sizes[name] = (len(statements), len(graph.nodes))
        statements.clear()
        alone = registry.lineage.descendants(NodeRef(NodeKind.DATASET, lone))
        sizes["alone"] = (len(statements), len(alone.nodes))
    finally:
        event.remove(registry.engine, "before_cursor_execute", count)
    # the walk, then every node's label in one statement, whatever the graph
    assert sizes == {"whole": (2, 7), "one edge": (2, 2), "alone": (2, 1)}, sizes  # 1 dataset
    assert [(n.kind, n.id, n.depth) for n in alone.nodes] == [(NodeKind.DATASET, lone, 0)]
    labels = {(n.kind, n.id): (n.label, n.attributes) for n in graph.nodes}  # ja's ancestors
    assert set(labels) == {(NodeKind.JOB, ja.id), (NodeKind.DATASET, va.dataset_id)}
    whole = registry.lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, v1.id))
    labels = {(n.kind, n.id): (n.label, n.attributes) for n in whole.nodes}
    assert labels[NodeKind.SNAPSHOT, v1.id] == (
        "s1 snapshot v1 (current)",
        {"stream": "s1", "version": 1, "current": True},
    )
    assert labels[NodeKind.SNAPSHOT, v0] == (
        "s1 snapshot v0",
        {"stream": "s1", "version": 0, "current": False},
    )
    assert labels[NodeKind.ADAPTER, vb.id] == (
        "adapter b v1 (seq-lora, ready)",
        {"task": "b", "version": 1, "method": "seq-lora", "status": "ready"},
    )
    assert labels[NodeKind.DATASET, va.dataset_id] == (
        f"dataset {D2[:12]}",
        {"digest": D2, "num_train": 10},
    )
    assert labels[NodeKind.JOB, jb.id] == (
        f"train job #{jb.id} (queued)", {"kind": "train", "state": "queued"})  # fmt: skip
    with pytest.raises(NotFound) as missing:
        registry.lineage.ancestors(NodeRef(NodeKind.JOB, jb.id + 100))
    assert missing.value.field == "node"


def test_stream_state_is_newest_ready_per_task_in_order(registry: SqlRegistry) -> None:
    stream_id, v0 = _stream(registry)
    _, _, va = _trained(registry, stream_id, v0, "a")
    tb, _, vb = _trained(registry, stream_id, v0, "b", deps=[va.id])
    assert [v.id for v in registry.adapters.stream_state(stream_id=stream_id, snapshot_id=v0)] == [
        va.id,
        vb.id,
    ]
    registry.adapters.create_version(  # pending: not part of the state
        task_id=tb.id, method="m", hyperparams={}, base_snapshot_id=v0, dataset_id=vb.dataset_id
    )
    state = registry.adapters.stream_state(stream_id=stream_id, snapshot_id=v0)
    assert [v.id for v in state] == [va.id, vb.id]


def _reference_walk(
    edges: list[tuple[NodeRef, NodeRef, str]], root: NodeRef, *, max_depth: int, up: bool
) -> tuple[dict[NodeRef, int], set[tuple[NodeRef, NodeRef, str]]]:
    """Shortest distances by relaxing every edge until nothing changes (not a BFS)."""
    dist = {root: 0}
    changed = True
    while changed:
        changed = False
        for child, parent, _rel in edges:
            near, far = (child, parent) if up else (parent, child)
            if near in dist and dist[near] + 1 < dist.get(far, max_depth + 1):
                dist[far] = dist[near] + 1
                changed = True
    kept = {
        e
        for e in edges
        if (e[0] if up else e[1]) in dist and dist[e[0] if up else e[1]] < max_depth
    }
    return dist, kept


def test_lineage_of_a_long_consolidation_chain_matches_a_reference_walk(
    registry: SqlRegistry,
) -> None:
    """Every snapshot is reached twice (from its child snapshot and through the adapter the child
    folded), and adapters depend on earlier ones: many paths of different lengths to each node."""
    stream_id, snap = _stream(registry)
    root_snapshot, deps = snap, []
    for k in range(12):
        _task, _job, adapter = _trained(registry, stream_id, snap, f"t{k}", deps=deps[-2:])
        deps.append(adapter.id)
        if k % 3 == 2:  # a consolidation every three tasks
            snap = registry.streams.add_snapshot(
                stream_id=stream_id, artifact_digest=D1, source={}, parent_id=snap,
                folded_adapter_ids=deps[-3:],
            ).id  # fmt: skip
    with Session(registry.engine) as s:  # the reference reads the raw edges
        edges = [
            (NodeRef(NodeKind(r.child_kind), r.child_id),
             NodeRef(NodeKind(r.parent_kind), r.parent_id), r.relation)
            for r in s.scalars(select(LineageEdgeRow))
        ]  # fmt: skip
    newest, oldest = NodeRef(NodeKind.SNAPSHOT, snap), NodeRef(NodeKind.SNAPSHOT, root_snapshot)
    cases = [(newest, True), (oldest, False), (NodeRef(NodeKind.ADAPTER, deps[5]), True),
             (NodeRef(NodeKind.ADAPTER, deps[0]), False)]  # fmt: skip
    for root, up in cases:
        for max_depth in (1, 2, 3, 5, 8, 10_000):
            walk = registry.lineage.ancestors if up else registry.lineage.descendants
            graph = walk(root, max_depth=max_depth)
            dist, kept = _reference_walk(edges, root, max_depth=max_depth, up=up)
            assert {NodeRef(n.kind, n.id): n.depth for n in graph.nodes} == dist
            assert {(e.child, e.parent, e.relation.value) for e in graph.edges} == kept
            assert len(graph.edges) == len(kept)  # no edge twice
    # the whole chain is walked: 5 snapshots, 12 adapters, their 12 jobs and the shared dataset
    assert len(registry.lineage.ancestors(newest).nodes) == 5 + 12 + 12 + 1


def test_listing_adapter_versions_takes_the_same_queries_for_any_page_size(
    registry: SqlRegistry,
) -> None:
    stream_id, snap = _stream(registry)
    for k in range(12):
        _trained(registry, stream_id, snap, f"t{k}")
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    event.listen(registry.engine, "before_cursor_execute", count)
    try:
        sizes = {}
        for limit in (2, 12):
            statements.clear()
            page = registry.adapters.list_versions(stream_id=stream_id, limit=limit)
            sizes[limit] = len(statements)
            assert len(page) == limit and all(v.aliases == ("latest",) for v in page)
    finally:
        event.remove(registry.engine, "before_cursor_execute", count)
    assert sizes[2] == sizes[12] <= 6, sizes  # no query per row
