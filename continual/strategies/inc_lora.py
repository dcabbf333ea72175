"""Incremental LoRA: a new adapter per task; the earlier ones stay frozen and are summed.

Every adapter of the stream is a separate PEFT adapter (`task0`, `task1`, ... oldest first) and
all of them are active at once (PEFT multi-adapter activation): a LoRA layer's output is the base
output plus the sum of every active adapter's scaled update. Only the newest adapter trains.

The helpers here are the multi-adapter plumbing that O-LoRA shares.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
from peft import PeftModel
from peft.tuners.lora import LoraModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from continual.config import LoraHyperparams
from continual.options import IncLoraOptions
from continual.strategies.base import register_strategy
from continual.strategies.common import check_adapter_fits, lora_config, save_peft_adapter

logger = logging.getLogger(__name__)


def task_adapter_name(index: int) -> str:
    """The PEFT adapter name of the stream's task `index` (0-based)."""
    return f"task{index}"


def load_frozen_adapters(base: PreTrainedModel, history: Sequence[Path]) -> PeftModel:
    """Load every history directory as a frozen adapter `task<i>` (oldest first) on `base`.

    Which adapters are active is left to `activate`."""
    if not history:
        raise ValueError("load_frozen_adapters needs at least one adapter directory")
    for adapter_dir in history:
        check_adapter_fits(base, adapter_dir)
    base.requires_grad_(False)
    model = PeftModel.from_pretrained(base, str(history[0]), adapter_name=task_adapter_name(0))
    for index, adapter_dir in enumerate(history[1:], start=1):
        model.load_adapter(str(adapter_dir), adapter_name=task_adapter_name(index))
    return model


def add_new_adapter(
    base: PreTrainedModel | PeftModel, *, name: str, hyper: LoraHyperparams, seed: int
) -> PeftModel:
    """Add a fresh trainable adapter `name` (wrapping `base` in PEFT when it is not yet).

    `seed` draws the LoRA A matrix (B starts at zero, so the new adapter changes nothing yet)."""
    torch.manual_seed(seed)
    if isinstance(base, PeftModel):
        base.add_adapter(name, lora_config(hyper))
        return base
    base.requires_grad_(False)
    return peft.get_peft_model(base, lora_config(hyper), adapter_name=name)


def lora_tuner(model: PeftModel) -> LoraModel:
    """The LoRA tuner inside `model`, which holds the multi-adapter API."""
    tuner = model.base_model
    if not isinstance(tuner, LoraModel):
        raise TypeError(f"expected a LoRA model, got {type(tuner).__name__}")
    return tuner


def activate(model: PeftModel, *, frozen: Sequence[str], trainable: str | None) -> None:
    """Make `[*frozen, trainable]` the active adapters, in that order; only `trainable` (if any)
    gets `requires_grad`. The newest adapter is therefore always `active_adapters[-1]`."""
    names = [*frozen] if trainable is None else [*frozen, trainable]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"needs distinct adapter names, got {names}")
    # inference_mode=True freezes every adapter (active or not), then one is thawed.
    lora_tuner(model).set_adapter(names, inference_mode=True)
    # PeftModel itself tracks one "active" adapter (for its config lookups): the newest.
    model.active_adapter = names[-1]
    if trainable is not None:
        model.set_requires_grad(trainable, requires_grad=True)


def newest_adapter(model: PeftModel) -> str:
    """The adapter `activate` put last: the task being trained."""
    active = lora_tuner(model).active_adapters
    if not active:
        raise ValueError("the model has no active adapter")
    return str(active[-1])


def task_seed(hyper: LoraHyperparams, *, task_index: int) -> int:
    """Each task draws its A matrix from its own seed: a new adapter must not start as a copy of
    the first one's initialisation."""
    return hyper.seed + task_index


@register_strategy
class IncLora:
    """Train a new adapter per task on top of the frozen sum of the earlier ones."""

    name = "inc-lora"

    def __init__(self, options: IncLoraOptions | None = None) -> None:
        self.options = IncLoraOptions() if options is None else options

    def prepare(
        self, base: PreTrainedModel, *, history: Sequence[Path], hyper: LoraHyperparams
    ) -> PeftModel:
        new = task_adapter_name(len(history))
        seed = task_seed(hyper, task_index=len(history))
        if not history:
            return add_new_adapter(base, name=new, hyper=hyper, seed=seed)
        model = add_new_adapter(
            load_frozen_adapters(base, history), name=new, hyper=hyper, seed=seed
        )
        old = [task_adapter_name(i) for i in range(len(history))]
        activate(model, frozen=old, trainable=new)
        logger.info("inc-lora: %d frozen adapters, training %r", len(old), new)
        return model

    def extra_loss(self, model: PeftModel) -> Tensor | None:
        return None

    def save_adapter(self, model: PeftModel, out_dir: Path) -> None:
        save_peft_adapter(model, out_dir, adapter_name=newest_adapter(model))

    def inference_model(self, base: PreTrainedModel, *, history: Sequence[Path]) -> nn.Module:
        if not history:
            return base.eval()
        model = load_frozen_adapters(base, history)
        activate(model, frozen=[task_adapter_name(i) for i in range(len(history))], trainable=None)
        return model.eval()
