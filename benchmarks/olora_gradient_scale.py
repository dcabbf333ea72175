"""How large o-lora's overlap term's gradient on the new adapter's A is against the task loss's,
for each normalisation of the term (`o-lora.lambda1_norm`), on SmolLM2.

Task 0 (dbpedia) trains an inc-lora adapter for 12 steps; task 1 (amazon) then trains an o-lora
adapter without the penalty for 12 steps (so that B has grown and the task loss reaches A), and
the gradients of the task loss and of each form of the penalty (before lambda1) on the new A
matrices are measured on one batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/olora_gradient_scale.py
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from continual.batching import completion_loss, encode_pair, pad_batch, pad_id_of
from continual.config import LoraHyperparams
from continual.data import load_cl_benchmark
from continual.options import LAMBDA1_NORMS, OLoraOptions
from continual.strategies import OLora, get_strategy
from continual.strategies.o_lora import overlap_penalty
from continual.training import train
from workers.models import load_source

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"


def main() -> None:
    base, tok = load_source({"kind": "smollm2"})
    hyper = LoraHyperparams(learning_rate=1e-3, batch_size=8, max_length=128, max_steps=12)
    first = load_cl_benchmark(DATA, "dbpedia", train_limit=96, test_limit=8)
    second = load_cl_benchmark(DATA, "amazon", train_limit=96, test_limit=8)
    work = Path(tempfile.mkdtemp())
    inc = get_strategy("inc-lora")
    model = inc.prepare(copy.deepcopy(base), history=[], hyper=hyper)
    train(model, tok, first.train, hyper)
    inc.save_adapter(model, work / "t0")
    olora = OLora(OLoraOptions(lambda1=0.0, lambda2=0.0))
    model = olora.prepare(copy.deepcopy(base), history=[work / "t0"], hyper=hyper)
    train(model, tok, second.train, hyper)
    assert olora._prepared is not None
    groups = olora._prepared.groups
    news = [p for g in groups for p in g.new]
    batch = pad_batch(
        [encode_pair(tok, prompt=e.prompt, completion=e.completion, add_eos=True, max_length=128)
         for e in second.train[:8]], pad_id=pad_id_of(tok),
    )  # fmt: skip
    model.train()

    def mean_entry(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, news, retain_graph=True)
        return float(torch.cat([g.abs().flatten() for g in grads]).mean())

    task = mean_entry(completion_loss(model, batch))
    print(f"{len(news)} layers; task loss: mean |gradient| per A entry {task:.3g}")
    for norm in LAMBDA1_NORMS:
        penalty = overlap_penalty(groups, norm=norm)
        grad = mean_entry(penalty)
        print(f"overlap ({norm}): value {float(penalty):.4g}, mean |gradient| per A entry "
              f"{grad:.3g} = {grad / task:.3g}x the task loss's (before lambda1)")  # fmt: skip


if __name__ == "__main__":
    main()
