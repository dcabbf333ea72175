"""Training step time of the CL strategies side by side, against the number of earlier adapters.

    .venv/bin/python benchmarks/strategy_overhead.py                   # tiny random Llama
    .venv/bin/python benchmarks/strategy_overhead.py --hidden 576 --layers 8 --intermediate 1536
    .venv/bin/python benchmarks/strategy_overhead.py --model smollm2   # SmolLM2-135M (GGUF)
    .venv/bin/python benchmarks/strategy_overhead.py --model smollm2 \
        --cl-data ../shared/data/cl_benchmark --adapters 1,8 --batch-size 8  # real lengths

On a shared CPU pass --threads 1: oversubscribed threads make CPU step times erratic.

For every strategy registered in `continual.strategies.STRATEGIES` (seq-lora, am-lora and, when
present, inc-lora / o-lora) and every N in --adapters, the script writes N fake earlier adapters
through the strategy's own prepare/save_adapter (zero-initialised trainable tensors such as
LoRA B are filled with random values so no branch is trivially zero), prepares the next task and
times --steps optimiser steps of `continual.training.train` after --warmup-steps untimed ones.
seq-lora continues one adapter whatever N is (it is timed with one). Each measurement is the
median step time of one run, the best of --repeats rounds in which the strategies alternate.
Ratios are against inc-lora at the same N (seq-lora when inc-lora is not registered). Not a
test: it only prints a table.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from common import ints, start
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.config import LoraHyperparams
from continual.data import Example, load_cl_benchmark, synthetic_tasks
from continual.models import build_tiny_llama
from continual.strategies import STRATEGIES, Strategy, get_strategy
from continual.training import TrainingCallbacks, train
from workers.models import load_source

logger = logging.getLogger("strategy_overhead")

ORDER = ("seq-lora", "inc-lora", "o-lora", "am-lora")  # known ones first, in this order


def load_model(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if args.model == "tiny":
        heads = max(1, args.hidden // 64)
        return build_tiny_llama(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=heads,
            intermediate_size=args.intermediate,
        )
    if args.model != "smollm2":
        raise SystemExit(f"--model must be tiny or smollm2, got {args.model!r}")
    return load_source({"kind": "smollm2"})


def fill_zero_trainables(model: torch.nn.Module, *, seed: int) -> None:
    """Random values in every all-zero trainable tensor (LoRA B, new selector rows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and not param.any():
                noise = torch.randn(param.shape, generator=generator) * 0.02
                param.copy_(noise.to(param.dtype))


def fake_history(
    strategy: Strategy,
    *,
    make_base: Callable[[], PreTrainedModel],
    hyper: LoraHyperparams,
    count: int,
    root: Path,
) -> list[Path]:
    """`count` adapters written by `strategy` itself, oldest first (each sees the earlier)."""
    dirs: list[Path] = []
    for index in range(count):
        model = strategy.prepare(make_base(), history=dirs, hyper=hyper)
        fill_zero_trainables(model, seed=index)
        # One training-mode pass over random tokens: a strategy that keeps statistics of its
        # task's inputs (am-lora's router) then has some, as after real training.
        generator = torch.Generator().manual_seed(index)
        vocab = model.get_input_embeddings().weight.shape[0]
        model.train()
        with torch.no_grad():
            model(input_ids=torch.randint(0, int(vocab), (2, 16), generator=generator))
        out = root / f"{strategy.name}-{index:02d}"
        strategy.save_adapter(model, out)
        dirs.append(out)
    return dirs


def step_seconds(
    strategy: Strategy,
    *,
    make_base: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    history: Sequence[Path],
    hyper: LoraHyperparams,
    warmup_steps: int,
) -> float:
    """Median wall time of one training step after `warmup_steps` untimed ones."""
    model = strategy.prepare(make_base(), history=history, hyper=hyper)
    stamps: list[float] = []
    start = time.perf_counter()
    train(
        model,
        tokenizer,
        examples,
        hyper,
        extra_loss=strategy.extra_loss,
        callbacks=TrainingCallbacks(on_step=lambda _: stamps.append(time.perf_counter())),
    )
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    return statistics.median(times[warmup_steps:])


def run(args: argparse.Namespace) -> dict[tuple[str, int], float]:
    base, tokenizer = load_model(args)
    base = base.to(args.device)
    make_base: Callable[[], PreTrainedModel] = lambda: copy.deepcopy(base)  # noqa: E731
    if args.cl_data is not None:  # real lengths: ~140-token dbpedia prompts, cut at max_length
        examples = load_cl_benchmark(args.cl_data, "dbpedia", train_limit=256, seed=0).train
    else:
        examples = synthetic_tasks(seed=0)[0].train
    hyper = LoraHyperparams(
        rank=args.rank,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=1e-4,
    )
    names = [n for n in ORDER if n in STRATEGIES and n in args.strategies]
    counts = sorted(args.adapters)
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="strategy-overhead-") as tmp:
        histories = {}
        for name in names:
            needed = 1 if name == "seq-lora" else max(counts)
            logger.info("%s: writing %d fake earlier adapters", name, needed)
            histories[name] = fake_history(
                get_strategy(name), make_base=make_base, hyper=hyper, count=needed, root=Path(tmp)
            )
        # Strategies alternate within each round and the best round counts, so that load from
        # other processes hits every strategy alike.
        for count in counts:
            for _ in range(args.repeats):
                for name in names:
                    n = 1 if name == "seq-lora" else count
                    seconds = step_seconds(
                        get_strategy(name),
                        make_base=make_base,
                        tokenizer=tokenizer,
                        examples=examples,
                        history=histories[name][:n],
                        hyper=hyper,
                        warmup_steps=args.warmup_steps,
                    )
                    results[name, count] = min(seconds, results.get((name, count), math.inf))
            logger.info(
                "N=%d: %s", count, ", ".join(f"{n} {1e3 * results[n, count]:.1f} ms" for n in names)
            )
    return results


def print_table(results: dict[tuple[str, int], float], *, counts: Sequence[int]) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    reference = "inc-lora" if "inc-lora" in names else "seq-lora"
    header = f"{'N earlier':>9} | " + " | ".join(f"{n:>22}" for n in names)
    print(f"ms per training step (ratio vs {reference} at the same N)")
    print(header)
    print("-" * len(header))
    for count in sorted(counts):
        ref = results[reference, count]
        cells = []
        for name in names:
            value = results[name, count]
            cells.append(f"{1e3 * value:>13.1f} ({value / ref:>5.2f}x)")
        print(f"{count:>9} | " + " | ".join(f"{c:>22}" for c in cells))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (configurable below) or smollm2")
    parser.add_argument("--hidden", type=int, default=64, help="tiny: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="tiny: decoder layers")
    parser.add_argument("--intermediate", type=int, default=128, help="tiny: MLP width")
    parser.add_argument("--adapters", type=ints, default=[1, 4, 8, 16], help="e.g. 1,4,8,16")
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(ORDER))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best one counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--cl-data", type=Path, default=None,
        help="a CL_Benchmark folder: time steps on its dbpedia examples instead of the short "
        "synthetic ones (LoRA and penalty costs are then a realistic fraction of a step)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = start(args.threads, quiet=("continual",))
    results = run(args)
    print_table(results, counts=args.adapters)
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, "
        f"{time.perf_counter() - started:.0f}s in all"
    )


if __name__ == "__main__":
    main()
