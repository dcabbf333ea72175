"""Does a trained LoRA adapter's A read its task's inputs? O-LoRA's premise, measured.

O-LoRA keeps a new adapter's down projection A_new orthogonal to the earlier adapters' A: it
assumes that A_old's row space holds the directions of the old task's layer inputs, so that an
A_new outside it leaves the old task's inputs unread (A_new x_old = 0). This script measures, on
SmolLM2 and two tasks, per target projection (averaged over the model's layers):

- `A (trained)`: the share of the first task's input energy sum ||P x||^2 / sum ||x||^2 inside
  the row space of a trained adapter's A (rank r) for that task;
- `A (at init)`: the same for the A the adapter started from (its Kaiming draw, same seed);
- `random r`: the expected share of a random r-dimensional subspace, r / d;
- `top r`: the share of the best r-dimensional subspace (the r leading eigenvectors);
- `k 90%`, `k 99%`: how many leading directions hold 90% / 99% of the first task's energy;
- `2nd in 90%`, `2nd in 99%`: the share of the second task's input energy inside those
  subspaces (how much a new adapter kept out of them could still read of its own task).

The inputs are the base model's (no adapter) on the first `--sequences` training pairs of each
task (prompt and completion, cut at `--max-length`), every token counted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/olora_input_subspace.py \\
        --data ../shared/data/cl_benchmark --first dbpedia --second amazon

It first trains the first task's inc-lora adapter as `strata bench` would (rank 8 on all seven
projections, `--train-per-task` examples, one epoch, learning rate 1e-3, batch 8).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from continual.batching import encode_pair
from continual.config import LoraHyperparams
from continual.data import TaskData, load_cl_benchmark
from continual.strategies import get_strategy
from continual.strategies.inc_lora import task_seed
from continual.training import train
from workers.models import load_source

LEVELS = (0.9, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--first", required=True, help="the earlier task")
    parser.add_argument("--second", required=True, help="the new task")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-per-task", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base, tok = load_source({"kind": "smollm2"})
    hyper = LoraHyperparams(learning_rate=1e-3, batch_size=8, max_length=args.max_length,
                            epochs=1, seed=args.seed)  # fmt: skip
    first = load_cl_benchmark(args.data, args.first, train_limit=args.train_per_task,
                              test_limit=1, seed=args.seed)  # fmt: skip
    second = load_cl_benchmark(args.data, args.second, train_limit=args.sequences,
                               test_limit=1, seed=args.seed)  # fmt: skip
    inc = get_strategy("inc-lora")
    initial = _down_projections(inc.prepare(copy.deepcopy(base), history=[], hyper=hyper))
    model = inc.prepare(copy.deepcopy(base), history=[], hyper=hyper)
    print(f"training {args.first}'s adapter on {len(first.train)} examples")
    train(model, tok, first.train, hyper)
    adapter = Path(tempfile.mkdtemp()) / "first"
    inc.save_adapter(model, adapter)
    del model
    trained = _saved_down_projections(adapter)
    print(f"init seed {task_seed(hyper, task_index=0)}; {len(trained)} adapted layers")
    cov_first = _input_second_moments(base, tok, first, args.sequences, args.max_length)
    cov_second = _input_second_moments(base, tok, second, args.sequences, args.max_length)
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    spectra: dict[int, tuple[Tensor, Tensor]] = {}  # q/k/v (gate/up) share one moment tensor
    for path, cov in cov_first.items():
        if path not in trained:
            continue
        kind = path.rsplit(".", 1)[-1]
        if id(cov) not in spectra:
            values, vectors = torch.linalg.eigh(cov)
            spectra[id(cov)] = values.flip(0).clamp_min(0), vectors.flip(1)
        values, vectors = spectra[id(cov)]
        total = float(values.sum())
        rank = trained[path].shape[0]
        row = rows[kind]
        row["d"].append(cov.shape[0])
        row["A (trained)"].append(_share(cov, trained[path]) / total)
        row["A (at init)"].append(_share(cov, initial[path]) / total)
        row["random r"].append(rank / cov.shape[0])
        row["top r"].append(float(values[:rank].sum()) / total)
        cumulative = values.cumsum(0) / total
        other = cov_second[path]
        for level in LEVELS:
            k = int((cumulative < level).sum()) + 1
            basis = vectors[:, :k]
            row[f"k {level:.0%}"].append(k)
            row[f"2nd in {level:.0%}"].append(
                float(torch.trace(basis.T @ other @ basis)) / float(torch.trace(other))
            )
    columns = ["d", "A (trained)", "A (at init)", "random r", "top r"]
    columns += [f"{name} {level:.0%}" for level in LEVELS for name in ("k", "2nd in")]
    print(f"\n{args.first} -> {args.second}, {args.sequences} sequences each; mean over layers\n")
    print("| projection | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for kind in sorted(rows):
        cells = []
        for column in columns:
            mean = statistics.fmean(rows[kind][column])
            integer = column == "d" or column.startswith("k ")
            cells.append(f"{mean:.0f}" if integer else f"{mean:.3f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")


def _share(cov: Tensor, down: Tensor) -> float:
    """sum ||P x||^2 over the inputs whose second moment is `cov`, P the projection on the
    row space of `down` (r, d)."""
    basis, _ = torch.linalg.qr(down.double().T)  # (d, r)
    return float(torch.trace(basis.T @ cov @ basis))


def _down_projections(model: nn.Module) -> dict[str, Tensor]:
    """Base-layer path -> the adapter's A (r, d), of a PEFT model with one adapter."""
    found = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and lora_a:
            (linear,) = lora_a.values()
            assert isinstance(linear, nn.Linear)
            found[_base_path(name)] = linear.weight.detach().clone()
    return found


def _saved_down_projections(adapter: Path) -> dict[str, Tensor]:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {
        _base_path(key.removesuffix(".lora_A.weight")): value
        for key, value in tensors.items()
        if key.endswith(".lora_A.weight")
    }


def _base_path(name: str) -> str:
    """`model.layers.0.self_attn.q_proj` from a PEFT module or tensor name."""
    return name.removeprefix("base_model.model.")


@torch.no_grad()
def _input_second_moments(
    model: nn.Module, tok: PreTrainedTokenizerBase, task: TaskData, count: int, max_length: int
) -> dict[str, Tensor]:
    """Linear layer path -> sum of x x^T over every token's input x, float64. Layers that read
    the same input (a block's q/k/v, its gate/up) share one tensor, computed once."""
    moments: dict[str, Tensor] = {}
    reader: dict[str, str] = {}  # layer path -> the first layer seen reading the same input
    seen: dict[int, tuple[Tensor, str]] = {}  # this forward's inputs, held so ids stay unique
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):

            def hook(_: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                x = args[0]
                if id(x) in seen:
                    reader[name] = seen[id(x)][1]
                    return
                seen[id(x)] = (x, name)
                reader[name] = name
                flat = x.reshape(-1, x.shape[-1]).double()
                moments[name] = moments.get(name, 0) + flat.T @ flat

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        model.eval()
        for example in task.train[:count]:
            seen.clear()
            encoded = encode_pair(
                tok,
                prompt=example.prompt,
                completion=example.completion,
                add_eos=False,
                max_length=max_length,
            )
            model(input_ids=torch.tensor([encoded.ids]))
    finally:
        for handle in hooks:
            handle.remove()
    return {name: moments[first] for name, first in reader.items()}


if __name__ == "__main__":
    main()
