"""Training throughput against the machine's matmul peak (model FLOPs utilisation, MFU).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/training_throughput.py --model smollm2 \
        --cl-data ../shared/data/cl_benchmark --task amazon --max-length 256 --threads 2

1. Peak: the best FLOP/s of square matmuls (torch.mm, sizes --peak-sizes) on --device, in the
   arithmetic of --precision (fp32, or bf16), on --threads when on the CPU.
2. Training: `continual.training.train` of a fresh LoRA adapter (rank --rank on all seven
   projections) on --task's examples, with and without `group_by_length`, the two alternating
   over --repeats rounds (the best round of each counts). Steps after --warmup-steps are timed.
3. Useful FLOPs of each timed step, counted from the batches' real (unpadded) lengths for a
   frozen-base LoRA step: every base linear costs 2 FLOPs per weight per token forward and 2
   backward (activation gradients only: the base gets no weight gradient); every LoRA matrix
   2 + 2 + 2 (forward, activation and weight gradients); attention 4 L T d per token forward
   (scores and weighted values over the whole sequence, no causal saving counted) and twice that
   backward; the vocabulary projection 2 + 2 per weight per completion token (the loss computes
   vocabulary logits only there). Padding is not useful work and is not counted.

MFU = useful FLOP/s / peak FLOP/s. Not a test: it prints a table. On a GPU:

    .venv/bin/python benchmarks/training_throughput.py --model smollm2 --device cuda \
        --precision bf16 --batch-size 32 --peak-sizes 4096,8192 --cl-data ...

(a step's time ends with the loss read back to the host, so GPU work is waited for).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
from common import ints, start
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.batching import Encoded, encode_pair, pad_id_of
from continual.config import PRECISIONS, LoraHyperparams
from continual.data import Example, load_cl_benchmark, synthetic_tasks
from continual.models import build_tiny_llama
from continual.strategies import lora_config
from continual.training import TrainingCallbacks, _batches, train
from workers.models import load_source

logger = logging.getLogger("training_throughput")


def load_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name == "tiny":
        return build_tiny_llama(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688)
    if name != "smollm2":
        raise SystemExit(f"--model must be tiny or smollm2, got {name!r}")
    return load_source({"kind": "smollm2"})


def matmul_peak(
    sizes: Sequence[int], *, device: torch.device, dtype: torch.dtype, seconds: float = 1.0
) -> tuple[float, int]:
    """Best FLOP/s of an n x n by n x n matmul over `sizes`, and the n that reached it."""
    best, best_n = 0.0, 0
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm up
        sync()
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
            torch.mm(a, b, out=out)
            runs += 1
            if runs % 8 == 0:
                sync()
        sync()
        elapsed = time.perf_counter() - start
        rate = 2 * n**3 * runs / elapsed
        logger.info("matmul %d: %.1f GFLOP/s", n, rate / 1e9)
        if rate > best:
            best, best_n = rate, n
    return best, best_n


class FlopModel:
    """Per-token FLOP counts of a frozen-base LoRA training step on `model` (a PEFT model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        base_weights = lora_weights = 0
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
                continue
            if ".lora_A." in name or ".lora_B." in name:
                lora_weights += module.weight.numel()
            else:
                base_weights += module.weight.numel()
        config = model.config
        self.base_weights, self.lora_weights = base_weights, lora_weights
        self.layers = config.num_hidden_layers
        heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None)
        self.attn_width = heads * (head_dim or config.hidden_size // heads)
        self.vocab_weights = config.vocab_size * config.hidden_size

    def step(self, lengths: Sequence[int], completions: Sequence[int]) -> float:
        tokens = sum(lengths)
        linear = (2 + 2) * self.base_weights * tokens + (2 + 2 + 2) * self.lora_weights * tokens
        attention = (4 + 8) * self.layers * self.attn_width * sum(t * t for t in lengths)
        vocab = (2 + 2) * self.vocab_weights * sum(completions)
        return float(linear + attention + vocab)


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[Encoded]:
    return [
        encode_pair(
            tokenizer, prompt=e.prompt, completion=e.completion, add_eos=True, max_length=max_length
        )
        for e in examples
    ]


def measure(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    hyper: LoraHyperparams,
    *,
    warmup_steps: int,
) -> dict[str, float]:
    """One training run: timed steps' useful FLOPs, tokens, padded tokens and seconds."""
    torch.manual_seed(hyper.seed)
    model = peft.get_peft_model(base, lora_config(hyper))
    flops = FlopModel(model)
    stamps: list[float] = []
    start = time.perf_counter()
    train(
        model,
        tokenizer,
        examples,
        hyper,
        callbacks=TrainingCallbacks(on_step=lambda _: stamps.append(time.perf_counter())),
    )
    model.unload()  # the base goes back as it was
    seconds = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)][warmup_steps:]
    # the batches train() used: the same function, examples, seed and step count
    encoded = encode(tokenizer, examples, hyper.max_length)
    batches = list(_batches(encoded, hyper=hyper, steps=len(stamps), pad_id=pad_id_of(tokenizer)))
    timed = batches[warmup_steps:]
    lengths = [b.attention_mask.sum(dim=1).tolist() for b in timed]
    completions = [(b.labels[:, 1:] != -100).sum(dim=1).tolist() for b in timed]
    return {
        "seconds": sum(seconds),
        "median_step": statistics.median(seconds),
        "flops": sum(flops.step(n, c) for n, c in zip(lengths, completions, strict=True)),
        "tokens": float(sum(sum(n) for n in lengths)),
        "padded": float(sum(b.input_ids.numel() for b in timed)),
    }


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak, peak_n = matmul_peak(args.peak_sizes, device=device, dtype=dtype)
    base, tokenizer = load_model(args.model)
    base.requires_grad_(False)
    base.to(device)  # type: ignore[arg-type]  # in place; HF's typing
    if args.cl_data is not None:
        task = load_cl_benchmark(args.cl_data, args.task, train_limit=args.examples, seed=0)
        examples = list(task.train)
    else:
        examples = list(synthetic_tasks(seed=0)[0].train)
    steps = args.warmup_steps + args.steps
    results: dict[bool, dict[str, float]] = {}
    for _ in range(args.repeats):
        for group in (False, True):
            hyper = LoraHyperparams(
                rank=args.rank,
                batch_size=args.batch_size,
                max_length=args.max_length,
                max_steps=steps,
                learning_rate=1e-4,
                group_by_length=group,
                precision=args.precision,
            )
            got = measure(base, tokenizer, examples, hyper, warmup_steps=args.warmup_steps)
            logger.info(
                "group_by_length=%s: %.0f tokens/s, %.2f GFLOP/s",
                group, got["tokens"] / got["seconds"], got["flops"] / got["seconds"] / 1e9,
            )  # fmt: skip
            if group not in results or got["seconds"] < results[group]["seconds"]:
                results[group] = got
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({args.precision}, n={peak_n}, {where})")
    print("| batching | useful tokens/s | padding | useful GFLOP/s | MFU | median step |")
    print("|---|---|---|---|---|---|")
    for group in (False, True):
        r = results[group]
        rate = r["flops"] / r["seconds"]
        print(
            f"| {'grouped by length' if group else 'shuffled'} | {r['tokens'] / r['seconds']:.0f} "
            f"| {1 - r['tokens'] / r['padded']:.0%} | {rate / 1e9:.2f} | {rate / peak:.0%} "
            f"| {r['median_step']:.2f} s |"
        )
    rates = {g: r["tokens"] / r["seconds"] for g, r in results.items()}
    print(f"grouped / shuffled useful-token throughput: {rates[True] / rates[False]:.2f}x")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2")
    parser.add_argument("--cl-data", type=Path, default=None, help="a CL_Benchmark folder")
    parser.add_argument("--task", default="amazon", help="task of --cl-data to train on")
    parser.add_argument("--examples", type=int, default=512, help="training examples loaded")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best one counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the training steps' arithmetic (LoraHyperparams.precision); the "
                        "peak is measured in it too")  # fmt: skip
    parser.add_argument("--peak-sizes", type=ints, default=[512, 1024, 2048])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = start(args.threads, quiet=("continual",))
    run(args)
    print(f"{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
