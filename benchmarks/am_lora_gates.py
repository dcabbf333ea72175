"""Where am-lora's selector puts its weight: per task's test inputs, after each task.

    .venv/bin/python benchmarks/am_lora_gates.py --ablate --order agnews,yelp \\
        --adapters bench-results/drift-am/adapters/am-lora --data ../shared/data/cl_benchmark \\
        --model smollm2 --train-per-task 128 --eval-per-task 50

Reads the adapters a `strata bench` run kept (`<out>/adapters/am-lora/NN-<task>`), rebuilds the
model after each task as the stream does (`AmLora.inference_model` on the history so far) and
runs every task's test prompts through it. For each (after task t, inputs of task i) it prints
the mean selector weight of the zero adapter and of each task's adapter, over every adapted
layer and prompt token: does the selector send an old task's inputs to that task's adapter, and
does that change while later tasks are learned?

With `--ablate`, it also scores each task after the last one twice more: with the newest
adapter's weight forced to zero (its selector logit set to -inf, the others renormalised), and
with every adapter but the task's own forced to zero. The first separates what the newest
adapter's share of an old task's tokens costs from what the retrained selector rows cost.
Not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from continual.data import TaskData
from continual.evaluation import evaluating
from continual.strategies.am_lora import AmLora, am_lora_layers
from continual.stream import evaluate_task
from workers.bench import BenchConfig, load_tasks, model_source
from workers.models import load_source


@contextmanager
def recorded_gates(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect each adapted layer's mean selector weights (n + 1,) over the tokens it saw."""
    recorded: list[Tensor] = []
    layers = list(am_lora_layers(model).values())

    def recording(original):  # type: ignore[no-untyped-def]
        def gates(h: Tensor, lora_B: Tensor) -> Tensor:
            g: Tensor = original(h, lora_B)
            recorded.append(g.reshape(-1, g.shape[-1]).mean(dim=0).detach())
            return g

        return gates

    for layer in layers:
        layer.gates = recording(layer.gates)  # type: ignore[method-assign]
    try:
        yield recorded
    finally:
        for layer in layers:
            del layer.gates  # the instance attribute: the class's method again


def mean_gates(model: nn.Module, tokenizer, task: TaskData, max_length: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Mean selector weights over the task's test prompts (every token, every layer)."""
    per_example = []
    for example in task.test:
        ids = tokenizer(example.prompt, return_tensors="pt", truncation=True,
                        max_length=max_length)  # fmt: skip
        with recorded_gates(model) as layers, evaluating(model), torch.no_grad():
            model(**ids)
        per_example.append(torch.stack(layers).mean(dim=0))
    return [round(float(v), 3) for v in torch.stack(per_example).mean(dim=0)]


@contextmanager
def silenced(model: nn.Module, adapters: Sequence[int]) -> Iterator[None]:
    """Give the listed adapters (0-based task index) no weight: their selector logit is -inf."""
    saved = {}
    for path, layer in am_lora_layers(model).items():
        saved[path] = layer.selector_bias.detach().clone()
        with torch.no_grad():
            for index in adapters:
                layer.selector_bias[index + 1] = float("-inf")
    try:
        yield
    finally:
        for path, layer in am_lora_layers(model).items():
            with torch.no_grad():
                layer.selector_bias.copy_(saved[path])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--order", required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train-per-task", type=int, default=128)
    parser.add_argument("--eval-per-task", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ablate", action="store_true")
    args = parser.parse_args()
    order = tuple(args.order.split(","))
    cfg = BenchConfig(data=args.data, order=order, methods=("am-lora",), model=args.model,
                      train_per_task=args.train_per_task, eval_per_task=args.eval_per_task,
                      seed=args.seed)  # fmt: skip
    tasks = load_tasks(cfg)
    history = [sorted(args.adapters.glob(f"{i:02d}-{name}"))[0] for i, name in enumerate(order)]
    pristine, tokenizer = load_source(model_source(args.model, seed=args.seed))
    strategy = AmLora()
    report: dict[str, object] = {"gates": [], "ablation": []}
    print("after task | inputs of | mean selector weight: zero, " + ", ".join(order))
    for t in range(len(order)):
        model = strategy.inference_model(copy.deepcopy(pristine), history=history[: t + 1])
        for i in range(t + 1):
            gates = mean_gates(model, tokenizer, tasks[i], args.max_length)
            print(f"{order[t]} | {order[i]} | {gates}", flush=True)
            report["gates"].append({"after": order[t], "inputs": order[i], "weights": gates})  # type: ignore[attr-defined]
    if args.ablate:
        last = len(order) - 1
        for i in range(last):
            row = {"task": order[i]}
            row["all"] = evaluate_task(model, tokenizer, tasks[i], max_length=args.max_length)
            with silenced(model, [last]):
                row["without newest"] = evaluate_task(model, tokenizer, tasks[i],
                                                      max_length=args.max_length)  # fmt: skip
            with silenced(model, [j for j in range(len(order)) if j != i]):
                row["own adapter only"] = evaluate_task(model, tokenizer, tasks[i],
                                                        max_length=args.max_length)  # fmt: skip
            print(f"ablation after {order[last]}: {row}", flush=True)
            report["ablation"].append(row)  # type: ignore[attr-defined]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
