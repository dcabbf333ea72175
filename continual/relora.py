"""Merge-and-reinit (ReLoRA, Lialin et al. 2023) for PEFT LoRA layers.

Every `every` steps of one long training job the LoRA update is folded into the frozen base
weight, the adapter restarts (A Kaiming-uniform as PEFT initialises it, B = 0, so the model's
function is unchanged), most of the optimizer state of the LoRA parameters is pruned by
magnitude, and the learning rate drops to zero and re-warms (a jagged cosine). A sequence of
low-rank updates so adds up to a high-rank one.

    relora = ReLoraSchedule(every=100)
    train(model, tokenizer, examples, hyper,
          lr_schedule=relora.lr_multiplier, callbacks=relora.callbacks(callbacks))

Works on PEFT's `peft.tuners.lora.Linear` layers (`lora_A[name]`, `lora_B[name]`,
`scaling[name]`, `base_layer.weight`); other LoRA layer types holding the adapter are refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from peft.tuners import lora
from torch import Tensor, nn

from continual.errors import InvalidHyperparameter
from continual.training import StepInfo, TrainingCallbacks

logger = logging.getLogger(__name__)

DEFAULT_PRUNE_RATIO = 0.99


def lora_linears(model: nn.Module, *, adapter_name: str = "default") -> list[lora.Linear]:
    """The LoRA Linear layers holding `adapter_name`, in module order; refuses layers whose
    update cannot be folded as scale * B @ A (other layer types, DoRA, LoRA bias, merged)."""
    found: list[lora.Linear] = []
    for path, module in model.named_modules():
        if not isinstance(module, lora.LoraLayer) or adapter_name not in module.lora_A:
            continue
        if not isinstance(module, lora.Linear):
            raise ValueError(f"{path}: cannot fold a {type(module).__name__} (Linear only)")
        if module.merged:
            raise ValueError(f"{path}: adapters are merged into the base weight; unmerge first")
        if module.use_dora.get(adapter_name) or module.lora_bias.get(adapter_name):
            raise ValueError(f"{path}: DoRA / LoRA-bias adapters are not plain scale * B @ A")
        found.append(module)
    if not found:
        raise ValueError(f"no LoRA Linear layer holds adapter {adapter_name!r}")
    return found


def lora_parameters(model: nn.Module, *, adapter_name: str = "default") -> list[nn.Parameter]:
    """A and B of `adapter_name` in every LoRA Linear layer (the parameters ReLoRA resets)."""
    params: list[nn.Parameter] = []
    for layer in lora_linears(model, adapter_name=adapter_name):
        params += _lora_weights(layer, adapter_name)
    return params


def _lora_weights(layer: lora.Linear, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(A (r, in), B (out, r)) of one adapter of a LoRA Linear layer."""
    lora_A = layer.lora_A[adapter_name].weight
    lora_B = layer.lora_B[adapter_name].weight
    if not isinstance(lora_A, nn.Parameter) or not isinstance(lora_B, nn.Parameter):
        raise TypeError(f"adapter {adapter_name!r}: LoRA A/B weights are not parameters")
    return lora_A, lora_B


@torch.no_grad()
def merge_and_reinit(model: nn.Module, *, adapter_name: str = "default") -> int:
    """Fold scale * B @ A into each base weight in fp32 (cast back to the weight's dtype), then
    re-initialise A (Kaiming uniform, like PEFT) and zero B. Returns the layers merged.

    The parameters are edited in place, so an optimizer keeps referencing them."""
    layers = lora_linears(model, adapter_name=adapter_name)
    for layer in layers:
        lora_A, lora_B = _lora_weights(layer, adapter_name)  # (r, in), (out, r)
        weight = layer.get_base_layer().weight  # (out, in); (in, out) if fan_in_fan_out
        if not isinstance(weight, Tensor):
            raise TypeError(f"{type(layer.get_base_layer()).__name__} has no weight tensor")
        scale = float(layer.scaling[adapter_name])
        delta = (lora_B.float() @ lora_A.float()) * scale  # (out, in)
        if layer.fan_in_fan_out:
            delta = delta.T
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)  # not A: a zero A and a zero B would never train again
    logger.info("merged adapter %r into %d layers and re-initialised it", adapter_name, len(layers))
    return len(layers)


