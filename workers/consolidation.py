"""Consolidation jobs: fold a stream's adapters into a new base snapshot and move the stream
onto it, after checking that nothing changed.

1. The stream's current state (its snapshot and newest adapters) is built as for inference.
2. Its logits on a sample of every task's test prompts are the reference.
3. The adapters are folded into the base weights in fp32 (`continual.consolidation`).
4. The folded model alone must reproduce the reference within `FOLD_ATOL` (fp32 weights) or
   `FOLD_ATOL_HALF` (16-bit weights, which round once when cast back); otherwise the job fails
   and the stream stays on its old snapshot.
5. The new snapshot is stored tensor by tensor (only the changed tensors are new blobs), with
   O-LoRA's memory of the folded tasks' subspace, then registered as the stream's current
   snapshot with lineage edges to its parent, the folded adapters and this job; every task is
   re-evaluated on it.

AM-LoRA streams are refused: their per-token mixture of adapters is input-dependent and has no
exact fold into one weight matrix (folding the sum would change what the model computes).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from continual.batching import encode_pair
from continual.consolidation import (
    MEMORY_DIR,
    Subspace,
    fold_into_base,
    folded_subspace,
    folded_weight_names,
    load_memory_adapter,
    save_memory_adapter,
)
from continual.data import TaskData
from registry.artifacts import read_manifest
from registry.entities import AdapterVersion, Job, JobKind, Snapshot, Stream, Task
from registry.errors import Conflict, InvalidValue
from registry.instance import Instance
from workers.datasets import load_dataset
from workers.evaluation import evaluate_row
from workers.jobs import DEFAULT_EVAL_LIMIT, recorded_setup
from workers.models import fetch_tree, load_snapshot, memory_dirs, store_derived
from workers.reporting import JobReporter

log = logging.getLogger(__name__)

FOLD_ATOL = 1e-3  # fp32: summing B A into W reorders float additions, nothing more
FOLD_ATOL_HALF = 5e-2  # bf16 / fp16 weights round to ~3 significant digits when cast back
VERIFY_PROMPTS_PER_TASK = 4
FOLDABLE = ("seq-lora", "inc-lora", "o-lora")
POLICY = {
    "every_tasks": "fold once this many adapters sit on the current snapshot",
    "max_adapters": "fold when more adapters than this sit on the current snapshot",
    "max_rank": "fold when their ranks add up to more than this",
}


def check_policy(policy: object, *, method: str) -> dict[str, int]:
    """A stream's consolidation policy: positive integers for any of `POLICY`'s keys."""
    if not isinstance(policy, dict):
        raise InvalidValue("must be an object", field="consolidation")
    out: dict[str, int] = {}
    for key, value in policy.items():
        if key not in POLICY:
            raise InvalidValue(f"unknown policy key (known: {sorted(POLICY)})", field=key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidValue(f"must be a positive integer, got {value!r}", field=key)
        out[key] = value
    if out and method not in FOLDABLE:
        raise InvalidValue(f"{method} streams cannot be consolidated", field="consolidation")
    return out


def due(inst: Instance, stream: Stream) -> str | None:
    """Why the stream's policy asks for a consolidation now, or None."""
    policy = stream.consolidation
    if not policy:
        return None
    snapshot = inst.registry.streams.current_snapshot(stream.id)
    adapters = inst.registry.adapters.stream_state(stream_id=stream.id, snapshot_id=snapshot.id)
    count = len(adapters)
    rank = sum(int(v.hyperparams.get("rank", 0)) for v in adapters)
    if "every_tasks" in policy and count >= policy["every_tasks"]:
        return f"{count} adapters on snapshot v{snapshot.version} (every {policy['every_tasks']})"
    if "max_adapters" in policy and count > policy["max_adapters"]:
        return f"{count} adapters > max_adapters {policy['max_adapters']}"
    if "max_rank" in policy and rank > policy["max_rank"]:
        return f"total rank {rank} > max_rank {policy['max_rank']}"
    return None


def queue_if_due(inst: Instance, stream_id: int, *, after_job: int) -> Job | None:
    """Queue a consolidation when the stream's policy says so and none is pending already; it
    runs right after `after_job` (the task that made it due), before tasks submitted since."""
    stream = inst.registry.streams.get_by_id(stream_id)
    reason = due(inst, stream)
    if reason is None:
        return None
    open_jobs = inst.registry.jobs.list_jobs(stream_id=stream_id, limit=1000)
    if any(j.kind is JobKind.CONSOLIDATE and not j.state.terminal for j in open_jobs):
        return None
    job = inst.registry.jobs.create(
        kind=JobKind.CONSOLIDATE,
        stream_id=stream_id,
        params={"reason": reason},
        after_job=after_job,
    )
    log.info("stream %s: consolidation queued (%s)", stream.name, reason)
    return job


