"""Fold one trained am-lora / composed state several ways and measure each fold per task.

A `strata bench` run keeps its adapters (`OUT/adapters/METHOD/NN-task`). This script rebuilds
the state its first adapters make, one per `--order` task (with the run's method options),
measures every folded task on it (routed), then folds it once per variant
(`continual.fold.fold_state`, as a consolidation job does) and measures the folded model alone:
one line of JSON per variant with the per-task drop. Variants differ in the distillation that
corrects the fitted fold (`continual.fold_distill`): `--distill-steps 0,48` folds twice, fitted
only and corrected by 48 steps; `--distill-rank` and `--answer-share` (the share of the loss on
the completions) take lists too, and every combination is folded.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fold_variants.py \
        --adapters bench-results/o2-2tasks-share9-prompt-s1/adapters/composed \
        --data /work/bench-data/order2 --order agnews,yelp --model smollm2 --seed 1 \
        --option initial_share=0.9 --option routing_scope=prompt --distill-steps 0,48

The test examples are drawn as `strata bench` draws them (same `--seed`, `--train-per-task` and
`--eval-per-task`), so the routed row repeats the bench run's row.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

from api.pairs import parse_pairs
from continual import fold
from continual.config import LoraHyperparams
from continual.fold_distill import DistillSettings
from continual.stream import evaluate_tasks
from workers.bench import BenchConfig, bench_strategy, load_tasks, model_source
from workers.models import load_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, required=True, help="OUT/adapters/METHOD")
    parser.add_argument("--method", default="composed")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--order", required=True, help="the folded tasks, in the run's order")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-task", type=int, default=500)
    parser.add_argument("--eval-per-task", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--probes", type=int, default=fold.SEQUENCES_PER_TASK,
        help="sequences of each task the fold is distilled on (fitted on the first "
        f"{fold.PROBES_PER_TASK})",
    )  # fmt: skip
    parser.add_argument("--distill-steps", default="0")
    parser.add_argument("--distill-rank", default="8", help="ranks, comma-separated")
    parser.add_argument(
        "--answer-share", default="none",
        help="shares of the loss on the completions, comma-separated (none: positions alike)",
    )  # fmt: skip
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--distill-batch", type=int, default=8)
    parser.add_argument("--routed", help="the routed row (points, comma-separated) when known")
    args = parser.parse_args()
    order = tuple(args.order.split(","))
    cfg = BenchConfig(data=args.data, order=order, methods=(args.method,), model=args.model,
                      train_per_task=args.train_per_task, eval_per_task=args.eval_per_task,
                      seed=args.seed)  # fmt: skip
    options = parse_pairs(args.option, flag="--option")
    strategy = bench_strategy(args.method, options)
    history = sorted(p for p in args.adapters.iterdir() if p.is_dir())[: len(order)]
    if [p.name.split("-", 1)[1] for p in history] != list(order):
        raise SystemExit(f"{args.adapters} holds {[p.name for p in history]}, not {order}")
    tasks = load_tasks(cfg)
    pristine, tokenizer = load_source(model_source(args.model, seed=args.seed))
    pristine.requires_grad_(False)
    hyper = LoraHyperparams(max_length=args.max_length)

    def measure(model: object) -> list[float]:
        row = evaluate_tasks(model, tokenizer, tasks, max_length=hyper.max_length)  # type: ignore[arg-type]
        return [round(100 * v, 1) for v in row]

    if args.routed:
        routed = [float(v) for v in args.routed.split(",")]
    else:
        routed = measure(strategy.inference_model(copy.deepcopy(pristine), history=history))
    print(json.dumps({"routed": routed, "order": order, "options": options}), flush=True)
    probes, prompts = fold.fold_probes(tokenizer, tasks, max_length=hyper.max_length,
                                       count=args.probes)  # fmt: skip
    shares = [None if v == "none" else float(v) for v in args.answer_share.split(",")]
    ranks = [int(v) for v in args.distill_rank.split(",")]
    steps_list = [int(v) for v in args.distill_steps.split(",")]
    for steps, rank, share in itertools.product(steps_list, ranks, shares):
        settings = DistillSettings(steps=steps, rank=rank, learning_rate=args.distill_lr,
                                   batch=args.distill_batch, seed=args.seed,
                                   answer_share=share)  # fmt: skip
        state = strategy.inference_model(copy.deepcopy(pristine), history=history)
        start = time.perf_counter()
        done = fold.fold_state(state, method="am-lora", history=history, probes=probes,
                               distillation=settings, prompts=prompts)  # fmt: skip
        seconds = time.perf_counter() - start
        folded = measure(done.model)
        losses = done.distill_losses
        print(json.dumps({
            "probes": args.probes, "distill_steps": steps, "rank": rank, "answer_share": share,
            "lr": args.distill_lr, "fold_seconds": round(seconds, 1), "folded": folded,
            "drops": [round(r - f, 1) for r, f in zip(routed, folded, strict=True)],
            "kl_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
