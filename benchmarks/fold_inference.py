"""What inference costs after an am-lora consolidation: the forward pass of the stream's state
against the folded snapshot alone and against inc-lora with only the unfolded adapters.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fold_inference.py            # SmolLM2-shaped
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fold_inference.py --model smollm2

The stream learns `--folded` generated tasks with am-lora (task routing on; `--steps` optimiser
steps each: enough for the router's statistics, not for accuracy), folds them into the base
(`continual.fold.fold_state`, as a consolidation job does), then learns `--live` more tasks on
the folded snapshot. Timed, side by side in alternating rounds (the best of `--repeats`): one
forward pass of a batch of `--batch` x `--length` tokens through

- `snapshot`: the folded snapshot alone (what a folded task would cost if nothing else ran);
- `composed`: the stream's state after the fold (the snapshot, the memory and the live
  adapters); every input pays for the live adapters, a folded task's too (its gates go to the
  zero adapter, but the layers still compute the adapters' branches);
- `inc-lora`: the snapshot with the live adapters folded into one PEFT branch (`cat`), the
  goal's reference for the unfolded tasks;
- `unfolded`: am-lora with all folded + live adapters and no consolidation.

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import start
from torch import nn
from transformers import PreTrainedModel

from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.fold import fold_state, probe_sequences
from continual.models import build_tiny_llama, build_tokenizer
from continual.strategies import get_strategy
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


def timed(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        begin = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--folded", type=int, default=2)
    parser.add_argument("--live", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    start(threads=None)
    pristine, tokenizer = load(args.model)
    pristine.requires_grad_(False)
    tasks = [t for seed in range(3) for t in synthetic_tasks(seed=seed, train_size=64, test_size=4)]
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
        models = {
            "snapshot": snapshot.eval(),
            "composed": am.inference_model(copy.deepcopy(snapshot), history=later),
            "inc-lora": get_strategy("inc-lora").inference_model(
                copy.deepcopy(snapshot), history=live
            ),
            "unfolded": am.inference_model(copy.deepcopy(pristine), history=unfolded),
        }
        ids = torch.randint(3, tokenizer.vocab_size, (args.batch, args.length))  # type: ignore[attr-defined]
        times: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():
            timed(model, ids)  # warm up
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(timed(model, ids))
    best = {name: min(values) for name, values in times.items()}
    print(f"{args.model}, {args.folded} folded + {args.live} live adapters, batch {args.batch}"
          f" x {args.length} tokens, best of {args.repeats} (median in brackets):")  # fmt: skip
    print(f"{'state':<10} {'ms':>8} {'vs snapshot':>12} {'vs inc-lora':>12}")
    for name, value in best.items():
        median = statistics.median(times[name])
        print(f"{name:<10} {1000 * value:>8.1f} {value / best['snapshot']:>11.2f}x "
              f"{value / best['inc-lora']:>11.2f}x   ({1000 * median:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