@torch.no_grad()
def prune_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    *,
    ratio: float = DEFAULT_PRUNE_RATIO,
    rank_by: str = "exp_avg",
) -> int:
    """Magnitude-prune the optimizer state of `params`: per parameter, the `ratio` fraction
    (rounded to whole entries) of entries smallest in |state[rank_by]| (or in the first state
    tensor of the parameter's shape when there is no `rank_by`) are zeroed in *every* state
    tensor of that shape (Adam's exp_avg and exp_avg_sq); scalars such as the step count are
    kept. Returns the entries zeroed per parameter, summed. ratio=1 resets the state entirely.

    One mask per parameter: pruning exp_avg and exp_avg_sq each by its own magnitude leaves
    entries with a first moment but no second, whose next Adam step is m / eps (unbounded; on
    the tiny model A's norm grew 60x in one step at LR 1e-4)."""
    _check_fraction("ratio", ratio)
    zeroed = 0
    for param in params:
        state = optimizer.state.get(param, {})
        tensors = [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
        if not tensors:
            continue
        count = round(ratio * param.numel())
        ranked = state.get(rank_by, tensors[0])
        smallest = ranked.abs().flatten().topk(count, largest=False, sorted=False).indices
        keep = torch.ones(param.numel(), dtype=torch.bool, device=ranked.device)
        keep[smallest] = False
        for value in tensors:
            value.mul_(keep.view_as(value))
        zeroed += count
    return zeroed


def jagged_cosine(
    step: int,
    *,
    total: int,
    warmup: int,
    restart_every: int,
    restart_warmup: int,
    min_ratio: float = 0.0,
) -> float:
    """LR multiplier at 0-based `step`: linear warmup from 0 over `warmup` steps, then a cosine
    envelope from 1 down to `min_ratio` at `total`; at every multiple of `restart_every` (the
    first step after a merge) it drops to 0 and climbs linearly over `restart_warmup` steps back
    to the envelope's value where the climb ends (ReLoRA's schedule). The zero-LR steps only
    refill the pruned optimizer moments."""
    _check_schedule(
        total=total, warmup=warmup, restart_every=restart_every, restart_warmup=restart_warmup
    )
    _check_fraction("min_ratio", min_ratio)

    def envelope(at: int) -> float:
        progress = min(max((at - warmup) / max(1, total - warmup), 0.0), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if step < warmup:
        return step / warmup
    since_restart = step % restart_every
    if step >= restart_every and since_restart < restart_warmup:
        climb_end = step - since_restart + restart_warmup
        return since_restart / restart_warmup * envelope(climb_end)
    return envelope(step)


@dataclass
class ReLoraSchedule:
    """Merge-and-reinit every `every` steps inside `continual.training.train`.

    `lr_multiplier` is the jagged cosine to pass as `train(..., lr_schedule=...)`; `after_step`
    (plugged in by `callbacks`) merges after steps every, 2*every, ... except the last step of
    the run, so the run ends with a live adapter on top of the merged base. `merges` counts them.
    """

    every: int
    restart_warmup: int | None = None  # None: ceil(every / 10)
    prune_ratio: float = DEFAULT_PRUNE_RATIO
    min_ratio: float = 0.0
    adapter_name: str = "default"
    merges: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.restart_warmup is None:
            self.restart_warmup = math.ceil(self.every / 10) if isinstance(self.every, int) else 0
        _check_schedule(
            total=1, warmup=0, restart_every=self.every, restart_warmup=self.restart_warmup
        )
        _check_fraction("prune_ratio", self.prune_ratio)
        _check_fraction("min_ratio", self.min_ratio)

    def lr_multiplier(self, step: int, *, total: int, warmup: int) -> float:
        return jagged_cosine(
            step,
            total=total,
            warmup=warmup,
            restart_every=self.every,
            restart_warmup=self.restart_warmup or 0,
            min_ratio=self.min_ratio,
        )

    def after_step(
        self, info: StepInfo, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        if info.step % self.every != 0 or info.step >= info.total_steps:
            return
        merge_and_reinit(model, adapter_name=self.adapter_name)
        params = lora_parameters(model, adapter_name=self.adapter_name)
        zeroed = prune_optimizer_state(optimizer, params, ratio=self.prune_ratio)
        self.merges += 1
        logger.info(
            "relora merge %d after step %d (%d state entries pruned)",
            self.merges,
            info.step,
            zeroed,
        )

    def callbacks(self, base: TrainingCallbacks | None = None) -> TrainingCallbacks:
        """`base` (or empty callbacks) with this schedule's `after_step` run after base's own."""
        base = base or TrainingCallbacks()
        previous = base.after_step
        if previous is None:
            return replace(base, after_step=self.after_step)

        def both(info: StepInfo, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            previous(info, model, optimizer)
            self.after_step(info, model, optimizer)

        return replace(base, after_step=both)


def _check_schedule(*, total: int, warmup: int, restart_every: int, restart_warmup: int) -> None:
    for name, value, low in (
        ("total", total, 1),
        ("warmup", warmup, 0),
        ("every", restart_every, 1),
        ("restart_warmup", restart_warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidHyperparameter(
                field=name, reason=f"must be an integer >= {low}: {value!r}"
            )
    if restart_warmup > restart_every:
        raise InvalidHyperparameter(
            field="restart_warmup", reason=f"must be <= every ({restart_every}): {restart_warmup}"
        )


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidHyperparameter(field=name, reason=f"must be a number in [0, 1]: {value!r}")
