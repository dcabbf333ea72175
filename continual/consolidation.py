"""Consolidation: fold a stream's adapters into its base weights (ReLoRA-style merge, once per
consolidation), and keep O-LoRA's memory of the folded tasks.

- `fold_into_base`: W <- W + sum_i s_i B_i A_i over every active adapter of every LoRA layer,
  computed in fp32 and cast back to the weight's dtype; the LoRA layers are then removed, so the
  result is a plain model whose logits equal the adapted model's (up to float rounding).
- `folded_subspace`: per layer, an orthonormal basis of the row space of the folded A matrices
  (plus the subspace the base had already folded), rank-bounded by SVD: the input directions the
  folded tasks use.
- `save_memory_adapter`: that basis as a PEFT adapter with B = 0 (it changes no output). O-LoRA
  puts it first in the history of every later task, so its penalty keeps new adapters
  orthogonal to tasks already folded into the base, exactly as to unfolded earlier adapters.

`continual.fold` consolidates a whole stream state with these (and AM-LoRA's gated fold).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft import PeftModel
from peft.tuners import lora
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from continual.strategies.common import ADAPTER_WEIGHTS, MEMORY_MARK

logger = logging.getLogger(__name__)

MEMORY_DIR = "olora_memory"
DEFAULT_MEMORY_RANK = 64
_PREFIX = "base_model.model."


def _active_lora_linears(model: PeftModel) -> dict[str, tuple[lora.Linear, list[str]]]:
    """Module path -> (LoRA Linear layer, its active adapters), for layers with any."""
    out = {}
    inner: nn.Module = model.base_model.model  # type: ignore[assignment]
    for path, module in inner.named_modules():
        if not isinstance(module, lora.LoraLayer):
            continue
        if not isinstance(module, lora.Linear):
            raise ValueError(f"{path}: cannot fold a {type(module).__name__} (Linear only)")
        active = [n for n in module.active_adapters if n in module.lora_A]
        if active:
            out[path] = (module, active)
    return out


def folded_weight_names(model: PeftModel) -> list[str]:
    """The state-dict names, in the unloaded base model, of the weights `fold_into_base` changes
    (one per adapted Linear): what a snapshot derived by the fold stores anew."""
    return sorted(f"{path}.weight" for path in _active_lora_linears(model))


@torch.no_grad()
def fold_into_base(model: PeftModel) -> PreTrainedModel:
    """The model with every active adapter folded into its base weights (fp32 sums, cast back
    to each weight's dtype) and the LoRA layers removed. Edits the base weights in place."""
    layers = _active_lora_linears(model)
    for path, (layer, active) in layers.items():
        if layer.merged:
            raise ValueError(f"{path}: adapters are merged already")
        weight = _base_weight(layer)  # (out, in)
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for name in active:
            if layer.use_dora.get(name) or layer.lora_bias.get(name):
                raise ValueError(f"{path}: adapter {name!r} is not plain scale * B @ A")
            lora_A, lora_B = _lora_weights(layer, name)  # (r, in), (out, r)
            update = (lora_B.float() @ lora_A.float()) * float(layer.scaling[name])  # (out, in)
            delta += update.T if layer.fan_in_fan_out else update
        weight.copy_((weight.float() + delta).to(weight.dtype))
    logger.info("folded the active adapters of %d layers into the base", len(layers))
    base: PreTrainedModel = model.unload()  # removes the LoRA layers, keeps the edited weights
    return base


def _base_weight(layer: lora.Linear) -> Tensor:
    weight = layer.get_base_layer().weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(layer.get_base_layer()).__name__} has no weight tensor")
    return weight


