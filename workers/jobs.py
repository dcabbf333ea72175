"""Job orchestration: load from the registry, call `continual`, publish results.

The handlers of train, retrain and evaluate jobs (`workers.runner` dispatches to them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual.checkpoint import TrainState, load_train_state, save_train_state
from continual.data import TaskData
from continual.strategies import Strategy
from continual.training import train
from registry.artifacts import put_tree
from registry.entities import AdapterStatus, AdapterVersion, Job, JobKind, Snapshot, Task
from registry.errors import Conflict
from registry.instance import Instance
from services.datasets import load_dataset
from services.retraining import replay_examples
from services.setup import TrainingSetup, recorded_setup, training_setup
from services.trees import fetch_tree
from workers.evaluation import evaluate_row
from workers.models import load_snapshot, state_dirs
from workers.promotion import promote
from workers.reporting import JobReporter

log = logging.getLogger(__name__)

DEFAULT_EVAL_LIMIT = 200
TRAIN_SPAN = (0.05, 0.85)  # share of a train job's progress spent in the training loop


@dataclass(frozen=True)
class _TrainPlan:
    """Everything a train or retrain job reads before it trains."""

    task: Task
    setup: TrainingSetup
    snapshot: Snapshot
    history: list[AdapterVersion]  # the earlier adapters active while training
    dataset_id: int  # what this job trains on
    datasets: list[tuple[Task, TaskData]]  # every task of the stream, for evaluation
    published: AdapterVersion | None  # what an earlier run of this job already published


def _plan(inst: Instance, job: Job) -> _TrainPlan:
    reg = inst.registry
    assert job.stream_id is not None and job.task_id is not None
    stream = reg.streams.get_by_id(job.stream_id)
    task = reg.tasks.get_by_id(job.task_id)
    setup = training_setup(
        method=stream.method, hyperparams=stream.hyperparams, params=job.params,
        options=stream.method_options,
    )  # fmt: skip
    published = reg.adapters.find_by_job(job.id)
    if published is not None:  # a re-run keeps what the first run trained on
        snapshot = reg.streams.get_snapshot_by_id(published.base_snapshot_id)
        history = [reg.adapters.get_by_id(i) for i in published.depends_on]
    else:
        snapshot = reg.streams.current_snapshot(stream.id)
        tasks = {t.id: t.position for t in reg.tasks.list_tasks(stream.id)}
        state = reg.adapters.stream_state(stream_id=stream.id, snapshot_id=snapshot.id)
        if job.kind is JobKind.RETRAIN:  # beside every other task's adapter, as the newest
            history = [v for v in state if v.task_id != task.id]
        else:
            history = [v for v in state if tasks[v.task_id] < task.position]
    datasets = [
        (t, load_dataset(inst, reg.tasks.get_version(t.id).dataset))
        for t in reg.tasks.list_tasks(stream.id)
    ]
    return _TrainPlan(
        task=task, setup=setup, snapshot=snapshot, history=history,
        dataset_id=int(job.params.get("dataset_id") or task.dataset_id), datasets=datasets,
        published=published,
    )  # fmt: skip


def train_job(inst: Instance, job: Job, reporter: JobReporter) -> None:
    """Train the job's task on top of the stream's current state, publish it, evaluate.

    Train and retrain jobs both land here; a retrain job may name another stored dataset
    (`params.dataset_id`). Re-running a job (its worker died) resumes from its newest
    checkpoint, and a job whose adapter is already published only re-evaluates."""
    reg = inst.registry
    plan = _plan(inst, job)
    if plan.published is None and _already_trained(inst, job, plan, reporter):
        return
    strategy = plan.setup.strategy()
    history_dirs = state_dirs(
        inst, plan.snapshot, plan.setup.method, plan.history, training=plan.task.id
    )
    folded = len(history_dirs) > len(plan.history)  # a memory of folded tasks came first
    limit = int(job.params.get("eval_limit", DEFAULT_EVAL_LIMIT))
    base, tokenizer = load_snapshot(inst, plan.snapshot)
    max_length = plan.setup.hyper.max_length  # evaluation cuts prompts as training does
    _evaluate_baselines(
        inst, reporter, base, tokenizer, plan.datasets, plan.snapshot.id, limit, max_length
    )
    before = reg.evaluations.matrix(plan.task.stream_id)  # the stream's scores before this job
    version = plan.published
    if version is not None and version.status is AdapterStatus.READY:
        reporter.event(f"adapter {plan.task.name} v{version.version} was published by this job")
    else:
        data = load_dataset(inst, reg.tasks.get_dataset_by_id(plan.dataset_id))
        data = _with_replay(inst, job, plan, data, reporter)
        model = strategy.prepare(base, history=history_dirs, hyper=plan.setup.hyper)
        digest, metrics = _fit(inst, job, reporter, model=model, strategy=strategy,
                               tokenizer=tokenizer, plan=plan, data=data,
                               memory=folded)  # fmt: skip
        version = reg.adapters.create_version(
            task_id=plan.task.id, method=plan.setup.method, hyperparams=plan.setup.record(),
            base_snapshot_id=plan.snapshot.id, dataset_id=plan.dataset_id,
            depends_on=[v.id for v in plan.history], job_id=job.id,
        )  # fmt: skip
        version = reg.adapters.mark_ready(version.id, artifact_digest=digest, metrics=metrics)
        reporter.event(f"published adapter {plan.task.name} v{version.version}", metrics=metrics)
        del model  # and `base` below, which it wraps: free the device before the next load
    reporter.progress(TRAIN_SPAN[1])

    del base
    fresh, _ = load_snapshot(inst, plan.snapshot)  # the published artifacts, not the trained model
    adapter_dir = fetch_tree(inst, version.artifact_digest or "")
    state = strategy.inference_model(fresh, history=[*history_dirs, adapter_dir])
    scores = evaluate_row(
        inst, reporter, state, tokenizer, plan.datasets, after_position=plan.task.position,
        snapshot_id=plan.snapshot.id, adapter_version_id=version.id, limit=limit,
        max_length=max_length,
    )  # fmt: skip
    own = [s for s in scores if s.task.id == plan.task.id]
    if own:
        version = reg.adapters.update_metrics(version.id, {own[0].metric: own[0].value})
    promote(inst, job, reporter, stream=reg.streams.get_by_id(plan.task.stream_id),
            task=plan.task, version=version, before=before, scores=scores)  # fmt: skip


def _already_trained(inst: Instance, job: Job, plan: _TrainPlan, reporter: JobReporter) -> bool:
    """A scheduled retrain of the task's newest data that an adapter of the task was already
    trained on has nothing to learn: it ends with the event "no new data"."""
    version = job.params.get("dataset_version")
    if job.kind is not JobKind.RETRAIN or "schedule_id" not in job.params or version is None:
        return False
    versions = inst.registry.adapters.list_versions(
        stream_id=plan.task.stream_id, task_id=plan.task.id, limit=10_000
    )
    trained = [v for v in versions
               if v.dataset_id == plan.dataset_id and v.status is AdapterStatus.READY]  # fmt: skip
    if not trained:
        return False
    reporter.event(
        f"no new data: dataset version {version} of {plan.task.name} is already trained "
        f"(adapter v{trained[-1].version}); nothing to retrain"
    )
    return True


def _with_replay(
    inst: Instance, job: Job, plan: _TrainPlan, data: TaskData, reporter: JobReporter
) -> TaskData:
    """The job's training data with `params.replay` of the earlier versions' examples mixed in
    (drawn with the job's seed: a re-run draws the same)."""
    share = float(job.params.get("replay") or 0.0)
    version = job.params.get("dataset_version")
    if share <= 0 or version is None:
        return data
    extra = replay_examples(inst, task_id=plan.task.id, before_version=int(version), share=share,
                            seed=plan.setup.hyper.seed + job.id)  # fmt: skip
    reporter.event(f"replaying {len(extra)} examples of earlier dataset versions "
                   f"with {len(data.train)} of version {version}")  # fmt: skip
    return dataclasses.replace(data, train=(*data.train, *extra))


def _fit(
    inst: Instance,
    job: Job,
    reporter: JobReporter,
    *,
    model: Any,
    strategy: Strategy,
    tokenizer: Any,
    plan: _TrainPlan,
    data: TaskData,
    memory: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Train the prepared model (from the job's newest checkpoint, if any) and store the new
    adapter; returns the adapter tree's digest and the training metrics."""
    resume = None
    if job.checkpoint_digest:
        resume = load_train_state(fetch_tree(inst, job.checkpoint_digest))
        reporter.event(f"resuming from the checkpoint at step {resume.step}")
    reporter.event(
        f"training {plan.task.name} with {plan.setup.method} on snapshot "
        f"v{plan.snapshot.version} ({len(plan.history)} earlier adapters"
        f"{', the memory of the tasks folded into the snapshot' if memory else ''}, "
        f"{len(data.train)} examples) on {next(model.parameters()).device}, "
        f"{plan.setup.hyper.precision}",
        metrics={"hyperparams": plan.setup.record()},
    )
    callbacks = reporter.training_callbacks(span=TRAIN_SPAN)
    every = job.params.get("checkpoint_every") or inst.settings.checkpoint_every
    callbacks.checkpoint_every = int(every)
    callbacks.on_checkpoint = lambda state: _save_checkpoint(inst, reporter, job.id, state)
    result = train(
        model, tokenizer, data.train, plan.setup.hyper, extra_loss=strategy.extra_loss,
        callbacks=callbacks, resume=resume,
    )  # fmt: skip
    metrics = {"final_loss": result.final_loss, "steps": result.steps, "tokens": result.tokens,
               "train_seconds": round(result.seconds, 3)}  # fmt: skip
    if plan.setup.hyper.relora_every is not None:  # the adapter's rank is rank x (resets + 1)
        metrics["relora_resets"] = result.relora_resets
    with tempfile.TemporaryDirectory(prefix="strata-adapter-") as tmp:
        strategy.save_adapter(model, Path(tmp))
        name_base(Path(tmp), base_name(inst, plan.snapshot))
        return put_tree(inst.artifacts, Path(tmp)), metrics


HUB_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # imported by kind, by hub id


def base_name(inst: Instance, snapshot: Snapshot) -> str:
    """What an exported adapter names as its base: the hub id of an imported well-known model
    (its snapshot v0), else `strata:<stream>/snapshots/<version>` (`strata snapshots
    download <stream> <version>` gives it), never a path on a server."""
    stream = inst.registry.streams.get_by_id(snapshot.stream_id)
    kind = stream.base_source.get("kind")
    if snapshot.version == 0 and kind in HUB_NAMES:
        return HUB_NAMES[kind]
    return f"strata:{stream.name}/snapshots/{snapshot.version}"


def name_base(adapter_dir: Path, name: str) -> None:
    """Write `name` as the adapter config's `base_model_name_or_path` (PEFT writes the local
    path the base was loaded from)."""
    path = adapter_dir / "adapter_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = name
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_checkpoint(inst: Instance, reporter: JobReporter, job_id: int, state: TrainState) -> None:
    """Blob first, then the job's pointer: a checkpoint pointer never names a partial tree."""
    with tempfile.TemporaryDirectory(prefix="strata-ckpt-") as tmp:
        save_train_state(state, Path(tmp))
        digest = put_tree(inst.artifacts, Path(tmp))
    inst.registry.jobs.set_checkpoint(job_id, digest=digest, step=state.step)
    reporter.event(f"checkpoint at step {state.step}", level="debug")


def _evaluate_baselines(
    inst: Instance,
    reporter: JobReporter,
    base: Any,
    tokenizer: Any,
    datasets: list[tuple[Task, Any]],
    snapshot_id: int,
    limit: int,
    max_length: int | None,
) -> None:
    """Measure tasks not yet measured on the untrained base (needed for forward transfer)."""
    matrix = inst.registry.evaluations.matrix(datasets[0][0].stream_id)
    # by name: tasks submitted since `datasets` was read are in the matrix too
    measured = dict(zip(matrix.task_names, matrix.baseline, strict=True))
    missing = [pair for pair in datasets if measured.get(pair[0].name) is None]
    if missing:
        evaluate_row(
            inst, reporter, base, tokenizer, missing, after_position=-1,
            snapshot_id=snapshot_id, adapter_version_id=None, limit=limit, max_length=max_length,
        )  # fmt: skip


def evaluate_job(inst: Instance, job: Job, reporter: JobReporter) -> None:
    """Evaluate the stream's current state (its current snapshot and newest adapters) on every
    task and record the row of the newest learned task (fills cells of tasks added since)."""
    reg = inst.registry
    assert job.stream_id is not None
    snapshot = reg.streams.current_snapshot(job.stream_id)
    adapters = reg.adapters.stream_state(stream_id=job.stream_id, snapshot_id=snapshot.id)
    tasks = reg.tasks.list_tasks(job.stream_id)
    if not tasks:  # the route refuses this; a job queued otherwise fails as clearly
        raise Conflict("the stream has no tasks to evaluate yet", field="stream")
    datasets = [(t, load_dataset(inst, reg.tasks.get_version(t.id).dataset)) for t in tasks]
    limit = int(job.params.get("eval_limit", DEFAULT_EVAL_LIMIT))
    base, tokenizer = load_snapshot(inst, snapshot)
    if not adapters:  # the untrained base, cut as the stream's training jobs cut prompts
        stream = reg.streams.get_by_id(job.stream_id)
        length = training_setup(
            method=stream.method, hyperparams=stream.hyperparams, params={},
            options=stream.method_options,
        ).hyper.max_length  # fmt: skip
        _evaluate_baselines(inst, reporter, base, tokenizer, datasets, snapshot.id, limit, length)
        return
    newest = adapters[-1]
    method = recorded_setup(newest)
    dirs = state_dirs(inst, snapshot, method.method, adapters)  # folded tasks first
    state = method.strategy().inference_model(base, history=dirs)
    position = max({t.id: t.position for t in tasks}[v.task_id] for v in adapters)
    reporter.event(f"evaluating the state after task {position + 1} on {len(tasks)} tasks")
    evaluate_row(
        inst, reporter, state, tokenizer, datasets, after_position=position,
        snapshot_id=snapshot.id, adapter_version_id=newest.id, limit=limit,
        adapter_ids=[v.id for v in adapters], max_length=method.hyper.max_length,
    )  # fmt: skip
