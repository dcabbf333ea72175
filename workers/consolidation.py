"""Consolidation jobs: fold a stream's adapters into a new base snapshot and move the stream
onto it, after checking what the fold changed.

1. The stream's current state (its snapshot and the adapters on it) is built as for inference.
2. The state is folded into the base weights (`continual.fold.fold_state`, the code `strata
   bench --consolidate-after` runs too):
   - seq-lora, inc-lora and o-lora fold exactly: the folded model alone must reproduce the
     adapted model's logits on a few sequences of every adapter's task within
     `continual.fold.fold_tolerance` (fp32 weights, or 16-bit ones that round when cast back);
   - am-lora's per-token mixture has no exact fold: every task is measured on the routed state
     first, and the fold is published only if no task's accuracy on the folded state drops by
     more than `max_drop` points (the job's parameter, else the stream's consolidation policy,
     else `services.policy.DEFAULT_MAX_DROP`), after a distillation from the routed state
     corrects the fitted fold (`distill_steps`, looked up the same way;
     `continual.fold_distill`). Otherwise the job fails with
     `consolidation_regressed` and the per-task table of routed and folded accuracy; nothing
     is stored.
   Either way the stream stays on its old snapshot when the check fails.
3. The new snapshot is stored tensor by tensor (only the changed tensors are new blobs), with
   the memory of the folded tasks (o-lora: their input subspace; am-lora: that and the task
   router's statistics, so later tasks route the folded tasks' inputs to the snapshot itself),
   then registered as the stream's current snapshot with lineage edges to its parent, the
   folded adapters and this job; every task's score on it is recorded as a new state.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from continual.data import TaskData
from continual.fold import (
    DISTILL,
    FOLDABLE,
    GATED_METHODS,
    Fold,
    TaskCheck,
    check_drops,
    drop_table,
    fold_probes,
    fold_state,
    fold_tolerance,
    probe_count,
)
from registry.artifacts import read_manifest
from registry.entities import AdapterVersion, Job, Snapshot, Task
from registry.errors import Conflict, InvalidValue
from registry.instance import Instance
from services.datasets import load_dataset
from services.policy import (
    DEFAULT_DISTILL_STEPS,
    DEFAULT_MAX_DROP,
    check_distill_steps,
    check_max_drop,
)
from services.setup import recorded_setup
from workers.evaluation import TaskScore, record_row, score_row
from workers.jobs import DEFAULT_EVAL_LIMIT
from workers.models import load_snapshot, state_dirs, store_derived
from workers.reporting import JobReporter

log = logging.getLogger(__name__)

__all__ = ["consolidate"]


def consolidate(inst: Instance, job: Job, reporter: JobReporter) -> None:
    reg = inst.registry
    assert job.stream_id is not None
    stream = reg.streams.get_by_id(job.stream_id)
    snapshot = reg.streams.current_snapshot(job.stream_id)
    adapters = reg.adapters.stream_state(stream_id=job.stream_id, snapshot_id=snapshot.id)
    if not adapters:
        if "schedule_id" in job.params:  # a schedule fires whether or not tasks came since
            reporter.event(f"nothing to fold: no adapters on snapshot v{snapshot.version}")
            return
        raise Conflict(f"no adapters on snapshot v{snapshot.version} to fold", field="stream")
    method = adapters[-1].method
    if method not in FOLDABLE:
        raise InvalidValue(f"{method} streams cannot be consolidated", field="method")
    max_drop = check_max_drop(
        job.params.get("max_drop", stream.consolidation.get("max_drop", DEFAULT_MAX_DROP))
    )
    distill_steps = check_distill_steps(
        job.params.get("distill_steps",
                       stream.consolidation.get("distill_steps", DEFAULT_DISTILL_STEPS))
    )  # fmt: skip
    tasks = reg.tasks.list_tasks(job.stream_id)
    datasets = [(t, load_dataset(inst, reg.tasks.get_version(t.id).dataset)) for t in tasks]
    reporter.event(f"folding {len(adapters)} {method} adapters into snapshot v{snapshot.version}")
    fold, scores = _fold_checked(
        inst, job, reporter, snapshot, adapters, datasets, max_drop=max_drop,
        distill_steps=distill_steps,
    )  # fmt: skip
    started = time.perf_counter()
    digest, sizes = _store(inst, fold, parent=snapshot)
    stored: dict[str, float] = {**sizes, "seconds_store": round(time.perf_counter() - started, 3)}
    new = reg.streams.add_snapshot(
        stream_id=job.stream_id, artifact_digest=digest, parent_id=snapshot.id,
        folded_adapter_ids=[v.id for v in adapters], job_id=job.id,
        source={"consolidated_from": snapshot.version, "method": method,
                "folded": [f"{v.task_name}@v{v.version}" for v in adapters]},
    )  # fmt: skip
    reporter.event(f"stream on snapshot v{new.version}", metrics=stored)
    reporter.progress(0.9)
    after = max(t.position for t in tasks if t.id in {v.task_id for v in adapters})
    record_row(inst, reporter, scores, after_position=after, snapshot_id=new.id,
               adapter_version_id=None)  # fmt: skip


def _fold_checked(
    inst: Instance,
    job: Job,
    reporter: JobReporter,
    snapshot: Snapshot,
    adapters: list[AdapterVersion],
    datasets: list[tuple[Task, TaskData]],
    *,
    max_drop: float,
    distill_steps: int,
) -> tuple[Fold, list[TaskScore]]:
    """The fold (checked: exact within tolerance, or no task past `max_drop`) and every task's
    score on the folded model."""
    method = adapters[-1].method
    setup = recorded_setup(adapters[-1])
    limit = int(job.params.get("eval_limit", DEFAULT_EVAL_LIMIT))
    # prompts cut where training cut them, as the training jobs' own evaluations do
    cut = setup.hyper.max_length
    clock = _Clock()
    dirs = state_dirs(inst, snapshot, method, adapters)
    base, tokenizer = load_snapshot(inst, snapshot)
    state = setup.strategy().inference_model(base, history=dirs)
    clock.lap("seconds_load")
    before = None
    if method in GATED_METHODS:
        reporter.event("measuring every task on the routed state before the fold")
        before = score_row(state, tokenizer, datasets, limit=limit, max_length=cut)
        clock.lap("seconds_evaluate")
    reporter.progress(0.3)
    data = {task.id: d for task, d in datasets}
    distillation = replace(DISTILL, steps=distill_steps)
    probes, prompts = fold_probes(tokenizer, [data[v.task_id] for v in adapters], max_length=cut,
                                  count=probe_count(method, distillation))  # fmt: skip
    labels = [str(v.task_id) for v in adapters]  # the memory's router rows name their tasks
    if method in GATED_METHODS and distill_steps:
        reporter.event(f"fitting the fold, then {distill_steps} steps of distillation from the "
                       "routed state")  # fmt: skip

    def distilled(step: int, steps: int, kl: float) -> None:
        reporter.progress(0.3 + 0.2 * step / steps)
        if step == 1 or step == steps or step % 16 == 0:
            reporter.event(f"distillation step {step}/{steps}: KL {kl:.4f} nats/token",
                           metrics={"distill_step": step, "distill_kl": kl})  # fmt: skip

    fold = fold_state(state, method=method, history=dirs, probes=probes, labels=labels,
                      distillation=distillation,
                      on_distill_step=distilled, prompts=prompts)  # fmt: skip
    clock.lap("seconds_fold")
    if fold.exact:
        _check_exact(reporter, fold.max_logit_diff, fold.model, snapshot, clock)
    reporter.progress(0.5)
    scores = score_row(fold.model, tokenizer, datasets, limit=limit, max_length=cut)
    clock.lap("seconds_evaluate")
    if before is not None:
        _check_drops(reporter, before, scores, fold.mean_gates, adapters, max_drop=max_drop,
                     laps=clock.laps)  # fmt: skip
    return fold, scores


def _check_exact(
    reporter: JobReporter, gap: float | None, model: Any, snapshot: Snapshot, clock: Any
) -> None:
    gap = 0.0 if gap is None else gap
    tolerance = fold_tolerance(model)
    reporter.event(f"max |logit difference| after folding: {gap:.2e} (tolerance {tolerance:g})",
                   metrics={"fold_max_abs_logit_diff": gap, "tolerance": tolerance,
                            **clock.laps})  # fmt: skip
    if not gap <= tolerance:
        raise Conflict(f"the folded model differs from the adapted one by {gap:.3g} "
                       f"(> {tolerance:g}); the stream stays on snapshot v{snapshot.version}",
                       field="fold")  # fmt: skip


def _check_drops(
    reporter: JobReporter,
    before: list[TaskScore],
    after: list[TaskScore],
    gates: tuple[float, ...] | None,
    adapters: list[AdapterVersion],
    *,
    max_drop: float,
    laps: dict[str, float],
) -> None:
    """Report routed against folded accuracy per task; raise ConsolidationRegressed when a
    task drops more than `max_drop` points."""
    routed = {s.task.id: s.value for s in before if s.metric == "accuracy"}
    folded_tasks = {a.task_id for a in adapters}
    learned = max((s.task.position for s in before if s.task.id in folded_tasks), default=-1)
    checks = [TaskCheck(task=s.task.name, before=routed.get(s.task.id), after=s.value,
                        learned=s.task.position <= learned)
              for s in after if s.metric == "accuracy"]  # fmt: skip
    metrics: dict[str, float] = {**laps, "max_drop": max_drop}
    for check in checks:
        metrics[f"routed.{check.task}"] = check.before if check.before is not None else -1.0
        metrics[f"folded.{check.task}"] = check.after
    for version, gate in zip(adapters, gates or (), strict=False):
        metrics[f"mean_gate.{version.task_name}"] = gate
    reporter.event("routed vs folded accuracy per task:\n" + drop_table(checks), metrics=metrics)
    check_drops(checks, max_drop=max_drop)


class _Clock:
    """Wall time per phase (seconds, summed when a phase comes back), for the job's events."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round(self.laps.get(phase, 0.0) + now - self._last, 3)
        self._last = now


def _store(inst: Instance, fold: Fold, *, parent: Snapshot) -> tuple[str, dict[str, int]]:
    """Store the folded model (and the memory of the folded tasks); returns its digest and byte
    counts. Only the weights the fold changed are written: the rest is the parent snapshot's."""
    with tempfile.TemporaryDirectory(prefix="strata-memory-") as tmp:
        extra = Path(tmp) if fold.write_memory(Path(tmp)) else None
        digest = store_derived(
            inst, fold.model, parent=parent.artifact_digest, changed=fold.changed, extra=extra
        )
    old = read_manifest(inst.artifacts, parent.artifact_digest)["files"]
    new = read_manifest(inst.artifacts, digest)["files"]
    known = {f["digest"] for f in old.values()}
    total = sum(f["size"] for f in new.values())
    added = sum(f["size"] for f in {f["digest"]: f for f in new.values()}.values()
                if f["digest"] not in known)  # fmt: skip
    return digest, {"snapshot_bytes": total, "bytes_added": added}