def _lora_weights(layer: lora.Linear, name: str) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) of adapter `name`."""
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not isinstance(lora_A, Tensor) or not isinstance(lora_B, Tensor):
        raise TypeError(f"adapter {name!r}: LoRA weights are not tensors")
    return lora_A, lora_B


@dataclass(frozen=True)
class Subspace:
    """What O-LoRA remembers of folded tasks, per layer (module path)."""

    basis: dict[str, Tensor]  # (k, d_in), orthonormal rows, k <= the rank bound
    out_features: dict[str, int]  # the layer's output size (for B = 0 in the adapter file)
    scale: float  # RMS row norm of the folded A matrices: the adapter's A is scale * basis


@torch.no_grad()
def folded_subspace(
    model: PeftModel,
    *,
    previous: Subspace | None = None,
    max_rank: int = DEFAULT_MEMORY_RANK,
    tolerance: float = 1e-6,
) -> Subspace:
    """Per layer, an orthonormal basis (k, d_in), k <= max_rank, of the row space of the active
    adapters' A matrices together with the `previous` basis (see `subspace_of`)."""
    rows: dict[str, list[Tensor]] = {}
    out_features: dict[str, int] = {}
    for path, (layer, active) in _active_lora_linears(model).items():
        rows[path] = [_lora_weights(layer, name)[0] for name in active]  # (r_i, d_in) each
        out_features[path] = int(_base_weight(layer).shape[0])
    return subspace_of(
        rows, out_features=out_features, previous=previous, max_rank=max_rank, tolerance=tolerance
    )


@torch.no_grad()
def subspace_of(
    rows: dict[str, list[Tensor]],
    *,
    out_features: dict[str, int],
    previous: Subspace | None = None,
    max_rank: int = DEFAULT_MEMORY_RANK,
    tolerance: float = 1e-6,
) -> Subspace:
    """Per layer (module path), an orthonormal basis (k, d_in), k <= max_rank, of the row space
    of the given A matrices (each (r_i, d_in)) together with the `previous` basis: SVD of the
    stacked rows, keeping the strongest directions whose singular value exceeds `tolerance` x
    the largest."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    basis: dict[str, Tensor] = {}
    norms: list[Tensor] = []
    for path, matrices in rows.items():
        current = [m.detach().double() for m in matrices]
        norms += [r.norm(dim=1) for r in current]
        if previous is not None and path in previous.basis:
            current.append(previous.basis[path].double() * _row_scale(current))
        stacked = torch.cat(current)  # (R, d_in)
        _, singular, vh = torch.linalg.svd(stacked, full_matrices=False)  # vh: (R, d_in)
        keep = int((singular > tolerance * singular[0]).sum())
        basis[path] = vh[: min(keep, max_rank)].float().contiguous()
    if not basis:
        raise ValueError("the model has no active adapters")
    scale = float(torch.cat(norms).square().mean().sqrt())
    return Subspace(basis=basis, out_features=dict(out_features), scale=scale)


def _row_scale(rows: list[Tensor]) -> float:
    """Weigh the previous (orthonormal) basis like the current rows in the SVD."""
    return float(torch.cat([r.norm(dim=1) for r in rows]).square().mean().sqrt())


def save_memory_adapter(subspace: Subspace, out_dir: Path) -> None:
    """Write the subspace as a PEFT LoRA adapter: A = scale * basis (zero-padded to a common
    rank), B = 0, so it changes no output; O-LoRA reads its A rows like an earlier task's."""
    rank = max(1, max(b.shape[0] for b in subspace.basis.values()))
    tensors: dict[str, Tensor] = {}
    for path, rows in subspace.basis.items():
        padded = torch.zeros(rank, rows.shape[1], dtype=torch.float32)  # (r, d_in)
        padded[: rows.shape[0]] = rows.float() * subspace.scale
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = padded
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = torch.zeros(subspace.out_features[path], rank)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1; B is zero anyway
        target_modules=sorted({p.rsplit(".", 1)[-1] for p in subspace.basis}),
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    config.save_pretrained(str(out_dir))
    metadata = {"format": "pt", "strata": MEMORY_MARK, "scale": repr(subspace.scale)}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata=metadata)


def load_memory_adapter(adapter_dir: Path) -> Subspace:
    """Read back what `save_memory_adapter` wrote (padding rows dropped)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("strata") != MEMORY_MARK:
            raise ValueError(f"{adapter_dir} is not an O-LoRA memory adapter")
        scale = float(metadata["scale"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    basis, out_features = {}, {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(_PREFIX) : -len(".lora_A.weight")]
            rows = value / scale
            basis[module] = rows[rows.norm(dim=1) > 0.5]  # orthonormal rows; padding is zero
            out_features[module] = int(tensors[key.replace("lora_A", "lora_B")].shape[0])
    return Subspace(basis=basis, out_features=out_features, scale=scale)
