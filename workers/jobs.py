"""Job orchestration: load from the registry, call `continual`, publish results.

`run_job(inst, job_id)` is the one entry point: the Celery task, the in-process worker of
`strata serve` and `strata demo` all call it with nothing but a job id.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from continual.config import LoraHyperparams
from continual.errors import InvalidDataset, InvalidHyperparameter, TrainingCancelled
from continual.strategies import get_strategy
from continual.training import train
from registry.artifacts import put_tree
from registry.entities import Job, JobKind, JobState, Task
from registry.errors import RegistryError
from registry.instance import Instance
from workers.datasets import load_dataset
from workers.evaluation import evaluate_row
from workers.models import fetch_tree, load_snapshot
from workers.reporting import JobReporter, Listener

log = logging.getLogger(__name__)

DEFAULT_EVAL_LIMIT = 200
TRAIN_SPAN = (0.05, 0.85)  # share of a train job's progress spent in the training loop


def training_setup(
    *, method: str, hyperparams: dict[str, Any], params: dict[str, Any]
) -> tuple[str, LoraHyperparams]:
    """A job's method and hyperparameters: the stream's defaults overridden by the job's `params`.

    Raises InvalidHyperparameter (with the field) for unknown methods or bad values.
    """
    method = params.get("method") or method
    get_strategy(method)  # validates the name
    overrides = params.get("hyperparams") or {}
    if not isinstance(overrides, dict):
        raise InvalidHyperparameter(field="hyperparams", reason="must be an object")
    return method, LoraHyperparams.from_dict({**hyperparams, **overrides})


def run_job(inst: Instance, job_id: int, *, listener: Listener | None = None) -> Job:
    """Run a queued job to a terminal state and return it. Already-finished jobs are left alone."""
    jobs = inst.registry.jobs
    job = jobs.get(job_id)
    if job.state.terminal:
        return job
    if job.state is JobState.QUEUED:
        job = jobs.transition(job_id, JobState.RUNNING)
    reporter = JobReporter(inst, job_id, listener=listener)
    handler = HANDLERS.get(job.kind)
    if handler is None:
        return _fail(inst, reporter, job_id, code="unsupported", message=f"no {job.kind} jobs yet")
    reporter.event(f"{job.kind} job started (attempt {job.attempts})")
    try:
        handler(inst, job, reporter)
    except TrainingCancelled:
        reporter.event("cancelled at the user's request", level="warning")
        return jobs.transition(job_id, JobState.CANCELLED)
    except (RegistryError, InvalidHyperparameter, InvalidDataset) as exc:
        return _fail(inst, reporter, job_id, code=_code(exc), message=str(exc))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _fail(inst, reporter, job_id, code="internal_error", message=repr(exc))
    reporter.event("succeeded")
    return jobs.transition(job_id, JobState.SUCCEEDED)


def _code(exc: Exception) -> str:
    if isinstance(exc, RegistryError):
        return exc.code
    return "invalid_hyperparameter" if isinstance(exc, InvalidHyperparameter) else "invalid_dataset"


def _fail(inst: Instance, reporter: JobReporter, job_id: int, *, code: str, message: str) -> Job:
    reporter.event(f"failed: {message}", level="error")
    return inst.registry.jobs.transition(
        job_id, JobState.FAILED, error_code=code, error_message=message
    )


def _train(inst: Instance, job: Job, reporter: JobReporter) -> None:
    """Train the job's task on top of the stream's current state, publish it, evaluate."""
    reg = inst.registry
    assert job.stream_id is not None and job.task_id is not None
    stream = reg.streams.get_by_id(job.stream_id)
    task = reg.tasks.get_by_id(job.task_id)
    method, hyper = training_setup(
        method=stream.method, hyperparams=stream.hyperparams, params=job.params
    )
    strategy = get_strategy(method)
    snapshot = reg.streams.current_snapshot(stream.id)
    tasks = reg.tasks.list_tasks(stream.id)
    position = {t.id: t.position for t in tasks}
    history = [
        v
        for v in reg.adapters.stream_state(stream_id=stream.id, snapshot_id=snapshot.id)
        if position[v.task_id] < task.position
    ]
    history_dirs = [fetch_tree(inst, v.artifact_digest or "") for v in history]
    datasets = [(t, load_dataset(inst, reg.tasks.get_dataset_by_id(t.dataset_id))) for t in tasks]
    data = next(d for t, d in datasets if t.id == task.id)
    limit = int(job.params.get("eval_limit", DEFAULT_EVAL_LIMIT))

    base, tokenizer = load_snapshot(inst, snapshot)
    _evaluate_baselines(inst, reporter, base, tokenizer, datasets, snapshot.id, limit)
    reporter.event(
        f"training {task.name} with {method} on snapshot v{snapshot.version} "
        f"({len(history)} earlier adapters, {len(data.train)} examples)",
        metrics={"hyperparams": hyper.to_dict()},
    )
    model = strategy.prepare(base, history=history_dirs, hyper=hyper)
    result = train(
        model,
        tokenizer,
        data.train,
        hyper,
        extra_loss=strategy.extra_loss,
        callbacks=reporter.training_callbacks(span=TRAIN_SPAN),
    )
    with tempfile.TemporaryDirectory(prefix="strata-adapter-") as tmp:
        strategy.save_adapter(model, Path(tmp))
        digest = put_tree(inst.artifacts, Path(tmp))
    version = reg.adapters.create_version(
        task_id=task.id,
        method=method,
        hyperparams=hyper.to_dict(),
        base_snapshot_id=snapshot.id,
        dataset_id=task.dataset_id,
        depends_on=[v.id for v in history],
        job_id=job.id,
    )
    metrics = {"final_loss": result.final_loss, "steps": result.steps, "tokens": result.tokens,
               "train_seconds": round(result.seconds, 3)}  # fmt: skip
    version = reg.adapters.mark_ready(version.id, artifact_digest=digest, metrics=metrics)
    reporter.event(f"published adapter {task.name} v{version.version}", metrics=metrics)
    reporter.progress(TRAIN_SPAN[1])

    fresh, _ = load_snapshot(inst, snapshot)  # the published artifacts, not the training model
    state = strategy.inference_model(fresh, history=[*history_dirs, fetch_tree(inst, digest)])
    scores = evaluate_row(
        inst, reporter, state, tokenizer, datasets, after_position=task.position,
        snapshot_id=snapshot.id, adapter_version_id=version.id, limit=limit,
    )  # fmt: skip
    own = [s for s in scores if s.task.id == task.id]
    if own:
        reg.adapters.update_metrics(version.id, {own[0].metric: own[0].value})


def _evaluate_baselines(
    inst: Instance,
    reporter: JobReporter,
    base: Any,
    tokenizer: Any,
    datasets: list[tuple[Task, Any]],
    snapshot_id: int,
    limit: int,
) -> None:
    """Measure tasks not yet measured on the untrained base (needed for forward transfer)."""
    measured = inst.registry.evaluations.matrix(datasets[0][0].stream_id).baseline
    missing = [pair for pair, b in zip(datasets, measured, strict=True) if b is None]
    if missing:
        evaluate_row(
            inst, reporter, base, tokenizer, missing, after_position=-1,
            snapshot_id=snapshot_id, adapter_version_id=None, limit=limit,
        )  # fmt: skip


HANDLERS: dict[JobKind, Callable[[Instance, Job, JobReporter], None]] = {
    JobKind.TRAIN: _train,
}
