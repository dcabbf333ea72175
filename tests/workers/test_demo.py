"""The embedded slice end to end on the tiny model: the code path `strata demo` runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from continual.data import synthetic_tasks
from continual.evaluation import rank_classification
from continual.options import AmLoraOptions
from registry.artifacts import get_tree
from registry.entities import AdapterStatus, JobKind, JobState, NodeKind, NodeRef
from registry.errors import AlreadyExists, InvalidValue
from registry.instance import Instance
from services.streams import submit_task
from workers.bench import COMPOSED_OPTIONS
from workers.demo import run_demo
from workers.models import load_snapshot
from workers.runner import run_job
from workers.streams import create_stream

pytestmark = pytest.mark.slow

SIZES = {"train_size": 192, "test_size": 48}
# At these sizes the composed stream's folds on this seed cost a task points, both after task 2
# and after task 3 (seed 0's second fold costs nothing since new adapters start warm)
REFUSED_SEED = 1


def test_demo_learns_three_tasks_in_sequence(instance: Instance, tmp_path: Path) -> None:
    seen: list[str] = []
    started: list[dict[str, object]] = []
    result = run_demo(
        instance, seed=REFUSED_SEED, listener=lambda kind, _p: seen.append(kind), max_drop=0.0,
        on_job_start=lambda _k, payload: started.append(payload), **SIZES,
    )  # fmt: skip
    seq, composed = result.runs
    assert (seq.method, composed.method) == ("seq-lora", "composed")
    assert (seq.stream.name, composed.stream.name) == ("demo-seq-lora", "demo-composed")
    reg = instance.registry
    assert [j.state for j in seq.jobs] == [JobState.SUCCEEDED] * 3
    assert all(j.progress == 1.0 and j.attempts == 1 for j in seq.jobs)
    assert "step" in seen and "event" in seen
    assert seq.failed == () and composed.failed == ()

    versions = reg.adapters.list_versions(stream_id=seq.stream.id)
    tiny = synthetic_tasks(seed=REFUSED_SEED, train_size=4, test_size=1)
    names = [t.name for t in tiny]
    assert [(v.task_name, v.version, v.status) for v in versions] == [
        (n, 1, AdapterStatus.READY) for n in names
    ]
    first, second = versions[0].id, versions[1].id
    assert [v.depends_on for v in versions] == [(), (first,), (first, second)]
    assert all(v.base_snapshot_id == seq.base.id for v in versions)

    matrix = reg.evaluations.matrix(seq.stream.id)
    assert matrix.task_names == tuple(names)
    assert len(matrix.values) == 3 and all(v is not None for row in matrix.values for v in row)
    assert all(b is not None for b in matrix.baseline)
    chance = [1 / len(t.labels or ()) for t in tiny]
    for t in range(3):  # each task is learned well above chance right after training on it
        assert matrix.values[t][t] > chance[t] + 0.3, (t, matrix.values)

    # The published adapter is plain PEFT: loading it directly reproduces the recorded accuracy.
    newest = versions[-1]
    assert newest.artifact_digest is not None
    exported = get_tree(instance.artifacts, newest.artifact_digest, tmp_path / "export")
    assert sorted(p.name for p in exported.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base, tokenizer = load_snapshot(instance, seq.base)
    peft_model = PeftModel.from_pretrained(base, exported)
    task_data = synthetic_tasks(seed=REFUSED_SEED, **SIZES)[2]
    with torch.no_grad():
        acc = rank_classification(peft_model, tokenizer, task_data.test, task_data.labels or ())
    assert acc.accuracy == pytest.approx(matrix.values[2][2], abs=1e-9)
    assert newest.metrics["accuracy"] == pytest.approx(matrix.values[2][2])

    lineage = reg.lineage.ancestors(NodeRef(NodeKind.ADAPTER, newest.id))
    kinds = [(n.kind, n.id) for n in lineage.nodes]
    assert (NodeKind.SNAPSHOT, seq.base.id) in kinds
    assert {i for k, i in kinds if k is NodeKind.JOB} == {j.id for j in seq.jobs}
    assert len([k for k, _ in kinds if k is NodeKind.DATASET]) == 3
    events = reg.jobs.events(seq.jobs[0].id, limit=1000)
    assert any(e.metrics and "loss" in e.metrics for e in events)
    assert any(e.message.startswith("evaluated") for e in events)

    # max_drop 0: the composed stream's folds are refused (on the tiny model a fold costs a
    # task some points) and it goes on routed, on snapshot v0; that is no failure of the demo
    assert [after for after, _ in composed.folds] == [1, 2]  # due again after task 3
    for _after, fold in composed.folds:
        assert fold.state is JobState.FAILED and fold.error is not None
        assert fold.error.code == "consolidation_regressed"
    trained = [j for j in composed.jobs if j.kind is JobKind.TRAIN]
    assert [j.state for j in trained] == [JobState.SUCCEEDED] * 3
    assert [s.version for s in reg.streams.list_snapshots(composed.stream.id)] == [0]
    assert [p["kind"] for p in started] == ["train"] * 5 + ["consolidate", "train", "consolidate"]
    composed_matrix = reg.evaluations.matrix(composed.stream.id)
    assert len(composed_matrix.values) == 3
    assert all(v is not None for row in composed_matrix.values for v in row)


def test_the_composed_stream_routes_and_consolidates_per_its_policy(instance: Instance) -> None:
    """The second stream is `strata bench`'s composed pipeline as a stream: am-lora with its
    router and O-LoRA's overlap term, and a consolidation queued by its policy after task 2 and
    run before task 3, published or refused by the max_drop gate."""
    started: list[dict[str, object]] = []
    result = run_demo(
        instance, seed=0, max_drop=100.0,
        on_job_start=lambda _k, payload: started.append(payload), **SIZES,
    )  # fmt: skip
    seq, composed = result.runs
    stream = instance.registry.streams.get_by_id(composed.stream.id)
    assert stream.method == "am-lora"
    assert stream.method_options == {**AmLoraOptions().to_dict(), **COMPOSED_OPTIONS}
    assert stream.consolidation == {"every_tasks": 2, "max_drop": 100.0}
    assert stream.hyperparams == instance.registry.streams.get_by_id(seq.stream.id).hyperparams
    kinds = [(p["method"], p["kind"], p.get("position", p.get("after_task"))) for p in started]
    assert kinds[:3] == [("seq-lora", "train", 0), ("seq-lora", "train", 1),
                         ("seq-lora", "train", 2)]  # fmt: skip
    # max_drop 100: the fold after task 2 is published and task 3 trains on the new snapshot
    assert kinds[3:6] == [("composed", "train", 0), ("composed", "train", 1),
                          ("composed", "consolidate", 1)]  # fmt: skip
    assert kinds[6:] == [("composed", "train", 2)]  # 1 adapter on the new snapshot: no fold
    ((after, fold),) = composed.folds
    assert after == 1 and fold.kind is JobKind.CONSOLIDATE and fold.state is JobState.SUCCEEDED
    snapshots = instance.registry.streams.list_snapshots(composed.stream.id)
    assert [s.version for s in snapshots][:2] == [0, 1]
    versions = instance.registry.adapters.list_versions(stream_id=composed.stream.id)
    assert [v.method for v in versions] == ["am-lora"] * 3
    assert versions[2].base_snapshot_id == snapshots[1].id
    assert all(j.state is JobState.SUCCEEDED for j in composed.jobs)
    matrix = instance.registry.evaluations.matrix(composed.stream.id)
    assert len(matrix.values) == 3 and all(v is not None for row in matrix.values for v in row)


def test_cancelling_a_running_job_publishes_nothing(instance: Instance) -> None:
    stream, _ = create_stream(instance, name="cancel-me", base={"kind": "tiny"})
    data = synthetic_tasks(seed=1, train_size=64, test_size=8)[0]
    _, job = submit_task(
        instance, stream=stream, name="t", data=data, format="synthetic",
        params={"hyperparams": {"max_steps": 100_000}},
    )  # fmt: skip

    def cancel_on_first_step(kind: str, payload: dict[str, object]) -> None:
        if kind == "step" and payload["step"] == 1:
            instance.registry.jobs.request_cancel(job.id)

    done = run_job(instance, job.id, listener=cancel_on_first_step)
    assert done.state is JobState.CANCELLED and done.finished_at is not None
    assert instance.registry.adapters.list_versions(stream_id=stream.id) == []
    assert run_job(instance, job.id).state is JobState.CANCELLED  # terminal jobs stay put


def test_bad_input_is_refused_before_anything_is_stored(instance: Instance) -> None:
    stream, _ = create_stream(instance, name="strict", base={"kind": "tiny"})
    data = synthetic_tasks(seed=2, train_size=8, test_size=2)[0]
    with pytest.raises(ValueError) as bad_hyper:
        submit_task(instance, stream=stream, name="t", data=data, format="synthetic",
                    params={"hyperparams": {"rank": -1}})  # fmt: skip
    assert getattr(bad_hyper.value, "field", None) == "rank"
    with pytest.raises(ValueError) as bad_method:
        submit_task(instance, stream=stream, name="t", data=data, format="synthetic",
                    params={"method": "nope"})  # fmt: skip
    assert getattr(bad_method.value, "field", None) == "method"
    with pytest.raises(InvalidValue):
        submit_task(instance, stream=stream, name="../t", data=data, format="synthetic")
    assert instance.registry.tasks.list_tasks(stream.id) == []
    assert instance.registry.jobs.list_jobs(stream_id=stream.id) == []
    with pytest.raises(AlreadyExists):
        create_stream(instance, name="strict", base={"kind": "tiny"})
    with pytest.raises(InvalidValue) as bad_base:
        create_stream(instance, name="other", base={"kind": "hf", "path": "/nonexistent"})
    assert bad_base.value.field == "base.path"
    with pytest.raises(InvalidValue):
        create_stream(instance, name="other", base={"kind": "pickle"})
