"""`strata bench`: run strategies on one task sequence and report CL metrics side by side.

Nothing here touches the registry: each method learns the sequence in memory
(`continual.stream.learn_stream`), and the reports are written to an output directory.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.config import (
    FOLD_DISTILL_STEPS,
    MAX_FOLD_DISTILL_STEPS,
    LoraHyperparams,
    is_distill_steps,
)
from continual.data import TaskData, load_cl_benchmark
from continual.errors import InvalidHyperparameter
from continual.fold import DISTILL
from continual.metrics import AccuracyMatrix
from continual.strategies import Strategy, get_strategy
from continual.stream import FoldReport, check_metric, evaluate_tasks, learn_stream
from continual.training import TrainingCallbacks
from workers.models import load_source

log = logging.getLogger(__name__)

MULTITASK = "multitask"
COMPOSED = "composed"
COMPOSED_OPTIONS: dict[str, Any] = {
    "routing_weight": 1.0,
    "lambda1": 0.5,
    "lambda1_norm": "mean",
    "initial_share": 0.9,
    "routing_scope": "prompt",
    "warm_start": True,
}
"""The composed settings: am-lora with task routing (each prompt routed as a whole), each new
adapter starting as a copy of the last one and with 0.9 of every token's mixture, and O-LoRA's
overlap term (the per-layer mean) between each new adapter and the earlier ones; with
`--consolidate-after` its adapters fold into the base and the router keeps serving the folded
tasks from it. Share 0.9 with the prompt scope ended with a higher ACC than share 0.5 with the
causal router on both orders and every seed measured, and the warm start as high or higher on
all four runs (BENCHMARKS.md, "am-lora's initial share and routing scope")."""


def bench_strategy(method: str, options: dict[str, Any]) -> Strategy:
    """The strategy a bench method names: a registered one, or `composed` (am-lora with
    `COMPOSED_OPTIONS`, which `options` override)."""
    if method == COMPOSED:
        return get_strategy("am-lora", **{**COMPOSED_OPTIONS, **options})
    return get_strategy(method, **options)


@dataclass(frozen=True)
class BenchConfig:
    data: Path
    order: tuple[str, ...]
    methods: tuple[str, ...]
    model: str = "tiny"  # tiny | smollm2 | a model directory | a .gguf file
    train_per_task: int = 500
    eval_per_task: int = 200
    seed: int = 0
    device: str = "cpu"
    hyperparams: dict[str, Any] = field(default_factory=dict)
    metric: str = "rank"  # rank classification, or "exact" match of greedy generation
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its options
    consolidate_after: int | None = None  # fold every sequential method's state after task K
    max_drop: float = 2.0  # points a fold that is not exact may cost any task
    distill_steps: int = FOLD_DISTILL_STEPS  # the distillation correcting a fold that is not exact


@dataclass(frozen=True)
class MethodResult:
    method: str
    matrix: AccuracyMatrix | None  # None for the multi-task bound (a single row)
    final_row: tuple[float, ...]
    seconds: float
    train_steps: int
    step_seconds: float  # mean wall time of one training step
    folds: tuple[FoldReport, ...] = ()

    @property
    def average_accuracy(self) -> float:
        return sum(self.final_row) / len(self.final_row)


def model_source(spec: str, *, seed: int) -> dict[str, Any]:
    if spec == "tiny":
        return {"kind": "tiny", "seed": seed}
    if spec == "smollm2":
        return {"kind": "smollm2"}
    path = Path(spec)
    return {"kind": "gguf" if path.suffix == ".gguf" else "hf", "path": str(path)}


def load_tasks(cfg: BenchConfig) -> list[TaskData]:
    return [
        load_cl_benchmark(cfg.data, name, train_limit=cfg.train_per_task,
                          test_limit=cfg.eval_per_task, seed=cfg.seed)
        for name in cfg.order
    ]  # fmt: skip


def run_bench(
    cfg: BenchConfig,
    *,
    out_dir: Path,
    on_step: Callable[[str, int, int, float], None] | None = None,
    on_row: Callable[[str, int, tuple[float, ...]], None] | None = None,
    on_scored: Callable[[str, int, int], None] | None = None,
    on_fold: Callable[[str, FoldReport], None] | None = None,
    on_distill_step: Callable[[str, int, int, float], None] | None = None,
    on_result: Callable[[Sequence[MethodResult]], None] | None = None,
) -> list[MethodResult]:
    """Learn the sequence once per method; every method starts from the same base model, whose
    row (the baseline of forward transfer) is measured once for all of them.

    `on_step(method, step, total_steps, loss)` reports every training step (its step count
    starts again at 1 with each task), `on_row(method, t, row)` every measured row (t = -1:
    the untrained base), `on_fold(method, report)` each consolidation (`--consolidate-after`),
    `on_distill_step(method, step, steps, kl)` each step of an am-lora fold's distillation, and
    `on_scored(method, n, row_total)` the evaluation's progress: n more of a row's `row_total`
    test examples done. `on_result(results)` is called with the results so far each time a
    method finishes, so that a long run that is stopped keeps what it measured."""
    hyper = LoraHyperparams.from_dict({"seed": cfg.seed, **cfg.hyperparams})
    check_bench(cfg)  # fail on a typo before the slow part
    tasks = load_tasks(cfg)
    pristine, tokenizer = load_source(model_source(cfg.model, seed=cfg.seed))
    pristine.requires_grad_(False)

    def make_base() -> PreTrainedModel:
        fresh: PreTrainedModel = copy.deepcopy(pristine)
        fresh.to(torch.device(cfg.device))  # type: ignore[arg-type]  # in place; HF typing
        return fresh

    def callbacks_for(method: str) -> TrainingCallbacks | None:
        if on_step is None:
            return None
        return TrainingCallbacks(
            on_step=lambda info: on_step(method, info.step, info.total_steps, info.loss)
        )

    def report(method: str) -> Callable[[int, tuple[float, ...]], None] | None:
        return None if on_row is None else lambda t, row: on_row(method, t, row)

    row_total = sum(len(task.test) for task in tasks)

    def folded(method: str) -> Callable[[FoldReport], None] | None:
        return None if on_fold is None else lambda fold: on_fold(method, fold)

    def distilling(method: str) -> Callable[[int, int, float], None] | None:
        if on_distill_step is None:
            return None
        return lambda step, steps, kl: on_distill_step(method, step, steps, kl)

    def scored(method: str) -> Callable[[int], None] | None:
        return None if on_scored is None else lambda n: on_scored(method, n, row_total)

    baseline = evaluate_tasks(
        make_base(), tokenizer, tasks, max_length=hyper.max_length, metric=cfg.metric,
        on_scored=scored("base"),
    )  # fmt: skip
    if on_row is not None:
        on_row("base", -1, baseline)
    results = []
    for method in cfg.methods:
        work = out_dir / "adapters" / method
        log.info("bench: %s on %s", method, " -> ".join(cfg.order))
        if method == MULTITASK:
            results.append(
                _multitask(
                    cfg, make_base, tokenizer, tasks, hyper, work, callbacks_for, scored(method)
                )
            )
            if on_result is not None:
                on_result(results)
            continue
        res = learn_stream(
            strategy=bench_strategy(method, cfg.options.get(method, {})), make_base=make_base,
            tokenizer=tokenizer, tasks=tasks, hyper=hyper, out_dir=work, baseline=baseline,
            metric=cfg.metric, callbacks=callbacks_for(method), on_row=report(method),
            on_scored=scored(method), consolidate_after=cfg.consolidate_after,
            max_drop=cfg.max_drop,
            distillation=replace(DISTILL, steps=cfg.distill_steps, seed=cfg.seed),
            on_fold=folded(method), on_distill_step=distilling(method),
        )  # fmt: skip
        steps = sum(r.steps for r in res.train_results)
        results.append(
            MethodResult(
                method=method, matrix=res.matrix, final_row=tuple(res.matrix.values[-1]),  # type: ignore[arg-type]
                seconds=res.seconds, train_steps=steps,
                step_seconds=sum(r.seconds for r in res.train_results) / max(steps, 1),
                folds=res.folds,
            )
        )  # fmt: skip
        if on_result is not None:
            on_result(results)
    return results


def check_bench(cfg: BenchConfig) -> None:
    """Refuse unknown methods, metrics, method options and fold settings
    (InvalidHyperparameter)."""
    check_metric(cfg.metric)
    if cfg.consolidate_after is not None and not 1 <= cfg.consolidate_after < len(cfg.order):
        raise InvalidHyperparameter(
            field="consolidate_after",
            reason=f"must be a task number from 1 to {len(cfg.order) - 1} (the fold comes after "
            f"that task and before the next), got {cfg.consolidate_after}",
        )
    if not 0 <= cfg.max_drop <= 100:
        raise InvalidHyperparameter(
            field="max_drop", reason=f"must be in [0, 100], got {cfg.max_drop}"
        )
    if not is_distill_steps(cfg.distill_steps):
        raise InvalidHyperparameter(
            field="distill_steps",
            reason=f"must be a whole number in [0, {MAX_FOLD_DISTILL_STEPS}], "
            f"got {cfg.distill_steps}",
        )
    for method, options in cfg.options.items():
        if method not in cfg.methods:
            raise InvalidHyperparameter(
                field=f"options.{method}", reason=f"{method!r} is not one of the bench methods"
            )
        if method == MULTITASK and options:
            raise InvalidHyperparameter(field=f"options.{method}", reason="multitask has none")
    for method in cfg.methods:
        if method != MULTITASK:
            bench_strategy(method, cfg.options.get(method, {}))


def _multitask(
    cfg: BenchConfig,
    make_base: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    hyper: LoraHyperparams,
    work: Path,
    callbacks_for: Callable[[str], TrainingCallbacks | None],
    on_scored: Callable[[int], None] | None = None,
) -> MethodResult:
    from continual.multitask import learn_multitask

    start = time.perf_counter()
    res = learn_multitask(
        make_base=make_base, tokenizer=tokenizer, tasks=tasks, hyper=hyper, out_dir=work,
        metric=cfg.metric, callbacks=callbacks_for(MULTITASK), on_scored=on_scored,
    )  # fmt: skip
    return MethodResult(
        method=MULTITASK, matrix=None, final_row=tuple(res.accuracies),
        seconds=time.perf_counter() - start, train_steps=res.train_result.steps,
        step_seconds=res.train_result.seconds / max(res.train_result.steps, 1),
    )  # fmt: skip


def write_reports(cfg: BenchConfig, results: Sequence[MethodResult], out_dir: Path) -> None:
    """results.json, results.md and one accuracy-matrix heat map PNG per sequential method."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {**asdict(cfg), "data": str(cfg.data)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "methods": [_result_json(r) for r in results],
    }  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(cfg, results))
    for r in results:
        if r.matrix is not None:
            heat_map(r.matrix, cfg.order, title=r.method, path=out_dir / f"matrix-{r.method}.png")


