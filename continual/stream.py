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


def evaluate_task(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: TaskData, *, max_length: int
) -> float:
    """Test accuracy: rank classification when the task has labels, else exact match."""
    if task.labels is not None:
        return rank_classification(
            model, tokenizer, task.test, task.labels, max_length=max_length
        ).accuracy
    return exact_match(model, tokenizer, task.test).accuracy


def learn_stream(
    *,
    strategy: Strategy,
    make_base: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    hyper: LoraHyperparams,
    out_dir: Path,
    measure_baseline: bool = True,
    callbacks: TrainingCallbacks | None = None,
) -> StreamResult:
    """Train `tasks` in order; after each, rebuild the stream's model from the saved adapters
    and evaluate every task. `make_base` must return a fresh base each call (PEFT edits the
    base in place)."""
    start = time.perf_counter()

    def evaluate_all(model: nn.Module) -> tuple[float, ...]:
        return tuple(
            evaluate_task(model, tokenizer, task, max_length=hyper.max_length) for task in tasks
        )

    baseline = evaluate_all(make_base()) if measure_baseline else None
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
    return StreamResult(
        matrix=AccuracyMatrix(values=tuple(rows), baseline=baseline),
        adapters=tuple(history),
        train_results=tuple(results),
        seconds=time.perf_counter() - start,
    )
