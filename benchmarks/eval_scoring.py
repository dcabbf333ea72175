"""Rank-classification throughput: naive loop vs one batched pass vs shared-prefix KV cache.

    .venv/bin/python benchmarks/eval_scoring.py --model smollm2 --task dbpedia --examples 40

Scores every label of every example three ways, side by side in one run, checks that they
agree, and prints examples/s and the ratios against the naive one-sequence-per-label loop.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from continual.batching import encode_pair, pad_batch, pad_id_of
from continual.data import Example, PromptFormat, load_cl_benchmark
from continual.evaluation import label_scores
from workers.bench import model_source
from workers.models import load_source

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"


def naive(
    model: nn.Module, tok: PreTrainedTokenizerBase, examples: Sequence[Example], labels: list[str]
) -> Tensor:
    """One forward pass per (example, label), full logits: what a first implementation does."""
    rows = []
    with torch.no_grad():
        for ex in examples:
            row = []
            for label in labels:
                completion = PromptFormat().render_completion(label)
                enc = encode_pair(tok, prompt=ex.prompt, completion=completion, add_eos=False)
                batch = pad_batch([enc], pad_id=pad_id_of(tok))
                logits = model(input_ids=batch.input_ids).logits
                logp = logits[0, :-1].float().log_softmax(-1)
                target = batch.input_ids[0, 1:]
                picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)[enc.prompt_len - 1 :]
                row.append(picked.mean())
            rows.append(torch.stack(row))
    return torch.stack(rows)


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--task", default="dbpedia")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_source(model_source(args.model, seed=0))
    model.eval()
    task = load_cl_benchmark(args.data, args.task, test_limit=args.examples, train_limit=1)
    labels = list(task.labels or ())
    examples = task.test
    ways = {
        "naive loop": lambda: naive(model, tok, examples, labels),
        "batched full sequences": lambda: label_scores(
            model, tok, examples, labels, shared_prefix=False
        ),
        "shared-prefix cache": lambda: label_scores(model, tok, examples, labels),
    }
    results = {name: timed(fn) for name, fn in ways.items()}
    reference = results["naive loop"][0]
    base = results["naive loop"][1]
    print(f"{args.model}, {args.task}: {len(examples)} examples x {len(labels)} labels, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| method | examples/s | vs naive | max abs score diff |")
    print("|---|---|---|---|")
    for name, (scores, seconds) in results.items():
        diff = (scores - reference).abs().max().item()
        print(f"| {name} | {len(examples) / seconds:.2f} | {base / seconds:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
