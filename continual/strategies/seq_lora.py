"""Sequential LoRA: one adapter, trained on every task of the stream in turn (the baseline that
forgets)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import peft
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from continual.config import LoraHyperparams
from continual.errors import InvalidHyperparameter
from continual.options import SeqLoraOptions
from continual.strategies.base import register_strategy
from continual.strategies.common import check_adapter_fits, lora_config, save_peft_adapter


@register_strategy
class SeqLora:
    """Continue the newest adapter of the stream, or start one from scratch."""

    name = "seq-lora"
    adapter_name = "default"

    def __init__(self, options: SeqLoraOptions | None = None) -> None:
        self.options = SeqLoraOptions() if options is None else options

    def prepare(
        self, base: PreTrainedModel, *, history: Sequence[Path], hyper: LoraHyperparams
    ) -> PeftModel:
        torch.manual_seed(hyper.seed)  # LoRA A matrices are drawn at random
        base.requires_grad_(False)
        model: PeftModel
        if not history:
            model = peft.get_peft_model(base, lora_config(hyper), adapter_name=self.adapter_name)
        else:
            check_adapter_fits(base, history[-1])
            model = PeftModel.from_pretrained(
                base, str(history[-1]), adapter_name=self.adapter_name, is_trainable=True
            )
            rank = getattr(model.peft_config[self.adapter_name], "r", hyper.rank)
            # ReLoRA cycles leave a rank-r adapter at r x (resets + 1): continued whole, it is
            # trained at that rank (and its cycles reinit all of it). Any other rank change would
            # record a rank it did not train.
            grown = hyper.relora_every is not None and rank % hyper.rank == 0
            if rank != hyper.rank and not grown:
                raise InvalidHyperparameter(
                    field="rank",
                    reason=f"seq-lora continues the previous task's rank-{rank} adapter, so its "
                    f"rank cannot change (got {hyper.rank})",
                )
        return model

    def extra_loss(self, model: PeftModel) -> Tensor | None:
        return None

    def save_adapter(self, model: PeftModel, out_dir: Path) -> None:
        save_peft_adapter(model, out_dir, adapter_name=self.adapter_name)

    def inference_model(self, base: PreTrainedModel, *, history: Sequence[Path]) -> nn.Module:
        if not history:
            return base.eval()
        check_adapter_fits(base, history[-1])
        model = PeftModel.from_pretrained(base, str(history[-1]), adapter_name=self.adapter_name)
        return model.eval()