def consolidate(inst: Instance, job: Job, reporter: JobReporter) -> None:
    reg = inst.registry
    assert job.stream_id is not None
    snapshot = reg.streams.current_snapshot(job.stream_id)
    adapters = reg.adapters.stream_state(stream_id=job.stream_id, snapshot_id=snapshot.id)
    if not adapters:
        raise Conflict(f"no adapters on snapshot v{snapshot.version} to fold", field="stream")
    method = adapters[-1].method
    if method not in FOLDABLE:
        raise InvalidValue(
            f"{method} streams cannot be consolidated: its input-dependent mixture of adapters "
            "has no exact fold into the base weights", field="method",
        )  # fmt: skip
    tasks = reg.tasks.list_tasks(job.stream_id)
    datasets = [(t, load_dataset(inst, reg.tasks.get_dataset_by_id(t.dataset_id))) for t in tasks]
    reporter.event(f"folding {len(adapters)} {method} adapters into snapshot v{snapshot.version}")
    folded, tokenizer, changed, subspace = _fold_verified(
        inst, reporter, snapshot, adapters, datasets
    )
    started = time.perf_counter()
    digest, sizes = _store(inst, folded, changed, subspace, parent=snapshot)
    stored: dict[str, float] = {**sizes, "seconds_store": round(time.perf_counter() - started, 3)}
    new = reg.streams.add_snapshot(
        stream_id=job.stream_id, artifact_digest=digest, parent_id=snapshot.id,
        folded_adapter_ids=[v.id for v in adapters], job_id=job.id,
        source={"consolidated_from": snapshot.version, "method": method,
                "folded": [f"{v.task_name}@v{v.version}" for v in adapters]},
    )  # fmt: skip
    reporter.event(f"stream on snapshot v{new.version}", metrics=stored)
    reporter.progress(0.8)
    after = max(t.position for t in tasks if t.id in {v.task_id for v in adapters})
    setup = recorded_setup(adapters[-1])
    state = setup.strategy().inference_model(folded, history=memory_dirs(inst, new, method))
    limit = int(job.params.get("eval_limit", DEFAULT_EVAL_LIMIT))
    # prompts cut where training cut them, as the training jobs' own evaluations do
    evaluate_row(inst, reporter, state, tokenizer, datasets, after_position=after,
                 snapshot_id=new.id, adapter_version_id=None, limit=limit,
                 max_length=setup.hyper.max_length)  # fmt: skip


def _fold_verified(
    inst: Instance,
    reporter: JobReporter,
    snapshot: Snapshot,
    adapters: list[AdapterVersion],
    datasets: list[tuple[Task, TaskData]],
) -> tuple[Any, Any, list[str], Subspace | None]:
    """The folded model (its logits checked against the adapted model's), its tokenizer, the
    names of the weights the fold changed and, for O-LoRA, the subspace of every task now in
    the base."""
    method = adapters[-1].method
    clock = _Clock()
    memory = memory_dirs(inst, snapshot, method)
    dirs = memory + [fetch_tree(inst, v.artifact_digest or "") for v in adapters]
    base, tokenizer = load_snapshot(inst, snapshot)
    state = recorded_setup(adapters[-1]).strategy().inference_model(base, history=dirs)
    if not isinstance(state, PeftModel):
        raise InvalidValue(f"{method} does not build a PEFT model to fold", field="method")
    clock.lap("seconds_load")
    prompts = _verification_inputs(tokenizer, [d for _, d in datasets])
    reference = _logits(state, prompts)
    clock.lap("seconds_verify")
    previous = load_memory_adapter(memory[0]) if memory else None
    subspace = folded_subspace(state, previous=previous) if method == "o-lora" else None
    changed = folded_weight_names(state)
    folded = fold_into_base(state)
    clock.lap("seconds_fold")
    gap = max(
        float((a - b).abs().max()) for a, b in zip(reference, _logits(folded, prompts), strict=True)
    )
    clock.lap("seconds_verify")
    tolerance = FOLD_ATOL if next(folded.parameters()).dtype == torch.float32 else FOLD_ATOL_HALF
    reporter.event(f"max |logit difference| after folding: {gap:.2e} (tolerance {tolerance:g})",
                   metrics={"fold_max_abs_logit_diff": gap, "tolerance": tolerance,
                            **clock.laps})  # fmt: skip
    if not gap <= tolerance:
        raise Conflict(f"the folded model differs from the adapted one by {gap:.3g} "
                       f"(> {tolerance:g}); the stream stays on snapshot v{snapshot.version}",
                       field="fold")  # fmt: skip
    return folded, tokenizer, changed, subspace


class _Clock:
    """Wall time per phase (seconds, summed when a phase comes back), for the job's events."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round(self.laps.get(phase, 0.0) + now - self._last, 3)
        self._last = now


def _verification_inputs(tokenizer: Any, datasets: list[Any]) -> list[torch.Tensor]:
    """A few test prompts of every task (training prompts when a task has no test split)."""
    prompts = []
    for data in datasets:
        examples = (data.test or data.train)[:VERIFY_PROMPTS_PER_TASK]
        for ex in examples:
            ids = encode_pair(tokenizer, prompt=ex.prompt, completion=ex.completion,
                              add_eos=False, max_length=256).ids  # fmt: skip
            prompts.append(torch.tensor([ids]))
    return prompts


def _logits(model: Any, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=p.to(device)).logits.float().cpu() for p in prompts]


def _store(
    inst: Instance,
    model: Any,
    changed: list[str],
    subspace: Subspace | None,
    *,
    parent: Snapshot,
) -> tuple[str, dict[str, int]]:
    """Store the folded model (and O-LoRA's memory); returns its digest and byte counts. Only
    the weights the fold changed are written: the rest is the parent snapshot's, as stored."""
    extra = None
    with tempfile.TemporaryDirectory(prefix="strata-memory-") as tmp:
        if subspace is not None:
            save_memory_adapter(subspace, Path(tmp) / MEMORY_DIR)
            extra = Path(tmp)
        digest = store_derived(
            inst, model, parent=parent.artifact_digest, changed=changed, extra=extra
        )
    old = read_manifest(inst.artifacts, parent.artifact_digest)["files"]
    new = read_manifest(inst.artifacts, digest)["files"]
    known = {f["digest"] for f in old.values()}
    total = sum(f["size"] for f in new.values())
    added = sum(f["size"] for f in {f["digest"]: f for f in new.values()}.values()
                if f["digest"] not in known)  # fmt: skip
    return digest, {"snapshot_bytes": total, "bytes_added": added}
