"""What am-lora's fold costs, with and without O-LoRA's overlap term: routed against folded
accuracy per task, on the generated tasks and the tiny random-init Llama (minutes on a CPU).

For each seed and each `lambda1`, am-lora with task routing learns the three generated tasks
(sentiment, topic, color) in order and folds its state into the base after task 2
(`continual.stream.learn_stream(consolidate_after=2)`, the fold consolidation jobs run), then
learns task 3 on the folded base. Printed per run: the routed row before the fold, the folded
row, the largest drop, each adapter's mean gate, and the final row. `--distill-steps 0,64` runs
each twice: the fitted fold alone, and corrected by 64 steps of distillation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/composed_fold.py --seeds 0,1,2 \
        --lambda1 0,0.5,2
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from continual import fold
from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.fold_distill import DistillSettings
from continual.strategies import get_strategy
from continual.stream import learn_stream
from workers.models import load_source


def run(
    *,
    seed: int,
    lambda1: float,
    train_size: int,
    test_size: int,
    distill_steps: int,
    answer_share: float | None = None,
) -> dict[str, object]:
    tasks = synthetic_tasks(seed=seed, train_size=train_size, test_size=test_size)
    pristine, tokenizer = load_source({"kind": "tiny", "seed": seed})
    pristine.requires_grad_(False)
    strategy = get_strategy("am-lora", lambda1=lambda1, lambda1_norm="mean")
    with tempfile.TemporaryDirectory() as tmp:
        res = learn_stream(
            strategy=strategy, make_base=lambda: copy.deepcopy(pristine), tokenizer=tokenizer,
            tasks=tasks, hyper=LoraHyperparams(seed=seed), out_dir=Path(tmp),
            measure_baseline=False, consolidate_after=2, max_drop=100.0,
            distillation=DistillSettings(steps=distill_steps, seed=seed, answer_share=answer_share),
        )  # fmt: skip
    (report,) = res.folds
    drops = [100 * (r - f) for r, f in zip(report.routed[:2], report.folded[:2], strict=True)]
    return {
        "seed": seed,
        "lambda1": lambda1,
        "fold": "by-block" if fold.FOLD_BY_BLOCK else "joint",
        "ridge": fold.RIDGE,
        "distill_steps": distill_steps,
        "answer_share": answer_share,
        "routed": [round(100 * v, 1) for v in report.routed],
        "folded": [round(100 * v, 1) for v in report.folded],
        "max_drop_points": round(max(drops), 1),
        "mean_gates": [round(g, 3) for g in report.mean_gates or ()],
        "final": [round(100 * v, 1) for v in res.matrix.values[-1]],
        "final_acc": round(100 * sum(res.matrix.values[-1]) / len(tasks), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lambda1", default="0,0.5")
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument(
        "--fold", default="joint", choices=["joint", "by-block"],
        help="fit each decoder block on the partly folded model's inputs, or all layers at once",
    )  # fmt: skip
    parser.add_argument(
        "--ridge", type=float, default=fold.RIDGE,
        help="the least-squares fit's pull towards the mean-gate fold (1e9: the mean-gate fold)",
    )  # fmt: skip
    parser.add_argument(
        "--distill-steps", default=str(fold.DISTILL.steps),
        help="comma-separated: one run per value (0: the fitted fold alone)",
    )  # fmt: skip
    parser.add_argument(
        "--answer-share", default="none",
        help="comma-separated: the distillation's share of the loss on the completions "
        "(none: every position alike)",
    )  # fmt: skip
    args = parser.parse_args()
    shares = [None if v == "none" else float(v) for v in args.answer_share.split(",")]
    fold.FOLD_BY_BLOCK = args.fold == "by-block"
    fold.RIDGE = args.ridge
    for seed in (int(s) for s in args.seeds.split(",")):
        for lambda1 in (float(v) for v in args.lambda1.split(",")):
            for steps in (int(v) for v in args.distill_steps.split(",")):
                for share in shares:
                    result = run(seed=seed, lambda1=lambda1, train_size=args.train_size,
                                 test_size=args.test_size, distill_steps=steps,
                                 answer_share=share)  # fmt: skip
                    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
