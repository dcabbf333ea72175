"""Consolidation jobs on both deployments: fold equivalence, lineage over two consolidations,
the storage a consolidation adds, rollback, policies, and what is refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from continual import fold as continual_fold
from continual.data import synthetic_tasks
from continual.strategies.am_lora_files import memory_rows
from continual.strategies.am_lora_router import ROUTER_MODULE
from registry.artifacts import read_manifest
from registry.entities import Job, JobKind, JobState, NodeKind, NodeRef
from registry.errors import InvalidValue
from registry.instance import Instance
from registry.settings import StrataSettings
from services.retraining import retrain_task
from services.setup import recorded_setup
from services.streams import submit_task
from services.trees import fetch_tree
from workers import consolidation
from workers.execution import execute
from workers.models import load_snapshot, memory_dirs
from workers.predict import predict
from workers.streams import create_stream

QV = {"target_modules": ["q_proj", "v_proj"], "max_steps": 6, "batch_size": 8, "rank": 4}


class Recorder:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, job: Job) -> None:
        self.sent.append(job.id)


@pytest.fixture
def inst(instance: Instance) -> Instance:
    return dataclasses.replace(instance, settings=StrataSettings(heartbeat_s=0.5))


def _train(inst: Instance, stream: Any, name: str, seed: int) -> Job:
    data = synthetic_tasks(seed=seed, train_size=24, test_size=6)[seed % 3]
    _, job = submit_task(inst, stream=stream, name=name, data=data, format="synthetic",
                         params={"eval_limit": 6})  # fmt: skip
    done = execute(inst, Recorder(), job.id, worker="w")
    assert done is not None and done.state is JobState.SUCCEEDED, done
    return done


def _consolidate(inst: Instance, stream_id: int) -> Job:
    job = inst.registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=stream_id)
    done = execute(inst, Recorder(), job.id, worker="w")
    assert done is not None
    return done


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_two_consolidations_fold_exactly_share_tensors_trace_lineage_and_roll_back(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = inst.registry
    given: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> continual_fold.Fold:
        given.append(kwargs)
        return continual_fold.fold_state(*args, **kwargs)

    monkeypatch.setattr(consolidation, "fold_state", spy)
    stream, v0 = create_stream(inst, name="s", base={"kind": "tiny"}, method="o-lora",
                               hyperparams=QV)  # fmt: skip
    _train(inst, stream, "a", 0)
    _train(inst, stream, "b", 1)
    folded_versions = reg.adapters.list_versions(stream_id=stream.id)
    before = reg.evaluations.matrix(stream.id).values[1]
    adapted = (
        recorded_setup(folded_versions[-1])
        .strategy()
        .inference_model(
            load_snapshot(inst, v0)[0],
            history=[fetch_tree(inst, v.artifact_digest or "") for v in folded_versions],
        )
    )
    job = _consolidate(inst, stream.id)
    assert job.state is JobState.SUCCEEDED, job.error
    # an exact fold is checked on the first PROBES_PER_TASK of each task's 24 training pairs
    (call,) = given
    assert [len(p) for p in call["probes"]] == [continual_fold.PROBES_PER_TASK] * 2
    v1 = reg.streams.current_snapshot(stream.id)
    assert v1.version == 1 and v1.parent_id == v0.id
    assert v1.folded_adapter_ids == tuple(v.id for v in folded_versions)
    # the new snapshot alone computes what the old one computed with its adapters
    torch.testing.assert_close(_logits(load_snapshot(inst, v1)[0]), _logits(adapted),
                               rtol=0, atol=1e-4)  # fmt: skip
    events = reg.jobs.events(job.id, limit=1000)
    gap = next(e.metrics for e in events if e.metrics and "fold_max_abs_logit_diff" in e.metrics)
    assert gap["fold_max_abs_logit_diff"] <= continual_fold.FOLD_ATOL
    # the job reports where its time went
    assert all(gap[k] >= 0 for k in ("seconds_load", "seconds_fold"))
    # every task re-evaluated on the new snapshot: the same function, the same accuracies
    after = reg.evaluations.matrix(stream.id).values[1]
    assert after == pytest.approx(before)
    # storage: only the adapted projections (q, v of 2 layers) and O-LoRA's memory are new
    sizes = next(e.metrics for e in events if e.metrics and "bytes_added" in e.metrics)
    assert sizes["seconds_store"] >= 0
    old = read_manifest(inst.artifacts, v0.artifact_digest)["files"]
    new = read_manifest(inst.artifacts, v1.artifact_digest)["files"]
    changed = sorted(rel for rel, f in new.items() if old.get(rel) != f)
    assert changed == [
        "olora_memory/adapter_config.json", "olora_memory/adapter_model.safetensors",
        *(f"tensors/model.layers.{i}.self_attn.{p}_proj.weight.safetensors"
          for i in range(2) for p in "qv"),
    ]  # fmt: skip
    assert sizes["bytes_added"] == sum(new[rel]["size"] for rel in changed)
    assert sizes["bytes_added"] < 0.5 * sizes["snapshot_bytes"]

    # the next task trains on v1 with no adapters but O-LoRA's memory of a and b
    c = _train(inst, stream, "c", 2)
    vc = reg.adapters.list_versions(stream_id=stream.id)[-1]
    assert vc.base_snapshot_id == v1.id and vc.depends_on == ()
    messages = [e.message for e in reg.jobs.events(c.id, limit=1000)]
    assert any("0 earlier adapters, the memory of the tasks folded" in m for m in messages)
    assert any(m.endswith(" examples) on cpu, fp32") for m in messages)  # device, arithmetic
    second = _consolidate(inst, stream.id)
    assert second.state is JobState.SUCCEEDED, second.error
    v2 = reg.streams.current_snapshot(stream.id)
    graph = reg.lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, v2.id))
    nodes = {(n.kind, n.id) for n in graph.nodes}
    assert {(NodeKind.SNAPSHOT, v1.id), (NodeKind.SNAPSHOT, v0.id)} <= nodes
    every = reg.adapters.list_versions(stream_id=stream.id)
    assert {(NodeKind.ADAPTER, v.id) for v in every} <= nodes
    assert {(NodeKind.DATASET, v.dataset_id) for v in every} <= nodes
    assert {(NodeKind.JOB, job.id), (NodeKind.JOB, second.id)} <= nodes

    # rollback to v1: the next task trains on v1 with c's adapter; nothing is deleted
    reg.streams.set_current_snapshot(stream_id=stream.id, snapshot_id=v1.id)
    d = _train(inst, stream, "d", 0)
    vd = reg.adapters.list_versions(stream_id=stream.id)[-1]
    assert vd.base_snapshot_id == v1.id and vd.depends_on == (vc.id,)
    assert [s.version for s in reg.streams.list_snapshots(stream.id)] == [0, 1, 2]
    labels = [n.label for n in reg.lineage.ancestors(NodeRef(NodeKind.ADAPTER, vd.id)).nodes]
    assert "s snapshot v1 (current)" in labels and d.state is JobState.SUCCEEDED


def test_a_policy_consolidates_after_every_k_tasks_before_later_submissions(
    inst: Instance,
) -> None:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"}, method="inc-lora",
                              hyperparams=QV, consolidation={"every_tasks": 2})  # fmt: skip
    jobs = []
    for i, name in enumerate(("a", "b", "c")):  # all three submitted at once
        data = synthetic_tasks(seed=i, train_size=24, test_size=6)[i]
        jobs.append(submit_task(inst, stream=stream, name=name, data=data, format="synthetic",
                                params={"eval_limit": 6})[1])  # fmt: skip
    out = Recorder()
    execute(inst, out, jobs[0].id, worker="w")
    queued = inst.registry.jobs.list_jobs(stream_id=stream.id, state=JobState.QUEUED)
    assert [j.id for j in queued] == [j.id for j in jobs[1:]]  # not due after one task
    execute(inst, out, jobs[1].id, worker="w")
    fold = next(j for j in inst.registry.jobs.list_jobs(stream_id=stream.id)
                if j.kind is JobKind.CONSOLIDATE)  # fmt: skip
    assert "2 adapters" in fold.params["reason"]
    assert out.sent[-1] == fold.id  # handed over before c, which was submitted earlier
    assert execute(inst, out, jobs[2].id, worker="w") is None  # c waits for the fold
    assert execute(inst, out, fold.id, worker="w").state is JobState.SUCCEEDED  # type: ignore[union-attr]
    assert out.sent[-1] == jobs[2].id
    assert execute(inst, out, jobs[2].id, worker="w").state is JobState.SUCCEEDED  # type: ignore[union-attr]
    v1 = inst.registry.streams.current_snapshot(stream.id)
    c = inst.registry.adapters.list_versions(stream_id=stream.id)[-1]
    assert v1.version == 1 and c.base_snapshot_id == v1.id and c.depends_on == ()
    bad = [({"every_tasks": 0}, "every_tasks"), ({"sometimes": 1}, "sometimes")]
    for policy, field in bad:
        with pytest.raises(InvalidValue) as exc:
            create_stream(inst, name="t", base={"kind": "tiny"}, consolidation=policy)
        assert exc.value.field == field


def test_unverified_folds_and_empty_streams_leave_the_stream_on_its_snapshot(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty, empty_v0 = create_stream(inst, name="empty", base={"kind": "tiny"}, hyperparams=QV)
    nothing = _consolidate(inst, empty.id)
    assert nothing.state is JobState.FAILED and nothing.error is not None
    assert nothing.error.code == "conflict"

    _train(inst, empty, "a", 0)
    monkeypatch.setattr(continual_fold, "FOLD_ATOL", -1.0)  # no fold can pass this check
    failed = _consolidate(inst, empty.id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert "stays on snapshot v0" in failed.error.message
    assert inst.registry.streams.current_snapshot(empty.id).id == empty_v0.id
    assert len(inst.registry.streams.list_snapshots(empty.id)) == 1
    bad = [({"max_drop": -1}, "max_drop"), ({"max_drop": "2"}, "max_drop"),
           ({"distill_steps": -1}, "distill_steps"), ({"distill_steps": 1.5}, "distill_steps"),
           ({"distill_steps": True}, "distill_steps")]  # fmt: skip
    for policy, field in bad:
        with pytest.raises(InvalidValue) as exc:
            create_stream(inst, name="t", base={"kind": "tiny"}, consolidation=policy)
        assert exc.value.field == field


def _states(inst: Instance, stream_id: int) -> int:
    return len(inst.registry.evaluations.matrix(stream_id).states)


def test_a_fold_that_drops_a_task_past_max_drop_publishes_nothing(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = inst.registry
    am, v0 = create_stream(inst, name="am", base={"kind": "tiny"}, method="am-lora",
                           hyperparams=QV, consolidation={"max_drop": 100})  # fmt: skip
    _train(inst, am, "a", 0)
    _train(inst, am, "b", 1)
    real, calls = consolidation.score_row, []

    def folded_worse(model: Any, *args: Any, **kwargs: Any) -> Any:
        scores = real(model, *args, **kwargs)
        calls.append(model)
        if len(calls) == 2:  # the folded model's (the routed state is scored first)
            scores[0] = dataclasses.replace(scores[0], value=scores[0].value - 0.3)
        return scores

    monkeypatch.setattr(consolidation, "score_row", folded_worse)
    states = _states(inst, am.id)
    job = reg.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=am.id, params={"max_drop": 5})
    refused = execute(inst, Recorder(), job.id, worker="w")
    assert refused is not None and refused.state is JobState.FAILED and refused.error is not None
    assert refused.error.code == "consolidation_regressed"
    lines = refused.error.message.splitlines()
    assert "drop a by more than 5 points" in lines[0]
    assert lines[1].split() == ["task", "routed", "folded", "drop"]
    routed, folded, drop = (float(v) for v in lines[2].split()[1:])
    assert lines[2].split()[0] == "a" and drop == pytest.approx(routed - folded, abs=0.06)
    assert 29.9 < drop < 30.1 and lines[3].split()[0] == "b"
    assert reg.streams.current_snapshot(am.id).id == v0.id  # nothing published
    assert len(reg.streams.list_snapshots(am.id)) == 1 and _states(inst, am.id) == states
    monkeypatch.setattr(consolidation, "score_row", real)
    passed = _consolidate(inst, am.id)  # the policy's max_drop, 100, lets the same fold through
    assert passed.state is JobState.SUCCEEDED, passed.error
    assert reg.streams.current_snapshot(am.id).version == 1


def _distilled(inst: Instance, job_id: int) -> list[tuple[int, float]]:
    return [
        (int(e.metrics["distill_step"]), float(e.metrics["distill_kl"]))
        for e in inst.registry.jobs.events(job_id, limit=1000)
        if e.metrics and "distill_step" in e.metrics
    ]


def test_an_am_lora_fold_is_distilled_as_the_policy_or_the_request_says(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = inst.registry
    given: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> continual_fold.Fold:
        given.append(kwargs)
        return continual_fold.fold_state(*args, **kwargs)

    monkeypatch.setattr(consolidation, "fold_state", spy)
    policy = {"max_drop": 100, "distill_steps": 17}
    am, _ = create_stream(inst, name="am", base={"kind": "tiny"}, method="am-lora",
                          hyperparams=QV, consolidation=policy)  # fmt: skip
    _train(inst, am, "a", 0)
    _train(inst, am, "b", 1)
    by_policy = _consolidate(inst, am.id)
    assert by_policy.state is JobState.SUCCEEDED, by_policy.error
    steps = _distilled(inst, by_policy.id)
    assert [s for s, _ in steps] == [1, 16, 17]  # reported: the first, every 16th, the last
    assert all(kl >= 0 for _, kl in steps)
    # the loss is weighted towards each probe's completion: the job gives every prompt length
    (call,) = given
    assert call["distillation"] == dataclasses.replace(continual_fold.DISTILL, steps=17)
    assert call["distillation"].answer_share == continual_fold.FOLD_DISTILL_ANSWER_SHARE
    for probes, prompts in zip(call["probes"], call["prompts"], strict=True):
        assert all(0 < n < ids.shape[1] for ids, n in zip(probes, prompts, strict=True))
    assert [len(p) for p in call["probes"]] == [24, 24]  # all (up to SEQUENCES_PER_TASK)
    _train(inst, am, "c", 2)
    job = reg.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=am.id, params={"distill_steps": 0})
    fitted = execute(inst, Recorder(), job.id, worker="w")
    assert fitted is not None and fitted.state is JobState.SUCCEEDED, fitted.error
    assert _distilled(inst, fitted.id) == []  # the request's 0 over the policy's 17
    # a fit without distillation reads only the probes its least squares uses
    assert given[1]["probes"] and all(
        len(p) == continual_fold.PROBES_PER_TASK for p in given[1]["probes"]
    )
    assert reg.streams.current_snapshot(am.id).version == 2


def test_am_lora_folds_keep_routing_the_folded_tasks_to_the_snapshot(inst: Instance) -> None:
    reg = inst.registry
    am, _ = create_stream(inst, name="am", base={"kind": "tiny"}, method="am-lora",
                          hyperparams=QV, consolidation={"max_drop": 100})  # fmt: skip
    _train(inst, am, "a", 0)
    _train(inst, am, "b", 1)
    done = _consolidate(inst, am.id)
    assert done.state is JobState.SUCCEEDED, done.error
    v1 = reg.streams.current_snapshot(am.id)
    report = next(
        e for e in reg.jobs.events(done.id, limit=1000) if "routed vs folded" in e.message
    )
    assert report.metrics is not None
    for task in ("a", "b"):  # routed and folded accuracy, and the gate the fold weighed by
        assert 0 <= report.metrics[f"routed.{task}"] <= 1
        assert 0 <= report.metrics[f"folded.{task}"] <= 1
        assert 0 < report.metrics[f"mean_gate.{task}"] < 1
    folded_row = reg.evaluations.matrix(am.id).states[-1]
    assert folded_row.kind == "consolidate" and folded_row.adapters == ()
    assert list(folded_row.values) == [report.metrics["folded.a"], report.metrics["folded.b"]]
    memory = memory_dirs(inst, v1, "am-lora")
    stats = load_file(str(memory[0] / "router.safetensors"))
    assert stats["router.counts"].tolist() == [48.0, 48.0]  # 6 steps x 8 sequences each

    _train(inst, am, "c", 2)  # on the folded snapshot: routes among a, b (folded) and c
    c = reg.adapters.list_versions(stream_id=am.id)[-1]
    assert c.base_snapshot_id == v1.id and c.depends_on == ()
    state = (
        recorded_setup(c)
        .strategy()
        .inference_model(
            load_snapshot(inst, v1)[0], history=[*memory, fetch_tree(inst, c.artifact_digest or "")]
        )
    )
    plain = load_snapshot(inst, v1)[0]
    data = synthetic_tasks(seed=0, train_size=24, test_size=6)[0]  # task a's
    ids = torch.tensor([tokenizer_ids(inst, v1, data.test[0].prompt)])
    with torch.no_grad():  # a's input goes to no adapter: the snapshot alone answers
        assert torch.equal(state(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
    # an evaluate job and predict rebuild the same state, memory first
    evaluate = reg.jobs.create(kind=JobKind.EVALUATE, stream_id=am.id)
    evaluated = execute(inst, Recorder(), evaluate.id, worker="w")
    assert evaluated is not None and evaluated.state is JobState.SUCCEEDED, evaluated.error
    answer = predict(inst, am, [data.test[0].prompt], labels=list(data.labels or ()))
    assert [a.id for a in answer.adapters] == [c.id] and answer.snapshot.id == v1.id
    assert answer.scores is not None and set(answer.scores[0]) == set(data.labels or ())
    again = _consolidate(inst, am.id)  # the second fold keeps the first one's tasks
    assert again.state is JobState.SUCCEEDED, again.error
    v2 = reg.streams.current_snapshot(am.id)
    stats = load_file(str(memory_dirs(inst, v2, "am-lora")[0] / "router.safetensors"))
    assert stats["router.counts"].tolist() == [48.0, 48.0, 48.0]


def test_retraining_a_folded_am_lora_task_keeps_the_stream_servable(inst: Instance) -> None:
    """a and b folded into v1, c learned on it, then a retrained: the new a adapter is trained
    beside c as the stream's newest (its selector mixes both), so evaluation and predict rebuild
    the state. Before, it was trained beside nothing and every later evaluate job failed."""
    reg = inst.registry
    am, _ = create_stream(inst, name="am", base={"kind": "tiny"}, method="am-lora",
                          hyperparams=QV, consolidation={"max_drop": 100})  # fmt: skip
    _train(inst, am, "a", 0)
    _train(inst, am, "b", 1)
    assert _consolidate(inst, am.id).state is JobState.SUCCEEDED
    _train(inst, am, "c", 2)
    c = reg.adapters.list_versions(stream_id=am.id)[-1]
    _, _, job = retrain_task(inst, stream=am, task_name="a", params={"eval_limit": 6})
    done = execute(inst, Recorder(), job.id, worker="w")
    assert done is not None and done.state is JobState.SUCCEEDED, done
    v1 = reg.streams.current_snapshot(am.id)
    state = reg.adapters.stream_state(stream_id=am.id, snapshot_id=v1.id)
    a = reg.adapters.find_by_job(job.id)
    assert a is not None and [v.id for v in state] == [c.id, a.id] and a.depends_on == (c.id,)
    evaluate = reg.jobs.create(kind=JobKind.EVALUATE, stream_id=am.id)
    evaluated = execute(inst, Recorder(), evaluate.id, worker="w")
    assert evaluated is not None and evaluated.state is JobState.SUCCEEDED, evaluated.error
    data = synthetic_tasks(seed=0, train_size=24, test_size=6)[0]
    answer = predict(inst, am, [data.test[0].prompt], labels=list(data.labels or ()))
    assert [v.id for v in answer.adapters] == [c.id, a.id]
    # a's router row left the memory: its inputs go to its new adapter, b's still to v1 alone
    memory = memory_dirs(inst, v1, "am-lora", learned=[c.task_id, a.task_id])
    b_id = reg.tasks.get(stream_id=am.id, name="b").id
    assert memory_rows(memory[0]) == (str(b_id),)
    assert memory_rows(memory_dirs(inst, v1, "am-lora")[0]) == (str(a.task_id), str(b_id))
    history = [*memory, *(fetch_tree(inst, v.artifact_digest or "") for v in state)]
    model = (
        recorded_setup(a).strategy().inference_model(load_snapshot(inst, v1)[0], history=history)
    )
    plain = load_snapshot(inst, v1)[0].eval()
    router = getattr(model, ROUTER_MODULE)
    assert router.num_folded == 1  # b alone: c and the new a have adapters
    for seed in (0, 1):  # a's input: to its new adapter; b's: to the snapshot alone
        prompt = synthetic_tasks(seed=seed, train_size=24, test_size=6)[seed].test[0].prompt
        ids = torch.tensor([tokenizer_ids(inst, v1, prompt)])
        with torch.no_grad():
            features = model.get_input_embeddings()(ids).mean(dim=1)  # (1, d)
            folded_mass = float(router.log_posterior(features)[0, :1].exp().sum())
            same = torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert (folded_mass < 0.1 and not same) if seed == 0 else (folded_mass > 0.9 and same)
    assert _consolidate(inst, am.id).state is JobState.SUCCEEDED  # and it folds again
    v2 = reg.streams.current_snapshot(am.id)
    assert memory_rows(memory_dirs(inst, v2, "am-lora")[0]) == (
        str(b_id),
        str(c.task_id),
        str(a.task_id),
    )


def tokenizer_ids(inst: Instance, snapshot: Any, text: str) -> list[int]:
    tokenizer = load_snapshot(inst, snapshot)[1]
    return list(tokenizer(text)["input_ids"])


def test_the_consolidation_evaluates_with_the_prompt_cut_training_used(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int | None] = []
    score_row = consolidation.score_row

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("max_length"))
        return score_row(*args, **kwargs)

    monkeypatch.setattr(consolidation, "score_row", spy)
    stream, _ = create_stream(inst, name="cut", base={"kind": "tiny"}, method="o-lora",
                              hyperparams={**QV, "max_length": 12})  # fmt: skip
    _train(inst, stream, "a", 0)
    assert _consolidate(inst, stream.id).state is JobState.SUCCEEDED
    assert seen == [12]  # as the training job's own evaluation cut them
