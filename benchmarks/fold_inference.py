"""What inference costs after an am-lora consolidation: the forward pass of the stream's state
against the folded snapshot alone and against inc-lora with only the unfolded adapters.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fold_inference.py            # SmolLM2-shaped
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fold_inference.py --model smollm2

The stream learns `--folded` of the three generated tasks with am-lora (task routing on;
`--steps` optimiser steps each: enough for the router's statistics, not for accuracy), folds
them into the base (`continual.fold.fold_state`, as a consolidation job does), then learns
`--live` more tasks on the folded snapshot. Timed, side by side in alternating rounds (the best
of `--repeats`): one forward pass of a batch of `--batch` x `--length` tokens through

- `snapshot`: the folded snapshot alone, on a folded task's prompts (what a folded task should
  cost);
- `composed`: the stream's state after the fold (the snapshot, the memory and the live
  adapters), on a folded task's prompts (the router gives them to the snapshot and the layers
  skip the adapters) and on a live task's;
- `inc-lora`: the snapshot with the live adapters folded into one PEFT branch (`cat`), on a
  live task's prompts: the goal's reference for the unfolded tasks;
- `unfolded`: am-lora with all folded + live adapters and no consolidation.

Each batch row is one of the task's test prompts repeated to `--length` tokens.

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import start
from torch import nn
from transformers import PreTrainedModel

from continual.config import LoraHyperparams
from continual.data import TaskData, synthetic_tasks
from continual.fold import fold_state, probe_sequences
from continual.models import build_tiny_llama, build_tokenizer
from continual.strategies import get_strategy
from continual.strategies.am_lora import am_lora_layers
from continual.training import train
from workers.models import load_source


def load(model: str) -> tuple[PreTrainedModel, object]:
    if model == "smollm2":
        return load_source({"kind": "smollm2"})
    tokenizer = build_tokenizer()
    base, _ = build_tiny_llama(hidden_size=576, num_layers=8, num_heads=9,
                               intermediate_size=1536, tokenizer=tokenizer)  # fmt: skip
    return base, tokenizer


def learn(  # type: ignore[no-untyped-def]
    strategy, make_base, tokenizer, tasks, history, hyper, root: Path
) -> list[Path]:
    history = list(history)
    for task in tasks:
        model = strategy.prepare(make_base(), history=history, hyper=hyper)
        train(
            model,
            tokenizer,
            task.train,
            hyper,
            extra_loss=lambda _m, m=model: strategy.extra_loss(m),
        )
        out = root / f"{len(history):02d}-{task.name}"
        strategy.save_adapter(model, out)
        history.append(out)
    return history


def batch_of(tokenizer: Any, task: TaskData, batch: int, length: int) -> torch.Tensor:
    """(batch, length) token ids: each row one of the task's test prompts, repeated to fill
    the length (its mean embedding, what the router reads, stays the prompt's)."""
    rows = []
    for index in range(batch):
        ids = tokenizer(task.test[index % len(task.test)].prompt)["input_ids"]
        rows.append((ids * (length // len(ids) + 1))[:length])
    return torch.tensor(rows)


def timed(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        begin = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--folded", type=int, default=2)
    parser.add_argument("--live", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    start(threads=None)
    pristine, tokenizer = load(args.model)
    pristine.requires_grad_(False)
    tasks = synthetic_tasks(seed=0, train_size=64, test_size=4)  # three distinct tasks
    if args.folded < 1 or args.live < 1 or args.folded + args.live > len(tasks):
        raise SystemExit(f"--folded and --live: at least 1 each, {len(tasks)} tasks in all")
    tasks = tasks[: args.folded + args.live]
    hyper = LoraHyperparams(max_steps=args.steps, batch_size=8)
    am = get_strategy("am-lora")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        early = learn(am, lambda: copy.deepcopy(pristine), tokenizer, tasks[: args.folded], [],
                      hyper, root)  # fmt: skip
        state = am.inference_model(copy.deepcopy(pristine), history=early)
        probes = [probe_sequences(tokenizer, t, max_length=128) for t in tasks[: args.folded]]
        fold = fold_state(state, method="am-lora", history=early, probes=probes)
        fold.write_memory(root / "snapshot")
        memory = [root / "snapshot" / "olora_memory"]
        snapshot = fold.model
        later = learn(am, lambda: copy.deepcopy(snapshot), tokenizer, tasks[args.folded :],
                      memory, hyper, root)  # fmt: skip
        live = later[1:]
        (root / "unfolded").mkdir()
        unfolded = learn(am, lambda: copy.deepcopy(pristine), tokenizer, tasks, [], hyper,
                         root / "unfolded")  # fmt: skip
        composed = am.inference_model(copy.deepcopy(snapshot), history=later)
        inc = get_strategy("inc-lora").inference_model(copy.deepcopy(snapshot), history=live)
        plain = am.inference_model(copy.deepcopy(pristine), history=unfolded)
        folded_ids = batch_of(tokenizer, tasks[0], args.batch, args.length)
        live_ids = batch_of(tokenizer, tasks[-1], args.batch, args.length)
        runs = {  # what runs, on which task's inputs
            "snapshot, folded task": (snapshot.eval(), folded_ids),
            "composed, folded task": (composed, folded_ids),
            "composed, live task": (composed, live_ids),
            "inc-lora, live task": (inc, live_ids),
            "unfolded, live task": (plain, live_ids),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for model, ids in runs.values():
            timed(model, ids)  # warm up
        for _ in range(args.repeats):
            for name, (model, ids) in runs.items():
                times[name].append(timed(model, ids))
        timed(composed, folded_ids)
        skipped = all(layer.skip_adapters for layer in am_lora_layers(composed).values())
    best = {name: min(values) for name, values in times.items()}
    print(f"{args.model}, {args.folded} folded + {args.live} live adapters, batch {args.batch}"
          f" x {args.length} tokens, best of {args.repeats} (median in brackets):")  # fmt: skip
    print(f"{'state, inputs':<22} {'ms':>8} {'vs snapshot':>12} {'vs inc-lora':>12}")
    for name, value in best.items():
        median = statistics.median(times[name])
        print(f"{name:<22} {1000 * value:>8.1f} {value / best['snapshot, folded task']:>11.2f}x "
              f"{value / best['inc-lora, live task']:>11.2f}x   ({1000 * median:.1f})")  # fmt: skip
    print(f"composed on the folded task's prompts skips the adapters: {skipped}")


if __name__ == "__main__":
    main()
