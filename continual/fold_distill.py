"""Correct a fitted am-lora fold by distillation from the routed state it replaces.

am-lora's fold (`continual.fold`) fits each layer's update alone, on the routed model's inputs.
Two things it cannot see: a layer's folded output changes the inputs of every layer after it,
and with the `prompt` routing scope the same tokens (an instruction every task's prompts open
with) are given a different adapter in each task, which no single weight reproduces layer by
layer. The distillation works on the whole model instead: a LoRA branch on every folded layer
of the fitted snapshot (B = 0, so it starts as the fitted fold) is trained so that the folded
model's next-token distributions match the routed model's on the folded tasks' sequences
(KL(routed || folded) at every position; `answer_share` of each sequence's loss on the positions
that predict its completion, the label a task is scored on), then merged into the weights.
Nothing but those sequences is needed: the routed model is run once over them first, and only
its final hidden states are kept (the output head is not part of any adapter, so the folded
model's own head turns them back into the routed model's logits).

PEFT builds the branch (`get_peft_model`) and merges it (`merge_and_unload`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class DistillSettings:
    """How a fold is corrected: `steps` optimiser steps (0: not at all) of `batch` sequences,
    a LoRA branch of `rank` on every folded layer, AdamW at `learning_rate`. `answer_share`
    (None: every position alike) is the share of each sequence's loss put on the positions
    that predict its completion (the label a task is scored on), the rest on its prompt's."""

    steps: int = 0
    rank: int = 8
    learning_rate: float = 1e-3
    batch: int = 8
    seed: int = 0
    answer_share: float | None = None  # `continual.fold.DISTILL` sets it

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"distillation {name} must be a whole number >= 0, not {value!r}")
        if self.rank < 1 or self.batch < 1:
            raise ValueError("distillation rank and batch must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError(f"distillation learning_rate must be > 0, not {self.learning_rate}")
        if self.answer_share is not None and not 0.0 <= self.answer_share <= 1.0:
            raise ValueError(
                f"distillation answer_share must be in [0, 1], not {self.answer_share}"
            )


@torch.no_grad()
def final_hidden(model: nn.Module, sequences: Sequence[Tensor]) -> list[Tensor]:
    """The inputs of `model`'s output head (its final hidden states), (1, T, d) per sequence,
    each run alone (no padding): what the distillation's targets are made from."""
    head = _head(model)
    seen: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    device = next(model.parameters()).device
    try:
        model.eval()
        for ids in sequences:
            model(input_ids=ids.to(device))
    finally:
        handle.remove()
    if len(seen) != len(sequences):
        raise RuntimeError("the output head did not run once per sequence")
    return [h.float().cpu() for h in seen]


def distill(
    model: PreTrainedModel,
    *,
    teacher: Sequence[Tensor],
    sequences: Sequence[Tensor],
    targets: Sequence[str],
    settings: DistillSettings,
    prompt_lengths: Sequence[int] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[PreTrainedModel, list[float]]:
    """Train a LoRA branch on the `targets` layers (module paths) of `model` so that its
    distributions on `sequences` match those the final hidden states `teacher` give through
    `model`'s own output head, and merge it. `prompt_lengths[i]` (tokens before sequence i's
    completion) lets `settings.answer_share` weight the completions; without them every
    position counts alike. Returns the merged model and each step's loss (the weighted KL per
    token, nats). `on_step(step, loss)` reports every step."""
    if len(teacher) != len(sequences) or not sequences:
        raise ValueError("distillation needs one teacher state per sequence, and a sequence")
    if settings.steps == 0:
        return model, []
    weights = [
        position_weights(int(ids.shape[1]), None if prompt_lengths is None else prompt_lengths[i],
                         answer_share=None if prompt_lengths is None else settings.answer_share)
        for i, ids in enumerate(sequences)
    ]  # fmt: skip
    head = _head(model)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.rank, lora_dropout=0.0,
                        target_modules=list(targets))  # fmt: skip
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(peft_model.parameters()).device
    dtype = next(head.parameters()).dtype  # the teacher's states were kept in float32
    order: list[int] = []
    losses: list[float] = []
    peft_model.train()
    for step in range(1, settings.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(settings.batch):
            if not order:
                order = torch.randperm(len(sequences), generator=generator).tolist()
            index = order.pop()
            with torch.no_grad():
                hidden = teacher[index].to(device=device, dtype=dtype)
                target = F.log_softmax(head(hidden).float(), dim=-1)
            logits = peft_model(input_ids=sequences[index].to(device)).logits.float()
            per_position = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True,
                                    reduction="none").sum(dim=-1)  # (1, T)  # fmt: skip
            kl = (per_position[0] * weights[index].to(device)).sum()
            (kl / settings.batch).backward()
            total += float(kl.detach()) / settings.batch
        optimizer.step()
        losses.append(total)
        if on_step is not None:
            on_step(step, total)
    peft_model.eval()
    merged: PreTrainedModel = peft_model.merge_and_unload()  # type: ignore[assignment]
    return merged, losses


def position_weights(
    length: int, prompt_length: int | None, *, answer_share: float | None
) -> Tensor:
    """(length,) weights summing to 1 over a sequence's positions: alike when `answer_share` is
    None (or the sequence has no completion); else `answer_share` spread over the positions
    that predict a completion token (prompt_length - 1 .. length - 2) and the rest over the
    others."""
    alike = torch.full((length,), 1.0 / length)
    if answer_share is None:
        return alike
    if prompt_length is None:
        raise ValueError("an answer_share needs each sequence's prompt length")
    answer = torch.zeros(length, dtype=torch.bool)
    answer[max(prompt_length - 1, 0) : length - 1] = True
    n_answer = int(answer.sum())
    if n_answer == 0 or n_answer == length:
        return alike
    return torch.where(answer, answer_share / n_answer, (1.0 - answer_share) / (length - n_answer))


def _head(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise ValueError("distillation needs a model with an output head")
    return head
