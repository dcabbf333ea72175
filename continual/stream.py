"""Learn a stream of tasks with one strategy and measure every task after each (no storage).

This is the in-memory counterpart of the workers' job orchestration: benchmarks and tests use
it to produce an accuracy matrix end to end, through the saved adapter files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.config import LoraHyperparams
from continual.data import TaskData
from continual.errors import InvalidHyperparameter
from continual.evaluation import exact_match, rank_classification
from continual.metrics import AccuracyMatrix
from continual.strategies import Strategy
from continual.training import TrainingCallbacks, TrainResult, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamResult:
    matrix: AccuracyMatrix
    adapters: tuple[Path, ...]  # one adapter directory per task, in order
    train_results: tuple[TrainResult, ...]
    seconds: float


METRICS = ("rank", "exact")  # rank classification over the labels; exact match of generation


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InvalidHyperparameter(field="metric", reason=f"must be one of {list(METRICS)}")


def evaluate_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskData,
    *,
    max_length: int,
    metric: str = "rank",
    on_scored: Callable[[int], None] | None = None,
) -> float:
    """Test accuracy. `rank`: rank classification when the task has labels (exact match for
    free-form tasks); `exact`: exact match of the greedy generation for every task.
    `on_scored(n)`: progress, n more test examples done."""
    check_metric(metric)
    if metric == "rank" and task.labels is not None:
        return rank_classification(
            model, tokenizer, task.test, task.labels, max_length=max_length, on_scored=on_scored,
            fmt=task.prompt_format,
        ).accuracy  # fmt: skip
    return exact_match(model, tokenizer, task.test, on_scored=on_scored).accuracy


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    *,
    max_length: int,
    metric: str = "rank",
    on_scored: Callable[[int], None] | None = None,
) -> tuple[float, ...]:
    """`evaluate_task` for every task, in order: one row of the accuracy matrix."""
    return tuple(
        evaluate_task(
            model, tokenizer, task, max_length=max_length, metric=metric, on_scored=on_scored
        )
        for task in tasks
    )


def learn_stream(
    *,
    strategy: Strategy,
    make_base: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    hyper: LoraHyperparams,
    out_dir: Path,
    measure_baseline: bool = True,
    baseline: Sequence[float] | None = None,
    metric: str = "rank",
    callbacks: TrainingCallbacks | None = None,
    on_row: Callable[[int, tuple[float, ...]], None] | None = None,
    on_scored: Callable[[int], None] | None = None,
) -> StreamResult:
    """Train `tasks` in order; after each, rebuild the stream's model from the saved adapters
    and evaluate every task. `make_base` must return a fresh base each call (PEFT edits the
    base in place). `baseline`: the untrained base's row when already measured (several
    strategies on one base share it); otherwise it is measured when `measure_baseline`.
    `on_row(t, row)` reports each row of the matrix as soon as it is measured, `on_scored(n)`
    the progress of an evaluation (n more test examples done)."""
    check_metric(metric)
    start = time.perf_counter()

    def evaluate_all(model: nn.Module) -> tuple[float, ...]:
        return evaluate_tasks(
            model, tokenizer, tasks, max_length=hyper.max_length, metric=metric,
            on_scored=on_scored,
        )  # fmt: skip

    if baseline is not None and len(baseline) != len(tasks):
        raise ValueError(f"baseline has {len(baseline)} values for {len(tasks)} tasks")
    if baseline is None and measure_baseline:
        baseline = evaluate_all(make_base())
    history: list[Path] = []
    rows: list[tuple[float, ...]] = []
    results: list[TrainResult] = []
    for index, task in enumerate(tasks):
        model = strategy.prepare(make_base(), history=history, hyper=hyper)
        results.append(
            train(
                model,
                tokenizer,
                task.train,
                hyper,
                extra_loss=lambda _: strategy.extra_loss(model),  # noqa: B023 (same iteration)
                callbacks=callbacks,
            )
        )
        adapter_dir = Path(out_dir) / f"{index:02d}-{task.name}"
        strategy.save_adapter(model, adapter_dir)
        history.append(adapter_dir)
        rows.append(evaluate_all(strategy.inference_model(make_base(), history=history)))
        logger.info("after %s: %s", task.name, ", ".join(f"{a:.3f}" for a in rows[-1]))
        if on_row is not None:
            on_row(index, rows[-1])
    return StreamResult(
        matrix=AccuracyMatrix(
            values=tuple(rows), baseline=None if baseline is None else tuple(baseline)
        ),
        adapters=tuple(history),
        train_results=tuple(results),
        seconds=time.perf_counter() - start,
    )
