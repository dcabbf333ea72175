"""How well am-lora's task router tells CL_Benchmark tasks apart, from their statistics alone.

    .venv/bin/python benchmarks/am_lora_routing.py --data ../shared/data/cl_benchmark \\
        --order dbpedia,amazon,agnews,yelp --model smollm2 --train-sizes 32,128,500

For each training size N, the statistics of N training sequences per task (bos + prompt +
completion + eos, as training feeds them) are summed as `TaskRouter` sums them while a task
trains: each sequence's mean token embedding. The router built from them (the product's class,
its linear discriminant and shrinkage) then classifies every test prompt (bos + prompt: what the
router has seen when the label is scored) by the task of highest posterior. Prints accuracy and
the confusion matrix (rows: the prompt's task; columns: the router's choice). Only the model's
input embedding runs, so this takes seconds. Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import ints
from torch import Tensor, nn

from continual.batching import encode_pair
from continual.data.cl_benchmark import load_cl_benchmark
from continual.strategies.am_lora_router import TaskRouter
from workers.bench import model_source
from workers.models import load_source


def features(embedding: nn.Embedding, sequences: list[list[int]]) -> Tensor:
    """Mean token embedding of each sequence: (N, d), float64 like the router's sums."""
    with torch.no_grad():
        return torch.stack([embedding(torch.tensor(ids)).double().mean(dim=0) for ids in sequences])


def router_for(embedding: nn.Embedding, per_task: list[Tensor]) -> TaskRouter:
    """A router with the statistics `TaskRouter` keeps for tasks with these training features."""
    means = torch.stack([f.mean(dim=0) for f in per_task])
    counts = torch.tensor([float(len(f)) for f in per_task])
    within = sum((f - f.mean(dim=0)).T @ (f - f.mean(dim=0)) for f in per_task)
    assert isinstance(within, Tensor)
    return TaskRouter(embedding, [], means=means, counts=counts, within=within, weight=1.0,
                      learning=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--order", required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train-sizes", type=ints, default=[32, 128, 500])
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    order = args.order.split(",")
    largest = max(args.train_sizes)
    model, tokenizer = load_source(model_source(args.model, seed=args.seed))
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, nn.Embedding)
    train, test = [], []
    for name in order:
        task = load_cl_benchmark(args.data, name, train_limit=largest,
                                 test_limit=args.test_per_task, seed=args.seed)  # fmt: skip
        train.append(features(embedding, [
            encode_pair(tokenizer, prompt=ex.prompt, completion=ex.completion, add_eos=True,
                        max_length=args.max_length).ids
            for ex in task.train
        ]))  # fmt: skip
        test.append(features(embedding, [
            encode_pair(tokenizer, prompt=ex.prompt, completion="", add_eos=False,
                        max_length=args.max_length).ids
            for ex in task.test
        ]))  # fmt: skip
    print(f"tasks: {', '.join(order)}; {args.test_per_task} test prompts each")
    for size in args.train_sizes:
        router = router_for(embedding, [f[:size] for f in train])
        confusion = torch.zeros(len(order), len(order), dtype=torch.long)
        for index, prompts in enumerate(test):
            log_p = router.log_posterior(prompts)
            assert log_p is not None
            for choice in log_p.argmax(dim=-1).tolist():
                confusion[index, choice] += 1
        accuracy = float(confusion.diagonal().sum()) / float(confusion.sum())
        print(f"\n{size} training sequences per task: {100 * accuracy:.1f}% of test prompts "
              "routed to their own task")  # fmt: skip
        print("prompts of \\ routed to | " + " | ".join(order))
        for name, row in zip(order, confusion.tolist(), strict=True):
            print(f"{name} | " + " | ".join(str(v) for v in row))


if __name__ == "__main__":
    main()