def _result_json(r: MethodResult) -> dict[str, Any]:
    m = r.matrix
    return {
        "method": r.method,
        "matrix": [list(row) for row in m.values] if m else None,
        "baseline": list(m.baseline) if m and m.baseline else None,
        "final_row": list(r.final_row),
        "average_accuracy": r.average_accuracy,
        "backward_transfer": m.backward_transfer if m else None,
        "forward_transfer": m.forward_transfer if m else None,
        "forgetting": m.forgetting if m else None,
        "folds": [asdict(f) for f in r.folds],
        "seconds": r.seconds,
        "train_steps": r.train_steps,
        "step_seconds": r.step_seconds,
    }


def markdown_table(cfg: BenchConfig, results: Sequence[MethodResult]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:+.1f}" if v < 0 else f"{100 * v:.1f}"

    lines = [
        f"Order: {' -> '.join(cfg.order)}; model {cfg.model}; {cfg.train_per_task} train / "
        f"{cfg.eval_per_task} eval per task; seed {cfg.seed}; device {cfg.device}; "
        f"metric {cfg.metric}.",
        "",
        "| method | AA | BWT | FWT | forgetting | final row | time (s) | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.matrix
        row = " / ".join(f"{100 * v:.1f}" for v in r.final_row)
        lines.append(
            f"| {r.method} | {pct(r.average_accuracy)} | {pct(m.backward_transfer if m else None)} "
            f"| {pct(m.forward_transfer if m else None)} | {pct(m.forgetting if m else None)} "
            f"| {row} | {r.seconds:.0f} | {r.step_seconds:.3f} |"
        )
    for r in results:
        for fold in r.folds:
            state = "published" if fold.published else f"refused (max_drop {cfg.max_drop:g})"
            lines += ["", f"{r.method}: fold after {cfg.order[fold.after_task]}, {state}",
                      "", "```", fold.table, "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def heat_map(matrix: AccuracyMatrix, names: Sequence[str], *, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    values = [[float("nan") if v is None else v for v in row] for row in matrix.values]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    for t, row in enumerate(values):
        for i, v in enumerate(row):
            ax.text(i, t, f"{100 * v:.0f}", ha="center", va="center",
                    color="white" if v < 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(names)), labels=list(names))
    ax.set_yticks(range(len(names)), labels=[f"after {n}" for n in names])
    ax.set_xlabel("evaluated task")
    ax.set_title(f"{title}: accuracy (%)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
