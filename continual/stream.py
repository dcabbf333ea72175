"""Learn a stream of tasks with one strategy and measure every task after each (no storage).

This is the in-memory counterpart of the workers' job orchestration: benchmarks and tests use
it to produce an accuracy matrix end to end, through the saved adapter files.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.config import LoraHyperparams
from continual.consolidation import MEMORY_DIR
from continual.data import TaskData
from continual.errors import ConsolidationRegressed, InvalidHyperparameter
from continual.evaluation import exact_match, rank_classification
from continual.fold import (
    TaskCheck,
    check_drops,
    drop_table,
    fold_probes,
    fold_state,
    fold_tolerance,
    probe_count,
)
from continual.fold_distill import DistillSettings
from continual.metrics import AccuracyMatrix
from continual.strategies import Strategy
from continual.training import TrainingCallbacks, TrainResult, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldReport:
    """A consolidation inside `learn_stream`: every task before and after the fold."""

    after_task: int  # index of the last task folded
    routed: tuple[float, ...]  # the state before the fold (row `after_task` of the matrix)
    folded: tuple[float, ...]  # the folded model alone
    mean_gates: tuple[float, ...] | None  # am-lora: each folded adapter's mean gate
    max_logit_diff: float | None  # exact folds
    published: bool  # False: the fold lost more than max_drop points; the stream kept its state
    table: str
    distill_losses: tuple[float, ...] = ()  # am-lora: the distillation's KL per step


@dataclass(frozen=True)
class StreamResult:
    matrix: AccuracyMatrix
    adapters: tuple[Path, ...]  # one adapter directory per task, in order
    train_results: tuple[TrainResult, ...]
    seconds: float
    folds: tuple[FoldReport, ...] = ()


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
    consolidate_after: int | None = None,
    max_drop: float = 2.0,
    on_fold: Callable[[FoldReport], None] | None = None,
    distillation: DistillSettings | None = None,
    on_distill_step: Callable[[int, int, float], None] | None = None,
) -> StreamResult:
    """Train `tasks` in order; after each, rebuild the stream's model from the saved adapters
    and evaluate every task. `make_base` must return a fresh base each call (PEFT edits the
    base in place). `baseline`: the untrained base's row when already measured (several
    strategies on one base share it); otherwise it is measured when `measure_baseline`.
    `on_row(t, row)` reports each row of the matrix as soon as it is measured, `on_scored(n)`
    the progress of an evaluation (n more test examples done).

    `consolidate_after` K: after the K-th task, fold the stream's state into its base as a
    consolidation job does (`continual.fold`; exact folds are checked against the adapted
    model, am-lora's against `max_drop`, after `distillation`, default `continual.fold.DISTILL`,
    whose steps `on_distill_step(step, steps, kl)` reports) and learn the later tasks on the
    folded base."""
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
    folds: list[FoldReport] = []
    since = 0  # index of the first task whose adapter sits on the current base
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
        if consolidate_after is not None and index + 1 == consolidate_after:
            report, folded, memory = _consolidate(
                strategy, make_base(), tokenizer, tasks[since : index + 1], history, hyper,
                routed=rows[-1], evaluate_all=evaluate_all, max_drop=max_drop, after_task=index,
                out_dir=Path(out_dir) / f"fold-after-{index:02d}", distillation=distillation,
                on_distill_step=on_distill_step,
            )  # fmt: skip
            folds.append(report)
            if on_fold is not None:
                on_fold(report)
            if folded is not None:
                make_base = _copies(folded)
                history, since = memory, index + 1
    return StreamResult(
        matrix=AccuracyMatrix(
            values=tuple(rows), baseline=None if baseline is None else tuple(baseline)
        ),
        adapters=tuple(history),
        train_results=tuple(results),
        seconds=time.perf_counter() - start,
        folds=tuple(folds),
    )


def _consolidate(
    strategy: Strategy,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    history: list[Path],
    hyper: LoraHyperparams,
    *,
    routed: tuple[float, ...],
    evaluate_all: Callable[[nn.Module], tuple[float, ...]],
    max_drop: float,
    after_task: int,
    out_dir: Path,
    distillation: DistillSettings | None,
    on_distill_step: Callable[[int, int, float], None] | None = None,
) -> tuple[FoldReport, PreTrainedModel | None, list[Path]]:
    """Fold the state `history` builds on `base`; (the report, the folded model and the new
    history, its memory) when the fold passes its check, else (the report, None, [])."""
    state = strategy.inference_model(base, history=history)
    probes, prompts = fold_probes(tokenizer, tasks, max_length=hyper.max_length,
                                  count=probe_count(strategy.name, distillation))  # fmt: skip
    fold = fold_state(state, method=strategy.name, history=history, probes=probes,
                      distillation=distillation, prompts=prompts,
                      on_distill_step=on_distill_step)  # fmt: skip
    if fold.exact and not (fold.max_logit_diff or 0.0) <= fold_tolerance(fold.model):
        raise ValueError(f"the fold changed the logits by {fold.max_logit_diff:.3g}")
    folded = evaluate_all(fold.model)
    checks = [TaskCheck(task=f"task {i + 1}", before=b, after=a, learned=i <= after_task)
              for i, (b, a) in enumerate(zip(routed, folded, strict=True))]  # fmt: skip
    table, published = drop_table(checks), True
    try:
        check_drops(checks, max_drop=max_drop)
    except ConsolidationRegressed:
        published = False
    logger.info("fold after task %d (%s):\n%s", after_task + 1,
                "published" if published else "refused", table)  # fmt: skip
    report = FoldReport(after_task=after_task, routed=routed, folded=folded,
                        mean_gates=fold.mean_gates, max_logit_diff=fold.max_logit_diff,
                        published=published, table=table,
                        distill_losses=fold.distill_losses)  # fmt: skip
    if not published:
        return report, None, []
    memory = [out_dir / MEMORY_DIR] if fold.write_memory(out_dir) else []
    return report, fold.model, memory


def _copies(model: PreTrainedModel) -> Callable[[], PreTrainedModel]:
    """A fresh copy of `model` per call (strategies edit the base they are given)."""
    model.requires_grad_(False)
    return lambda: copy.deepcopy(model)
