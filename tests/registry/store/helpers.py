"""Helpers shared by the store tests: digests, a stream with its snapshot v0, a dataset, trained
adapter versions, two tasks and a fold, and a task's training job."""

from __future__ import annotations

from registry.entities import AdapterVersion, Job, Snapshot
from registry.errors import NotFound
from registry.store import SqlRegistry

D1, D2, D3 = "a" * 64, "b" * 64, "c" * 64


def _stream(reg: SqlRegistry, name: str = "s1") -> tuple[int, int]:
    """A stream with its snapshot v0: their ids."""
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


def _stream_id(reg: SqlRegistry, name: str = "s1") -> int:
    """A stream with its snapshot v0; its id (the job and schedule tests' `_stream`)."""
    stream = reg.streams.create(
        name=name, base_source={"kind": "tiny"}, method="seq-lora", hyperparams={}
    )
    reg.streams.add_snapshot(stream_id=stream.id, artifact_digest=D1, source={})
    return stream.id


def _submit(reg: SqlRegistry, stream_id: int, name: str) -> int:
    """Submit task `name` (one shared dataset); returns its training job's id."""
    try:
        dataset_id = reg.tasks.get_dataset(D2).id
    except NotFound:
        dataset_id = reg.tasks.add_dataset(
            digest=D2, format="jsonl", num_train=1, num_test=1, size_bytes=1
        ).id
    return reg.tasks.submit(stream_id=stream_id, name=name, dataset_id=dataset_id)[1].id
