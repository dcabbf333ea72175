"""The adapter store: versions numbered per task (concurrently too), `latest` and aliases,
dangling references refused, a stream's state, and listing in a fixed number of queries; on
SQLite and PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event

from registry.entities import AdapterStatus
from registry.errors import Conflict, InvalidReference, InvalidValue, NotFound
from registry.store import SqlRegistry
from tests.registry.store.helpers import D1, D2, _dataset, _stream, _trained


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


def test_stream_state_is_newest_ready_per_task_in_training_order(registry: SqlRegistry) -> None:
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
    ta = registry.tasks.get_by_id(va.task_id)  # a retrained: in training order, a comes last
    va2 = registry.adapters.create_version(
        task_id=ta.id, method="m", hyperparams={}, base_snapshot_id=v0, dataset_id=va.dataset_id
    )
    registry.adapters.mark_ready(va2.id, artifact_digest="d" * 64, metrics={})
    state = registry.adapters.stream_state(stream_id=stream_id, snapshot_id=v0)
    assert [v.id for v in state] == [vb.id, va2.id]


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
