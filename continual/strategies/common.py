"""PEFT plumbing that several strategies share: the LoRA config and the adapter files."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import peft
from peft import PeftModel

from continual.config import LoraHyperparams

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def lora_config(hyper: LoraHyperparams) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=hyper.rank,
        lora_alpha=hyper.alpha,  # type: ignore[arg-type]  # hinted int; scaling = alpha / r
        lora_dropout=hyper.dropout,
        target_modules=list(hyper.target_modules),
        task_type="CAUSAL_LM",
    )


def save_peft_adapter(model: PeftModel, out_dir: Path, *, adapter_name: str) -> None:
    """Write one adapter's two files at `out_dir` root whatever its name.

    PEFT puts adapters not named "default" in a subfolder; save to a scratch folder on the same
    filesystem, then move just the two files up (the generated README is dropped).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save-") as scratch:
        model.save_pretrained(scratch, selected_adapters=[adapter_name], safe_serialization=True)
        source = Path(scratch) if adapter_name == "default" else Path(scratch) / adapter_name
        for name in ADAPTER_FILES:
            (source / name).replace(out_dir / name)
    logger.info("saved adapter %r to %s", adapter_name, out_dir)
