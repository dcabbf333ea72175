"""The multitask upper bound: one fresh LoRA adapter trained on the union of a stream's tasks.

Continual methods are compared against it: it sees every task's data at once, so it cannot
forget. It reports one row of test accuracies (one per task, in stream order), directly
comparable with the last row of the stream's accuracy matrix.

Budget: the union gets the training a stream gives its tasks in total. Without `max_steps`,
`epochs` passes over the union, so every example is seen `epochs` times as in the stream;
that is epochs * ceil(sum n_i / batch_size) steps, equal to the stream's
sum_i epochs * ceil(n_i / batch_size) when every n_i is a multiple of the batch size (up to
`epochs` fewer steps per task otherwise). With `max_steps` (a per-task budget), the union runs
len(tasks) * max_steps steps. One warmup + cosine schedule spans the whole run, and `train`
shuffles the union afresh every epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.config import LoraHyperparams
from continual.data import Example, TaskData
from continual.errors import InvalidDataset
from continual.strategies.seq_lora import SeqLora
from continual.stream import check_metric, evaluate_tasks
from continual.training import TrainingCallbacks, TrainResult, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultitaskResult:
    task_names: tuple[str, ...]
    accuracies: tuple[float, ...]  # test accuracy per task, in stream order
    baseline: tuple[float, ...] | None  # the untrained base, when measured
    adapter: Path  # the one adapter, PEFT layout
    train_result: TrainResult
    seconds: float

    @property
    def average_accuracy(self) -> float:
        """Mean accuracy over the tasks: the upper bound for a stream's ACC."""
        return sum(self.accuracies) / len(self.accuracies)

    def format_row(self, *, label: str = "multitask", digits: int = 3) -> str:
        """One line in the layout of `AccuracyMatrix.format_table` (same column widths), then
        the mean: it can be printed under a stream's table."""
        width = max(digits + 2, *(len(name) for name in self.task_names))
        head = max(len("after ") + max(len(name) for name in self.task_names), len("baseline"))
        cells = " ".join(f"{value:.{digits}f}".rjust(width) for value in self.accuracies)
        return f"{label.ljust(head)} | {cells}  ACC {self.average_accuracy:.{digits}f}"


def multitask_hyperparams(hyper: LoraHyperparams, *, num_tasks: int) -> LoraHyperparams:
    """The per-task `hyper` turned into the union's budget (see the module docstring)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if hyper.max_steps is None:
        return hyper
    return dataclasses.replace(hyper, max_steps=hyper.max_steps * num_tasks)


def learn_multitask(
    *,
    make_base: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    hyper: LoraHyperparams,
    out_dir: Path,
    measure_baseline: bool = False,
    metric: str = "rank",
    callbacks: TrainingCallbacks | None = None,
    on_scored: Callable[[int], None] | None = None,
) -> MultitaskResult:
    """Train one fresh adapter on every task's training examples, save it at `out_dir`, rebuild
    the model from the saved files and evaluate every task. `make_base` returns a fresh base."""
    if not tasks:
        raise InvalidDataset(field="tasks", reason="multitask training needs at least one task")
    check_metric(metric)
    start = time.perf_counter()
    names = tuple(task.name for task in tasks)
    baseline = (
        _evaluate(make_base(), tokenizer, tasks, hyper, metric, on_scored)
        if measure_baseline
        else None
    )
    union: list[Example] = [example for task in tasks for example in task.train]
    union_hyper = multitask_hyperparams(hyper, num_tasks=len(tasks))
    strategy = SeqLora()  # a single fresh adapter: exactly seq-lora's first task
    model = strategy.prepare(make_base(), history=[], hyper=union_hyper)
    result = train(model, tokenizer, union, union_hyper, callbacks=callbacks)
    adapter = Path(out_dir)
    strategy.save_adapter(model, adapter)
    accuracies = _evaluate(
        strategy.inference_model(make_base(), history=[adapter]),
        tokenizer,
        tasks,
        hyper,
        metric,
        on_scored,
    )
    logger.info(
        "multitask over %s: %s", ", ".join(names), ", ".join(f"{a:.3f}" for a in accuracies)
    )
    return MultitaskResult(
        task_names=names,
        accuracies=accuracies,
        baseline=baseline,
        adapter=adapter,
        train_result=result,
        seconds=time.perf_counter() - start,
    )


def _evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    hyper: LoraHyperparams,
    metric: str,
    on_scored: Callable[[int], None] | None = None,
) -> tuple[float, ...]:
    return evaluate_tasks(
        model, tokenizer, tasks, max_length=hyper.max_length, metric=metric, on_scored=on_scored
    )
