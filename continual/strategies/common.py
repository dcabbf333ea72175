"""PEFT plumbing that several strategies share: the LoRA config and the adapter files."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import peft
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from torch import nn

from continual.config import LoraHyperparams
from continual.errors import IncompatibleAdapter

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a model wrapped by a PeftModel
LORA_A_SUFFIX, LORA_B_SUFFIX = ".lora_A.weight", ".lora_B.weight"  # of PEFT's weight keys
_LORA_SUFFIXES = (LORA_A_SUFFIX, LORA_B_SUFFIX)
MEMORY_MARK = "olora-memory"  # the "strata" metadata of a consolidation's memory adapter


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
        # no embedding layers are adapted: "auto" would look the base's name up (on the Hub,
        # for a name that is not a local path) to decide whether to save them
        model.save_pretrained(scratch, selected_adapters=[adapter_name], safe_serialization=True,
                              save_embedding_layers=False)  # fmt: skip
        source = Path(scratch) if adapter_name == "default" else Path(scratch) / adapter_name
        for name in ADAPTER_FILES:
            (source / name).replace(out_dir / name)
    logger.info("saved adapter %r to %s", adapter_name, out_dir)


def check_adapter_fits(base: nn.Module, adapter_dir: Path) -> None:
    """Refuse, with `IncompatibleAdapter`, an adapter that `base` cannot take: no safetensors
    weights (a pickled `.bin` is never read), a layer `base` does not have or that is not a
    linear layer, or LoRA matrices whose shapes do not match the layer (A: rank x in,
    B: out x rank). Only the safetensors header is read; nothing is loaded or executed.

    `base` may already be a PeftModel (further adapters loaded on top of the first)."""
    adapter_dir = Path(adapter_dir)
    name = str(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not weights.is_file():
        present = sorted(p.name for p in adapter_dir.iterdir()) if adapter_dir.is_dir() else []
        raise IncompatibleAdapter(
            adapter=name, reason=f"needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, found {present}"
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise IncompatibleAdapter(adapter=name, reason=f"unreadable weights: {exc}") from exc
    root = base.get_base_model() if isinstance(base, PeftModel) else base
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            raise IncompatibleAdapter(adapter=name, reason=f"{key!r} is not a LoRA matrix")
        module = key[len(PEFT_PREFIX) : -len(suffix)]
        pairs.setdefault(module, {})[suffix] = shape
    if not pairs:
        raise IncompatibleAdapter(adapter=name, reason="holds no LoRA matrices")
    for module, found in sorted(pairs.items()):
        try:
            layer = root.get_submodule(module)
        except AttributeError:
            raise IncompatibleAdapter(
                adapter=name, reason=f"the base model has no layer {module!r}"
            ) from None
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if weight is None or weight.dim() != 2:
            raise IncompatibleAdapter(adapter=name, reason=f"{module!r} is not a linear layer")
        out_features, in_features = (int(n) for n in weight.shape)
        a, b = found.get(LORA_A_SUFFIX), found.get(LORA_B_SUFFIX)
        if a is None or b is None:
            raise IncompatibleAdapter(adapter=name, reason=f"{module!r} lacks lora_A or lora_B")
        if (
            len(a) != 2
            or len(b) != 2
            or a[1] != in_features
            or b[0] != out_features
            or a[0] != b[1]
        ):
            raise IncompatibleAdapter(
                adapter=name,
                reason=f"{module!r} is {out_features}x{in_features} in the base model but the "
                f"adapter's A is {'x'.join(map(str, a))} and B is {'x'.join(map(str, b))}",
            )
