"""Does a rank-r adapter trained in ReLoRA cycles beat a plain rank-r adapter at equal steps, and
how close does it come to a plain adapter of rank 4r? On one long task.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/relora_rank.py --model smollm2 \
        --data ../shared/data/cl_benchmark --task agnews --train 2000 --epochs 3 --eval 500 \
        --rank 8 --cycles 6 --threads 2

1. --train examples of --task (CL_Benchmark format, `continual.data.load_cl_benchmark`) and
   --eval test examples, each a seeded random subset.
2. Three fresh LoRA adapters on all seven projections of --model (tiny or smollm2), each trained
   with `continual.training.train` for the same steps (--epochs passes, --batch-size), the same
   peak learning rate, schedule, seed and scaling alpha / rank = 2:
   - `r`: plain rank --rank;
   - `r+relora`: rank --rank with `relora_every` = steps / --cycles (rounded up), so --cycles - 1
     resets; the saved adapter has rank --rank x --cycles;
   - `--wide x r`: plain rank --wide x --rank (default 4r).
3. For each: the test accuracy by rank classification over the task's labels (the untrained base
   too), the mean training loss of the first and the last epoch and of the last 5 steps, the
   adapter's final rank and the training time.

Not a test: it prints a table (and writes it as JSON with --out). A small run that only proves
the script works: `--model tiny --train 64 --epochs 2 --eval 16 --rank 2 --cycles 3`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import start
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.config import LoraHyperparams
from continual.data import TaskData, load_cl_benchmark
from continual.evaluation import rank_classification
from continual.strategies import get_strategy
from continual.training import total_steps, train
from workers.models import load_source

logger = logging.getLogger("relora_rank")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"
RUNS = ("plain", "relora", "wide")  # --runs: r, r in cycles, wide x r; in that order


@dataclass(frozen=True)
class Row:
    run: str
    rank: int  # of the saved adapter
    resets: int
    accuracy: float
    first_epoch_loss: float
    last_epoch_loss: float
    final_loss: float  # mean of the last 5 steps
    seconds: float


def evaluate(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, task: TaskData, *, max_length: int
) -> float:
    """Test accuracy by rank classification, prompts cut as training cut them."""
    assert task.labels is not None
    return rank_classification(
        model, tok, task.test, task.labels, max_length=max_length, fmt=task.prompt_format,
        batch_size=32,
    ).accuracy  # fmt: skip


def run_one(
    name: str,
    *,
    base: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    task: TaskData,
    hyper: LoraHyperparams,
    device: str,
) -> Row:
    """Train a fresh seq-lora adapter on a copy of `base` and measure it."""
    model = get_strategy("seq-lora").prepare(
        copy.deepcopy(base).to(device), history=[], hyper=hyper
    )
    result = train(model, tok, task.train, hyper)
    per_epoch = math.ceil(len(task.train) / hyper.batch_size)
    config = model.peft_config["default"]
    row = Row(
        run=name,
        rank=int(config.r),
        resets=result.relora_resets,
        accuracy=evaluate(model, tok, task, max_length=hyper.max_length),
        first_epoch_loss=sum(result.losses[:per_epoch]) / per_epoch,
        last_epoch_loss=sum(result.losses[-per_epoch:]) / per_epoch,
        final_loss=result.final_loss,
        seconds=result.seconds,
    )
    logger.info("%s", row)
    return row


def main() -> None:
    args = parse_args()
    began = start(args.threads, quiet=("httpx", "continual.relora"))
    base, tok = load_source({"kind": args.model})
    task = load_cl_benchmark(
        args.data, args.task, train_limit=args.train, test_limit=args.eval, seed=args.seed
    )
    common = dict(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        max_length=args.max_length, seed=args.seed, precision=args.precision,
    )  # fmt: skip
    steps = total_steps(num_examples=len(task.train), hyper=LoraHyperparams(**common))
    every = math.ceil(steps / args.cycles)
    runs = {
        f"r={args.rank}": LoraHyperparams(rank=args.rank, alpha=2.0 * args.rank, **common),
        f"r={args.rank}+relora": LoraHyperparams(
            rank=args.rank,
            alpha=2.0 * args.rank,
            relora_every=every,
            relora_warmup=args.warmup,
            relora_prune=args.prune,
            **common,
        ),
        f"r={args.wide * args.rank}": LoraHyperparams(
            rank=args.wide * args.rank, alpha=2.0 * args.wide * args.rank, **common
        ),
    }
    if args.runs is not None:  # e.g. only the wide baseline: --runs wide
        chosen = zip(RUNS, runs.items(), strict=True)
        runs = {name: hyper for key, (name, hyper) in chosen if key in args.runs}
    logger.info("%d examples, %d steps; relora_every=%d", len(task.train), steps, every)
    untrained = evaluate(copy.deepcopy(base).to(args.device), tok, task, max_length=args.max_length)
    rows = []
    for name, hyper in runs.items():  # each run's row as soon as it is measured
        rows.append(run_one(name, base=base, tok=tok, task=task, hyper=hyper, device=args.device))
        logger.info("%s", rows[-1])
        if args.out is not None:
            args.out.write_text(json.dumps({"partial": [asdict(r) for r in rows]}, indent=1))
    print(f"\n{args.model}, {args.task}: {len(task.train)} train / {len(task.test)} test "
          f"examples, {steps} steps, untrained accuracy {untrained:.3f}\n")  # fmt: skip
    print(
        "| run | adapter rank | resets | test acc | loss 1st epoch | loss last epoch "
        "| loss last 5 steps | train s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.run} | {r.rank} | {r.resets} | {r.accuracy:.3f} | {r.first_epoch_loss:.4f} "
              f"| {r.last_epoch_loss:.4f} | {r.final_loss:.4f} | {r.seconds:.0f} |")  # fmt: skip
    if args.out is not None:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": steps,
                  "relora_every": every, "untrained_accuracy": untrained,
                  "runs": [asdict(r) for r in rows]}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("in all %.0fs", time.perf_counter() - began)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--data", type=Path, default=DATA, help="a CL_Benchmark-format folder")
    p.add_argument("--task", default="agnews")
    p.add_argument("--train", type=int, default=2000, help="training examples")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval", type=int, default=500, help="test examples")
    p.add_argument("--rank", type=int, default=8, help="r")
    p.add_argument("--wide", type=int, default=4, help="the wide baseline's rank, in r")
    p.add_argument("--cycles", type=int, default=6, help="ReLoRA cycles (resets + 1)")
    p.add_argument("--warmup", type=int, default=None, help="relora_warmup (default: a tenth)")
    p.add_argument("--prune", type=float, default=0.99, help="relora_prune")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument(
        "--runs", type=lambda v: v.split(","), default=None,
        help=f"a comma-separated subset of {','.join(RUNS)} (default: all three)",
    )  # fmt: skip
    args = p.parse_args()
    if args.runs is not None and not set(args.runs) <= set(RUNS):
        p.error(f"--runs takes {', '.join(RUNS)}")
    if args.cycles < 2:
        p.error("--cycles must be >= 2 (at least one reset)")
    return args


if __name__ == "__main__":
    main()
