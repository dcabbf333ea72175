"""Evaluate a stream's model on every task of the stream: one row of the accuracy matrix."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from continual.data import TaskData
from continual.evaluation import language_model_loss, rank_classification
from registry.entities import Task
from registry.instance import Instance
from workers.reporting import JobReporter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskScore:
    task: Task
    metric: str  # "accuracy" for classification, "loss" for free-form tasks
    value: float
    num_examples: int


def score_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData,
    *,
    limit: int,
    batch_size: int,
    max_length: int | None = None,
) -> tuple[str, float, int]:
    """`max_length`: cut prompts as training cut them (`LoraHyperparams.max_length`)."""
    examples = data.test[:limit]
    if data.labels:
        res = rank_classification(model, tokenizer, examples, data.labels, batch_size=batch_size,
                                  max_length=max_length, fmt=data.prompt_format)  # fmt: skip
        return "accuracy", res.accuracy, res.n
    loss = language_model_loss(model, tokenizer, examples, batch_size=batch_size,
                               max_length=max_length)  # fmt: skip
    return "loss", loss.loss, loss.n


def evaluate_row(
    inst: Instance,
    reporter: JobReporter,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[tuple[Task, TaskData]],
    *,
    after_position: int,
    snapshot_id: int,
    adapter_version_id: int | None,
    limit: int,
    adapter_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[TaskScore]:
    """Score `model` on each task's test split and record the cells of the state it is:
    `snapshot_id` and `adapter_ids` (by default `adapter_version_id` and what it depends on),
    which has learned the task at `after_position`."""
    scores = score_row(
        model, tokenizer, tasks, limit=limit, batch_size=batch_size, max_length=max_length
    )
    record_row(inst, reporter, scores, after_position=after_position, snapshot_id=snapshot_id,
               adapter_version_id=adapter_version_id, adapter_ids=adapter_ids)  # fmt: skip
    return scores


def score_row(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[tuple[Task, TaskData]],
    *,
    limit: int,
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[TaskScore]:
    """Score `model` on each task's test split (tasks without one are left out); records
    nothing."""
    scores = []
    for task, data in tasks:
        if not data.test:
            continue
        metric, value, n = score_task(
            model, tokenizer, data, limit=limit, batch_size=batch_size, max_length=max_length
        )
        scores.append(TaskScore(task=task, metric=metric, value=value, num_examples=n))
    return scores


def record_row(
    inst: Instance,
    reporter: JobReporter,
    scores: Sequence[TaskScore],
    *,
    after_position: int,
    snapshot_id: int,
    adapter_version_id: int | None,
    adapter_ids: Sequence[int] | None = None,
) -> None:
    """Record scores measured on one state (see `evaluate_row`)."""
    for score in scores:
        task = score.task
        inst.registry.evaluations.record(
            stream_id=task.stream_id,
            after_position=after_position,
            task_id=task.id,
            snapshot_id=snapshot_id,
            adapter_version_id=adapter_version_id,
            adapter_ids=adapter_ids,
            job_id=reporter.job_id,
            metric=score.metric,
            value=score.value,
            num_examples=score.num_examples,
        )
        where = "base" if after_position < 0 else f"after task {after_position + 1}"  # 1-based
        reporter.event(
            f"evaluated {task.name} ({where}): {score.metric}={score.value:.4f}",
            metrics={score.metric: score.value},
        )
